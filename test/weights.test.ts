// Full-parameter training: every op's weight gradient by central finite differences on tiny shapes, the whole
// model's weight gradients and a 10-step AdamW loss curve over all parameters against PyTorch autograd in
// float64 (test/fixtures/golden/<model>-weights.safetensors, see its README), and save -> reload.
//
// Tolerances, with the reasons:
// - Op finite differences: |fd - analytic| <= 2e-2 * max|analytic| + 1e-4 with h = 1e-2, as in ops.test.ts:
//   fp32 ops leave ~1e-4 relative rounding noise in the difference quotient and the O(h^2) truncation of
//   the nonlinear ones (norms, softmax) is ~1e-4; matmul and the embedding are linear in their weights, so
//   there only rounding counts.
// - Weight gradients against PyTorch: max |ours - ref| / max |ref| below 1e-3 per golden tensor (row sums,
//   column sums, sampled entries, whole vectors), as test/grad.test.ts: fp32 through a few layers gives
//   ~1e-6, the margin absorbs summation order.
// - Loss curve: each step's loss within 1e-4 relative (fp32 against float64 through 10 updates of every
//   weight), the global gradient norms (before clipping) within 1e-3; the final weights' summaries within
//   1e-4 of the largest reference value (fp32 rounding of ~1e-2 updates on ~0.1 weights, measured ~1e-5).
//   Entries whose exact gradient is zero are set aside (see the GPT-2 key bias below): Adam divides by
//   sqrt(v), which turns fp32 rounding there into steps as large as real ones.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseConfig } from "../lib/config.js";
import {
  createModel,
  loadModel,
  loadTrainableModel,
  type Model,
  modelWeights,
  Pretrainer,
  saveModel,
  setModelWeights,
  toHfTensors,
} from "../lib/index.js";
import { addon } from "../lib/native.js";
import { loadTokenizer } from "../lib/tokenizer.js";
import { checkGradient, dot, randn } from "./fd.js";
import { compare, goldenAdamW, goldenBatch, modelDir, readGolden, toInt32 } from "./helpers.js";

const ops = addon().ops;
const GRAD_TOL = 1e-3;
const MODELS = ["gpt2-tiny", "llama-tiny", "llama-tiny-untied"] as const;

describe("finite-difference checks of the ops' weight gradients", () => {
  // C = 70 spans two of the kernels' 64-channel blocks, so both threads of the column split do work.
  const N = 6;
  const C = 70;

  it("matmul: dW and dbias, accumulated (+=)", () => {
    const [Cin, OC] = [9, 13];
    const x = randn(N * Cin, 1);
    const W = randn(OC * Cin, 2);
    const b = randn(OC, 3);
    const r = randn(N * OC, 4);
    const dW = new Float32Array(OC * Cin);
    const db = new Float32Array(OC);
    ops.matmulBackwardWeights(dW, db, r, x, N, Cin, OC);
    checkGradient(W, (v) => dot(ops.matmul(x, v, b, N, Cin, OC), r), dW);
    checkGradient(b, (v) => dot(ops.matmul(x, W, v, N, Cin, OC), r), db);
    const twice = dW.slice();
    ops.matmulBackwardWeights(twice, null, r, x, N, Cin, OC);
    for (let i = 0; i < dW.length; i++) expect(twice[i]).toBeCloseTo(2 * dW[i]!, 5);
  });

  it("layernorm: dw and db", () => {
    const x = randn(N * C, 5);
    const w = randn(C, 6);
    const b = randn(C, 7);
    const r = randn(N * C, 8);
    const [, mean, rstd] = ops.layernorm(x, w, b, N, C);
    const dw = new Float32Array(C);
    const db = new Float32Array(C);
    ops.layernormBackwardWeights(dw, db, r, x, mean, rstd, N, C);
    checkGradient(w, (v) => dot(ops.layernorm(x, v, b, N, C)[0], r), dw);
    checkGradient(b, (v) => dot(ops.layernorm(x, w, v, N, C)[0], r), db);
  });

  it("rmsnorm: dw", () => {
    const x = randn(N * C, 9);
    const w = randn(C, 10);
    const r = randn(N * C, 11);
    const [, rstd] = ops.rmsnorm(x, w, N, C);
    const dw = new Float32Array(C);
    ops.rmsnormBackwardWeights(dw, r, x, rstd, N, C);
    checkGradient(w, (v) => dot(ops.rmsnorm(x, v, N, C)[0], r), dw);
  });

  it("embedding: token rows with repeated ids and learned positions, behind a prompt and an offset", () => {
    const [B, T, P, V, posOffset] = [2, 5, 2, 7, 3];
    const ids = Int32Array.from([3, 1, 3, 6, 0, 1, 1, 5, 3, 2]);
    const prompt = randn(P * C, 12);
    const wte = randn(V * C, 13);
    const wpe = randn((P + T + posOffset + 2) * C, 14);
    const r = randn(B * (P + T) * C, 15);
    const dwte = new Float32Array(wte.length);
    const dwpe = new Float32Array(wpe.length);
    ops.embeddingBackwardWeights(dwte, dwpe, r, ids, P, posOffset, B, T, C);
    const run = (te: Float32Array, pe: Float32Array) =>
      ops.embedding(ids, prompt, P, te, pe, posOffset, B, T, C);
    checkGradient(wte, (v) => dot(run(v, wpe), r), dwte, 96);
    checkGradient(wpe, (v) => dot(run(wte, v), r), dwpe, 96);
    // Rows no id uses (4) and positions never reached (the first posOffset, the last 2) get nothing.
    for (let c = 0; c < C; c++) {
      expect(dwte[4 * C + c]).toBe(0);
      expect(dwpe[c]).toBe(0);
      expect(dwpe[(P + T + posOffset) * C + c]).toBe(0);
    }
    // Without a position table only the token rows are touched.
    const only = new Float32Array(wte.length);
    ops.embeddingBackwardWeights(only, null, r, ids, P, 0, B, T, C);
    expect(Buffer.from(only.buffer).equals(Buffer.from(dwte.buffer))).toBe(true);
  });

  it("LM head + cross-entropy (fused): dW, with an ignored row and a repeated target", () => {
    const [R, Cx, V] = [5, 6, 11];
    const x = randn(R * Cx, 16);
    const W = randn(V * Cx, 17);
    const targets = Int32Array.from([3, -100, 10, 3, 0]);
    const dW = new Float32Array(V * Cx);
    const [loss, dx] = ops.lmHeadCrossentropyWeights(dW, x, targets, W, R, Cx, V);
    checkGradient(W, (v) => ops.lmHeadCrossentropy(x, targets, v, R, Cx, V)[0], dW, 66);
    // Same loss and input gradient as the prompt-tuning entry point.
    const [loss0, dx0] = ops.lmHeadCrossentropy(x, targets, W, R, Cx, V);
    expect(loss).toBe(loss0);
    expect(Buffer.from(dx.buffer).equals(Buffer.from(dx0.buffer))).toBe(true);
  });
});

function sums(data: Float32Array, rows: number, cols: number) {
  const rowSums = new Float64Array(rows);
  const colSums = new Float64Array(cols);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) {
      rowSums[r]! += data[r * cols + c]!;
      colSums[c]! += data[r * cols + c]!;
    }
  return { rowSums, colSums };
}

/** Largest relative error (max |diff| / max |ref|) of Hugging Face tensors against a golden summary. */
function summaryError(
  g: ReturnType<typeof readGolden>,
  prefix: string,
  tensors: Map<string, { shape: number[]; data: Float32Array }>,
  aside: (name: string, length: number) => [number, number] | undefined = () => undefined,
): { worst: number; where: string; count: number; asideMaxAbs: number } {
  const names = JSON.parse(g.meta.parameters!) as string[];
  expect([...tensors.keys()].sort()).toEqual([...names].sort());
  let worst = 0;
  let where = "";
  let asideMaxAbs = 0;
  // `floor`: the least scale an error is measured against. A sum of n entries is judged against what such a
  // sum can reach (the largest entry times sqrt(n)), because some sums cancel exactly in exact arithmetic:
  // LayerNorm's input gradient sums to zero over channels (so do the rows of a GPT-2 projection feeding the
  // residual stream), softmax's gradient sums to zero over the vocabulary (the LM head's columns); there the
  // reference holds float64 rounding and a ratio to it means nothing.
  const note = (actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, floor = 0) => {
    const r = compare(actual, expected);
    const e = r.maxAbs / Math.max(r.scale, floor);
    if (!(e <= worst)) {
      worst = e;
      where = what;
    }
  };
  for (const name of names) {
    const t = tensors.get(name)!;
    if (t.shape.length === 1) {
      const ref = g.get(`${prefix}.${name}`) as Float64Array;
      const range = aside(name, t.data.length);
      if (!range) {
        note(t.data, ref, name);
        continue;
      }
      // The entries set aside are measured on their own (absolute), the rest as usual.
      const [from, to] = range;
      for (let i = from; i < to; i++) asideMaxAbs = Math.max(asideMaxAbs, Math.abs(t.data[i]! - ref[i]!));
      const keep = (_: unknown, i: number) => i < from || i >= to;
      note(t.data.filter(keep), ref.filter(keep), name);
      continue;
    }
    const [rows, cols] = t.shape as [number, number];
    const { rowSums, colSums } = sums(t.data, rows, cols);
    let entry = 0;
    for (const v of t.data) entry = Math.max(entry, Math.abs(v));
    note(
      rowSums,
      g.get(`${prefix}.${name}.row_sums`) as Float64Array,
      `${name} row sums`,
      entry * Math.sqrt(cols),
    );
    note(
      colSums,
      g.get(`${prefix}.${name}.col_sums`) as Float64Array,
      `${name} column sums`,
      entry * Math.sqrt(rows),
    );
    const idx = g.get(`sample_index.${name}`) as Int32Array;
    note(
      Array.from(idx, (i) => t.data[i]!),
      g.get(`${prefix}.${name}.sample`) as Float64Array,
      `${name} samples`,
    );
  }
  return { worst, where, count: names.length, asideMaxAbs };
}

function hfMap(model: Model, slots: Record<string, Float32Array>) {
  const { shapes } = modelWeights(model);
  return new Map(
    toHfTensors(model.config, slots, shapes).map((t) => [
      t.name,
      { shape: t.shape, data: t.data as Float32Array },
    ]),
  );
}

describe.each(MODELS)("full-parameter training against PyTorch autograd: %s", (name) => {
  const g = readGolden(`${name}-weights`);
  const batch = goldenBatch(g);
  const [CB, CT] = g.shape("curve_input_ids") as [number, number];
  const curveBatch = { inputIds: toInt32(g.get("curve_input_ids")), batch: CB, seqLen: CT };
  const adamw = goldenAdamW(g);
  let model: Model;
  let trainer: Pretrainer;
  const dirs: string[] = [];
  beforeAll(async () => {
    model = await loadTrainableModel(modelDir(name), { threads: 2 });
    trainer = new Pretrainer(model, {
      ...adamw,
    });
  });
  afterAll(() => {
    model?.dispose();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it("loss and the gradient of every weight (padding, ignored labels)", async () => {
    const out = await trainer.gradients(batch);
    const loss = (g.get("loss") as Float64Array)[0]!;
    expect(Math.abs(out.loss - loss) / loss).toBeLessThan(1e-5);
    const { worst, where } = summaryError(g, "weight_grads", hfMap(model, out.gradients));
    if (process.env.PRIORTUNE_REPORT) console.log(name, "weight grads", worst, where);
    expect(worst, `worst: ${where}`).toBeLessThan(GRAD_TOL);
  });

  it("is deterministic for a fixed thread count", async () => {
    const a = await trainer.gradients(batch);
    const b = await trainer.gradients(batch);
    expect(a.loss).toBe(b.loss);
    for (const k of Object.keys(a.gradients))
      expect(Buffer.from(a.gradients[k]!.buffer).equals(Buffer.from(b.gradients[k]!.buffer)), k).toBe(true);
  });

  it("whole-model central differences agree on the largest weight-gradient coordinates", async () => {
    // fp32 loss differences: h = 2e-2 keeps rounding noise (~1e-6 / h) well under the 3% tolerance.
    const h = 2e-2;
    const { gradients } = await trainer.gradients(batch);
    const { tensors } = modelWeights(model);
    const lossOf = async () => (await model.forward({ ...batch, logits: false })).loss!;
    for (const slot of ["tok_emb", "l0.qkv.w", "l0.fc.w", "lnf.w"]) {
      const grad = gradients[slot]!;
      const order = Array.from(grad.keys()).sort((a, b) => Math.abs(grad[b]!) - Math.abs(grad[a]!));
      const top = Math.abs(grad[order[0]!]!);
      const w = tensors[slot]!;
      for (const i of order.slice(0, 2)) {
        const keep = w[i]!;
        w[i] = keep + h;
        setModelWeights(model, { [slot]: w });
        const up = await lossOf();
        w[i] = keep - h;
        setModelWeights(model, { [slot]: w });
        const down = await lossOf();
        w[i] = keep;
        setModelWeights(model, { [slot]: w });
        expect(Math.abs((up - down) / (2 * h) - grad[i]!), `${slot}[${i}]`).toBeLessThan(3e-2 * top);
      }
    }
  });

  it("a setModelWeights that throws writes no weight (every tensor is checked first)", async () => {
    const { tensors: before } = modelWeights(model);
    const lossBefore = (await model.forward({ ...batch, logits: false })).loss!;
    const changed = before["l0.fc.w"]!.map((v) => v + 1);
    const nan = before["lnf.w"]!.slice();
    nan[0] = Number.NaN;
    expect(() => setModelWeights(model, { "l0.fc.w": changed, "lnf.w": nan })).toThrow(/lnf\.w.*not finite/);
    expect(() => setModelWeights(model, { "l0.fc.w": changed, "lnf.w": new Float32Array(3) })).toThrow(
      /weights for 'lnf\.w': expected/,
    );
    expect(() => setModelWeights(model, { "l0.fc.w": changed, nope: changed })).toThrow(
      /no weight slot named 'nope'/,
    );
    const { tensors: after } = modelWeights(model);
    expect(Buffer.from(after["l0.fc.w"]!.buffer).equals(Buffer.from(before["l0.fc.w"]!.buffer))).toBe(true);
    expect((await model.forward({ ...batch, logits: false })).loss).toBe(lossBefore);
  });

  it("10 AdamW steps over every weight follow PyTorch's loss curve", async () => {
    const losses = g.get("curve_losses") as Float64Array;
    const norms = g.get("curve_grad_norms") as Float64Array;
    let lossError = 0;
    let normError = 0;
    for (let s = 0; s < losses.length; s++) {
      const out = await trainer.step(curveBatch);
      expect(out.step).toBe(s + 1);
      lossError = Math.max(lossError, Math.abs(out.loss - losses[s]!) / losses[s]!);
      normError = Math.max(normError, Math.abs(out.gradNorm - norms[s]!) / norms[s]!);
      expect(Math.abs(out.loss - losses[s]!) / losses[s]!, `loss at step ${s}`).toBeLessThan(1e-4);
      expect(Math.abs(out.gradNorm - norms[s]!) / norms[s]!, `gradient norm at step ${s}`).toBeLessThan(1e-3);
    }
    if (process.env.PRIORTUNE_REPORT) console.log(name, "curve: loss", lossError, "gradient norm", normError);
    // GPT-2's key bias gets an exactly zero gradient (softmax ignores a shift shared by every key's score),
    // so PyTorch's float64 leaves it alone while our fp32 rounding (~1e-9) becomes Adam steps of up to
    // lr * |g| / (|g| + eps): compared on its own, within 10 lr (the most 10 steps can move anything).
    const C = model.config.hiddenSize;
    const keyBias = (n: string) =>
      /attn\.c_attn\.bias$/.test(n) ? ([C, 2 * C] as [number, number]) : undefined;
    const final = hfMap(model, modelWeights(model).tensors);
    const { worst, where, asideMaxAbs } = summaryError(g, "curve_final", final, keyBias);
    if (process.env.PRIORTUNE_REPORT)
      console.log(name, "final weights", worst, where, "key bias", asideMaxAbs);
    expect(worst, `worst: ${where}`).toBeLessThan(1e-4);
    expect(asideMaxAbs).toBeLessThan(10 * adamw.lr);
  });

  it("save -> loadModel gives identical logits; the tokenizer comes along", async () => {
    const dir = mkdtempSync(join(tmpdir(), "priortune-save-"));
    dirs.push(dir);
    saveModel(model, dir);
    const back = await loadModel(dir, { backend: "cpu", threads: 2 });
    try {
      expect(back.tokenizer).not.toBeNull();
      expect(back.dtypes).toEqual(["F32"]);
      const a = await model.forward(curveBatch);
      const b = await back.forward(curveBatch);
      expect(Buffer.from(b.logits!.buffer).equals(Buffer.from(a.logits!.buffer))).toBe(true);
    } finally {
      back.dispose();
    }
  });
});

describe("saved config.json: bos and eos token ids", () => {
  it("training refuses sequences past a sliding window (it attended over all of them; evaluation refused)", async () => {
    const config = parseConfig({
      architectures: ["MistralForCausalLM"],
      vocab_size: 50,
      hidden_size: 16,
      num_attention_heads: 2,
      num_hidden_layers: 1,
      intermediate_size: 16,
      sliding_window: 8,
    });
    const model = await createModel(config, { seed: 1, threads: 1 });
    try {
      const trainer = new Pretrainer(model, { lr: 1e-3 });
      const batch = (seqLen: number) => ({ inputIds: new Int32Array(seqLen).fill(3), batch: 1, seqLen });
      await expect(trainer.step(batch(9))).rejects.toThrow(
        "seqLen 9 exceeds the model's sliding window (8), which priortune does not implement",
      );
      await expect(trainer.step(batch(8))).resolves.toBeDefined();
    } finally {
      model.dispose();
    }
  });

  it("are the tokenizer's end of text, or null without one (not Transformers' class defaults)", async () => {
    const config = parseConfig({
      architectures: ["GPT2LMHeadModel"],
      vocab_size: 300,
      n_embd: 16,
      n_head: 2,
      n_layer: 1,
      n_positions: 32,
    });
    const model = await createModel(config, { seed: 1, threads: 1 });
    const dir = mkdtempSync(join(tmpdir(), "priortune-special-"));
    try {
      // GPT2Config would take 50256, outside this 300-token vocabulary.
      saveModel(model, dir);
      let saved = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
      expect([saved.bos_token_id, saved.eos_token_id]).toEqual([null, null]);
      const tokenizer = loadTokenizer(join(import.meta.dirname, "..", "models", "priortune-small"));
      saveModel(model, dir, { tokenizer });
      saved = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
      const end = tokenizer.tokenToId("<|endoftext|>");
      expect(end).toBeTypeOf("number");
      expect([saved.bos_token_id, saved.eos_token_id]).toEqual([end, end]);
      // The tokenizer's directory alone: its files and its ids (those of the model's tokenizer, none here,
      // were written before).
      saveModel(model, dir, { tokenizerDir: join(import.meta.dirname, "..", "models", "priortune-small") });
      saved = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
      expect([saved.bos_token_id, saved.eos_token_id]).toEqual([end, end]);
    } finally {
      model.dispose();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("createModel: seeded random initialisation from a config", () => {
  it.each(MODELS)(
    "%s: Transformers-style init, reproducible, trainable, saved and reloaded",
    async (name) => {
      const model = await createModel(modelDir(name), { seed: 7, threads: 2 });
      const twin = await createModel(modelDir(name), { seed: 7, threads: 2 });
      const other = await createModel(modelDir(name), { seed: 8, threads: 2 });
      const dir = mkdtempSync(join(tmpdir(), "priortune-create-"));
      try {
        const { tensors } = modelWeights(model);
        const same = modelWeights(twin).tensors;
        const diff = modelWeights(other).tensors;
        for (const k of Object.keys(tensors)) {
          expect(Buffer.from(same[k]!.buffer).equals(Buffer.from(tensors[k]!.buffer)), k).toBe(true);
        }
        expect(Buffer.from(diff["tok_emb"]!.buffer).equals(Buffer.from(tensors["tok_emb"]!.buffer))).toBe(
          false,
        );
        const std = (v: Float32Array) => Math.sqrt(v.reduce((s, x) => s + x * x, 0) / v.length);
        const L = model.config.numLayers;
        expect(std(tensors["tok_emb"]!)).toBeCloseTo(0.02, 3);
        expect(std(tensors["l0.qkv.w"]!)).toBeCloseTo(0.02, 3);
        const fc2 = std(tensors["l0.fc2.w"]!);
        if (model.config.architecture === "gpt2") expect(fc2).toBeCloseTo(0.02 / Math.sqrt(2 * L), 3);
        else expect(fc2).toBeCloseTo(0.02, 3);
        expect(tensors["lnf.w"]!.every((x) => x === 1)).toBe(true);
        if (tensors["l0.qkv.b"]) expect(tensors["l0.qkv.b"].every((x) => x === 0)).toBe(true);

        // From scratch the loss starts near ln V and falls on a repeated batch.
        const V = model.config.vocabSize;
        const trainer = new Pretrainer(model, { lr: 1e-2 });
        const ids = Int32Array.from({ length: 2 * 16 }, (_, i) => (i * 37 + 11) % V);
        const step = async () => trainer.step({ inputIds: ids, batch: 2, seqLen: 16 });
        const first = await step();
        expect(Math.abs(first.loss - Math.log(V))).toBeLessThan(0.1);
        let last = first;
        for (let i = 0; i < 2; i++) last = await step();
        // Two steps called together run one after the other, with step numbers 4 and 5 (they both took
        // step 4's number and learning rate before).
        const both = await Promise.all([step(), step()]);
        expect(both.map((r) => r.step)).toEqual([4, 5]);
        last = both[1]!;
        expect(last.step).toBe(5);
        expect(last.loss).toBeLessThan(first.loss - 0.5);

        saveModel(model, dir);
        const back = await loadModel(dir, { backend: "cpu", threads: 2 });
        try {
          const a = await model.forward({ inputIds: ids, batch: 2, seqLen: 16 });
          const b = await back.forward({ inputIds: ids, batch: 2, seqLen: 16 });
          expect(Buffer.from(b.logits!.buffer).equals(Buffer.from(a.logits!.buffer))).toBe(true);
        } finally {
          back.dispose();
        }
      } finally {
        for (const m of [model, twin, other]) m.dispose();
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );

  it("builds from a config.json object or a parsed config, without any weights file", async () => {
    const hf = {
      architectures: ["LlamaForCausalLM"],
      vocab_size: 64,
      hidden_size: 32,
      intermediate_size: 48,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      max_position_embeddings: 32,
    };
    const a = await createModel(hf, { seed: 1, threads: 1 });
    const b = await createModel(a.config, { seed: 1, threads: 1 });
    try {
      expect(a.tokenizer).toBeNull();
      expect(b.config).toEqual(a.config);
      const wa = modelWeights(a).tensors;
      const wb = modelWeights(b).tensors;
      for (const k of Object.keys(wa))
        expect(Buffer.from(wb[k]!.buffer).equals(Buffer.from(wa[k]!.buffer))).toBe(true);
    } finally {
      a.dispose();
      b.dispose();
    }
  });

  it("refuses frozen models and bad options, naming the argument", async () => {
    const frozen = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 1 });
    try {
      expect(() => new Pretrainer(frozen, { lr: 1e-3 })).toThrow(/createModel or loadTrainableModel/);
      expect(() => saveModel(frozen, tmpdir())).toThrow(/createModel or loadTrainableModel/);
      const sharded = await loadTrainableModel(modelDir("llama-tiny-untied"), { threads: 1 });
      expect(() => saveModel(sharded, modelDir("llama-tiny-untied"))).toThrow(
        /model\.safetensors\.index\.json/,
      );
      sharded.dispose();
    } finally {
      frozen.dispose();
    }
    const model = await createModel(modelDir("llama-tiny"), { threads: 1 });
    try {
      expect(() => new Pretrainer(model, { lr: -1 })).toThrow(/lr/);
      expect(() => new Pretrainer(model, { lr: 1e-3, beta2: 1 })).toThrow(/beta2/);
      const trainer = new Pretrainer(model, { lr: 1e-3 });
      await expect(
        trainer.step({ inputIds: Int32Array.from([1, 2, 999]), batch: 1, seqLen: 3 }),
      ).rejects.toThrow(/inputIds\[2\]/);
      await expect(
        trainer.step({
          inputIds: Int32Array.from([1, 2]),
          batch: 1,
          seqLen: 2,
          labels: Int32Array.from([1, -100]),
        }),
      ).rejects.toThrow(/no labelled position/);
      expect(trainer.steps).toBe(0);
      await expect(createModel({ architectures: ["BertModel"] })).rejects.toThrow(/unsupported architecture/);
    } finally {
      model.dispose();
    }
    await expect(trainerAfterDispose()).rejects.toThrow(/Model is disposed/);
  });
});

async function trainerAfterDispose() {
  const model = await createModel(modelDir("gpt2-tiny"), { threads: 1 });
  const trainer = new Pretrainer(model, { lr: 1e-3 });
  model.dispose();
  return trainer.step({ inputIds: Int32Array.from([1, 2, 3]), batch: 1, seqLen: 3 });
}
