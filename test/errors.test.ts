// Bad input gets an error that names the argument; nothing aborts the process.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { nativeConfig, parseConfig } from "../lib/config.js";
import { loadModel, type Model, VocabIndex } from "../lib/index.js";
import { addon, addonPath } from "../lib/native.js";
import { AdamW } from "../lib/optim.js";
import { createModel, loadTrainableModel, Pretrainer } from "../lib/pretrain.js";
import { Rng } from "../lib/rng.js";
import { readTensors } from "../lib/safetensors.js";
import { copyModelDir, modelDir } from "./helpers.js";

describe("native argument limits (what lib's checks would catch first)", () => {
  const cfg = () =>
    nativeConfig(
      parseConfig(JSON.parse(readFileSync(join(modelDir("llama-tiny"), "config.json"), "utf8"))),
      1,
    );

  it("thread counts above 1024 are refused (OpenMP would end the process), in lib and in the binding", async () => {
    await expect(loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 5000 })).rejects.toThrow(
      "threads: expected at most 1024, got 5000",
    );
    // The training entry points share the check (they took any positive integer before).
    await expect(loadTrainableModel(modelDir("llama-tiny"), { threads: 5000 })).rejects.toThrow(
      "threads: expected at most 1024, got 5000",
    );
    await expect(createModel(modelDir("llama-tiny"), { threads: 2048 })).rejects.toThrow(
      "threads: expected at most 1024, got 2048",
    );
    expect(() => new (addon().NativeModel)({ ...cfg(), threads: 5000 })).toThrow(
      "config.threads: expected at most 1024",
    );
    expect(() => new (addon().NativeModel)({ ...cfg(), threads: Number.NaN })).toThrow(
      "config.threads: expected an integer",
    );
  });

  it("batch x seqLen beyond 2^31 - 1 tokens is refused before any array is read", async () => {
    const native = new (addon().NativeModel)(cfg());
    expect(() => native.forward({ inputIds: new Int32Array(0), batch: 2 ** 32, seqLen: 2 ** 32 })).toThrow(
      "batch x seqLen = 4294967296 x 4294967296 is more than 2^31 - 1 tokens",
    );
    native.dispose();
  });

  // Sizes whose product wraps in int64 made a length check pass and the kernel run far past the arrays
  // (a segmentation fault before these checks).
  it("shapes whose sizes multiply past 2^53 elements are refused, not wrapped", () => {
    const a = addon();
    const f = (n: number) => new Float32Array(n);
    expect(() => a.ops.swiglu(f(0), 2 ** 32, 2 ** 32)).toThrow("shape: the sizes multiply to more than 2^53");
    expect(() => a.ops.matmul(f(0), f(0), null, 2 ** 32, 2 ** 32, 2 ** 32)).toThrow("more than 2^53");
    expect(() => a.ops.swiglu(f(0), 2 ** 40, 1)).toThrow("N: expected at most 2^32");
    expect(() => a.gemm(false, false, 3, 1, 1, 1, f(3), 3 * 2 ** 61, f(1), 1, 0, f(1), 1, 1)).toThrow(
      "lda: expected at most 2^32",
    );
    expect(() => a.gemm(false, false, 3, 1, 1, 1, f(3), 2 ** 32, f(1), 1, 0, f(3), 1, 1)).toThrow(
      "A: array too short",
    );
    expect(() => a.priorCholesky(new Float64Array(0), 2 ** 32, 1)).toThrow("more than 2^53");
  });

  it("attention ops refuse qRows beyond S and a prefix length without prefixes", () => {
    const { ops } = addon();
    const f = (n: number) => new Float32Array(n);
    // B = S = H = KV = hd = 1, Pp = 0: dout 1, probs 1, qkv 3.
    expect(() => ops.attentionBackward(f(1), f(1), f(3), null, null, 0, 1, 1, 1, 1, 1, 1, 1e7)).toThrow(
      "qRows: expected at most S = 1, got 10000000",
    );
    expect(() => ops.attention(f(3), null, null, null, 1, 1, 1, 1, 1, 1, 1)).toThrow(
      "prefixK, prefixV: expected both Float32Arrays when Pp > 0",
    );
    // H = 3 query heads over KV = 2: the kernel read key/value columns past each row before.
    const qkv = f(2 * (3 + 2 * 2) * 4);
    expect(() => ops.attention(qkv, null, null, null, 0, 1, 2, 3, 2, 4, 0.5)).toThrow(
      "H: expected a multiple of KV (2), got 3",
    );
    expect(() => ops.attentionBackward(f(24), f(12), qkv, null, null, 0, 1, 2, 3, 2, 4, 0.5, 2)).toThrow(
      "H: expected a multiple of KV (2), got 3",
    );
  });

  it("thread counts of the CPU peak and GEMM probes are checked like the others", () => {
    const a = addon();
    expect(() => a.fmaPeakGflops(2 ** 31)).toThrow("threads: expected at most 1024");
    const f = (n: number) => new Float32Array(n);
    expect(() => a.gemm(false, false, 1, 1, 1, 1, f(1), 1, f(1), 1, 0, f(1), 1, 5000)).toThrow(
      "threads: expected at most 1024",
    );
  });

  // Workers read copies: an input whose buffer shrinks (or is transferred) while the call runs no longer
  // takes the worker into unmapped memory (before the copies, this test ended the process with SIGSEGV).
  it("an input buffer resized to nothing while a worker runs does not affect the result", async () => {
    const a = addon();
    // ES2024's resizable ArrayBuffer (Node 20 has it; this TypeScript lib does not declare it yet).
    type Resizable = ArrayBuffer & { resize(bytes: number): void };
    const Resizable = ArrayBuffer as unknown as new (
      bytes: number,
      o: { maxByteLength: number },
    ) => Resizable;
    const d = 64,
      n = 20000;
    const q = new Float32Array(3 * d).fill(0.5);
    const buf = new Resizable(n * d * 4, { maxByteLength: n * d * 4 });
    const rows = new Float32Array(buf).fill(1);
    const pending = a.meanDistances(q, rows, d, 1);
    buf.resize(0);
    expect(rows.length).toBe(0);
    for (const v of await pending) expect(v).toBeCloseTo(4, 5); // |0.5 - 1| over 64 dimensions: sqrt(16)
    const vocabBuffer = new Resizable(n * d * 4, { maxByteLength: n * d * 4 });
    const vocab = new Float32Array(vocabBuffer).fill(1);
    vocab[0] = 2;
    const built = new a.NativeKnnIndex();
    const building = built.build(vocab, d, "dot", "cpu", 1);
    vocabBuffer.resize(0);
    await building;
    expect(built.info().rows).toBe(n);
    expect((await built.search(new Float32Array(d).fill(1), 1, 1)).indices[0]).toBe(0);
    built.dispose();
  });
});

describe("forward argument checks", () => {
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 1 });
  });
  afterAll(() => model?.dispose());
  const ids = new Int32Array([1, 2, 3, 4, 5, 6]);

  it("rejects wrong typed-array types and lengths", async () => {
    await expect(
      model.forward({ inputIds: [1, 2, 3] as unknown as Int32Array, batch: 1, seqLen: 3 }),
    ).rejects.toThrow(/inputIds: expected a Int32Array, got Array\(3\)/);
    await expect(model.forward({ inputIds: ids, batch: 2, seqLen: 4 })).rejects.toThrow(
      /inputIds: expected 8 elements, got 6/,
    );
    await expect(
      model.forward({ inputIds: ids, batch: 2, seqLen: 3, attentionMask: new Uint8Array(5) }),
    ).rejects.toThrow(/attentionMask: expected 6 elements/);
    await expect(model.forward({ inputIds: ids, batch: 0, seqLen: 6 })).rejects.toThrow(
      /batch: expected a positive integer/,
    );
  });

  it("rejects ids outside the vocabulary", async () => {
    await expect(model.forward({ inputIds: new Int32Array([1, 500]), batch: 1, seqLen: 2 })).rejects.toThrow(
      /inputIds\[1\] = 500 is outside the vocabulary \[0, 500\)/,
    );
    await expect(model.forward({ inputIds: new Int32Array([-1, 5]), batch: 1, seqLen: 2 })).rejects.toThrow(
      /inputIds\[0\] = -1/,
    );
  });

  it("rejects prompts that are not P x hiddenSize or not finite", async () => {
    await expect(
      model.forward({ inputIds: ids, batch: 1, seqLen: 6, prompt: new Float32Array(95) }),
    ).rejects.toThrow(/prompt: expected P x hiddenSize \(96\)/);
    const bad = new Float32Array(96);
    bad[7] = Number.NaN;
    await expect(model.forward({ inputIds: ids, batch: 1, seqLen: 6, prompt: bad })).rejects.toThrow(
      /prompt\[7\] is NaN/,
    );
  });

  it("rejects bad hidden-state indices", async () => {
    await expect(model.forward({ inputIds: ids, batch: 1, seqLen: 6, hiddenStates: [4] })).rejects.toThrow(
      /hiddenStates\[0\] = 4: expected an integer in 0..3/,
    );
  });

  it("the native layer checks too (bypassing the TypeScript checks)", async () => {
    const native = new (addon().NativeModel)({
      architecture: "llama",
      vocabSize: 10,
      hiddenSize: 8,
      numLayers: 1,
      numHeads: 2,
      numKvHeads: 1,
      headDim: 4,
      intermediateSize: 16,
      maxPositions: 16,
      normEps: 1e-5,
      tiedHead: true,
      attentionBias: false,
      mlpBias: false,
      scaleAttnByInverseLayerIdx: false,
      ropeTheta: 10000,
      ropeType: "default",
      ropeFactor: 1,
      ropeLowFreqFactor: 1,
      ropeHighFreqFactor: 4,
      ropeOriginalMaxPositions: 16,
      threads: 1,
    });
    expect(() => native.forward({ inputIds: new Int32Array([1, 99]), batch: 1, seqLen: 2 })).toThrow(
      /inputIds\[1\] = 99/,
    );
    expect(() =>
      native.forward({ inputIds: new Float32Array(2) as unknown as Int32Array, batch: 1, seqLen: 2 }),
    ).toThrow(/inputIds: expected Int32Array, got Float32Array/);
    expect(() => native.checkComplete()).toThrow(/model weights incomplete; not loaded: .*tok_emb/);
    native.dispose();
    expect(() => native.forward({ inputIds: new Int32Array(2), batch: 1, seqLen: 2 })).toThrow(
      /Model is disposed/,
    );
  });
});

describe("model lifecycle and loading errors", () => {
  const tmp = mkdtempSync(join(tmpdir(), "priortune-errors-"));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it("use after dispose throws", async () => {
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
    model.dispose();
    model.dispose();
    expect(() => model.tokenEmbeddings()).toThrow("Model is disposed");
    await expect(model.forward({ inputIds: new Int32Array(1), batch: 1, seqLen: 1 })).rejects.toThrow(
      "Model is disposed",
    );
  });

  it("names an unsupported architecture", async () => {
    const dir = join(tmp, "arch");
    copyModelDir("gpt2-tiny", dir);
    const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    cfg.architectures = ["BertForMaskedLM"];
    writeFileSync(join(dir, "config.json"), JSON.stringify(cfg));
    await expect(loadModel(dir)).rejects.toThrow(/unsupported architecture 'BertForMaskedLM'/);
  });

  it("names a missing tensor", async () => {
    const dir = join(tmp, "missing");
    copyModelDir("llama-tiny-untied", dir);
    const indexPath = join(dir, "model.safetensors.index.json");
    const index = JSON.parse(readFileSync(indexPath, "utf8"));
    delete index.weight_map["lm_head.weight"];
    writeFileSync(indexPath, JSON.stringify(index));
    // The shard still holds lm_head; drop it from the config's view by pointing at a model without it.
    const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    cfg.num_hidden_layers = 3; // asks for layers.2.*, which no shard holds
    writeFileSync(join(dir, "config.json"), JSON.stringify(cfg));
    await expect(loadModel(dir)).rejects.toThrow(
      /missing tensor\(s\) required by LlamaForCausalLM: layers\.2\./,
    );
  });

  it("rejects an unknown backend and a missing directory", async () => {
    await expect(loadModel(modelDir("gpt2-tiny"), { backend: "tpu" as "cpu" })).rejects.toThrow(
      /backend: expected "auto", "cpu" or "cuda"/,
    );
    await expect(loadModel(join(tmp, "nope"))).rejects.toThrow(/not a directory/);
  });

  it("backend cuda fails with the reason when no usable CUDA model backend exists", async () => {
    await expect(loadModel(modelDir("gpt2-tiny"), { backend: "cuda" })).rejects.toThrow(
      /backend "cuda" is not available: /,
    );
  });
});

describe("optimizer, RNG and file-format checks", () => {
  it("AdamW.step checks every gradient and lr before changing any state", () => {
    const a = Float32Array.from([1, 2]);
    const b = Float32Array.from([3, 4, 5]);
    const opt = new AdamW([a, b], { lr: 0.1 });
    const g = (n: number) => new Float32Array(n).fill(1);
    // A wrong second gradient: before, the first tensor and its moments were updated and stepCount was 1.
    expect(() => opt.step([g(2), g(2)])).toThrow(/grads\[1\]/);
    expect(() => opt.step([g(2), g(3)], Number.NaN)).toThrow("lr: expected a finite number >= 0, got NaN");
    expect(() => opt.step([g(2), g(3)], -1)).toThrow("lr: expected a finite number >= 0, got -1");
    expect(opt.stepCount).toBe(0);
    expect(Array.from(a)).toEqual([1, 2]);
    expect(Array.from(opt.m[0]!)).toEqual([0, 0]);
    opt.step([g(2), g(3)]);
    expect(opt.stepCount).toBe(1);
    expect(a[0]).toBeLessThan(1);
  });

  it("AdamW's lrScale gives each tensor its own rate, as PyTorch's parameter groups", () => {
    const init = [Float32Array.from([1, -2, 3]), Float32Array.from([0.5, 0.25])];
    const grads = [Float32Array.from([0.3, -0.1, 0.2]), Float32Array.from([-0.4, 0.6])];
    const grouped = new AdamW(
      init.map((t) => t.slice()),
      { lr: 0.1, lrScale: [1, 0.2] },
    );
    const alone = [new AdamW([init[0]!.slice()], { lr: 0.1 }), new AdamW([init[1]!.slice()], { lr: 0.02 })];
    for (const lr of [0.1, 0.05, 0.1]) {
      grouped.step(grads, lr);
      alone[0]!.step([grads[0]!], lr);
      alone[1]!.step([grads[1]!], lr * 0.2);
    }
    expect(Array.from(grouped.params[0]!)).toEqual(Array.from(alone[0]!.params[0]!));
    expect(Array.from(grouped.params[1]!)).toEqual(Array.from(alone[1]!.params[0]!));
    expect(() => new AdamW([init[0]!], { lr: 0.1, lrScale: [1, 1] })).toThrow(
      "lrScale: expected 1 finite numbers >= 0 (one per tensor)",
    );
    expect(() => new AdamW([init[0]!], { lr: 0.1, lrScale: [-1] })).toThrow(/lrScale/);
  });

  it("Rng seeds are 32-bit: a wider or negative seed is refused (it repeated another seed's draws)", () => {
    expect(() => new Rng(2 ** 32)).toThrow("seed: expected an integer from 0 to 2^32 - 1, got 4294967296");
    expect(() => new Rng(-1)).toThrow(RangeError);
    expect(new Rng(2 ** 32 - 1).uniform()).toBeGreaterThanOrEqual(0);
  });

  it("safetensors __metadata__ values must be strings", () => {
    const dir = mkdtempSync(join(tmpdir(), "priortune-meta-"));
    try {
      const file = join(dir, "m.safetensors");
      const json = Buffer.from(JSON.stringify({ __metadata__: { step: 5 } }));
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(json.length));
      writeFileSync(file, Buffer.concat([len, json]));
      expect(() => readTensors(file)).toThrow(/__metadata__ is not an object of strings/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("the bindings under a host's conditions", () => {
  it("a worker thread that ends while its call runs ends alone (the process used to abort)", () => {
    // The worker starts a covariance of 12000 x 512 and exits 50 ms later, while the call still runs; its
    // settling then met a torn-down environment and the exception ended the whole process (SIGABRT).
    const worker = `
      const addon = require(${JSON.stringify(addonPath())});
      const x = new Float32Array(12000 * 512).map((_, i) => Math.sin(i));
      addon.analysisCovariance(x, 512, 1);
      setTimeout(() => process.exit(0), 50);`;
    const script = `
      const { Worker } = require("node:worker_threads");
      const w = new Worker(${JSON.stringify(worker)}, { eval: true });
      w.on("exit", (code) => setTimeout(() => console.log("main alive after worker exit " + code), 200));`;
    const r = spawnSync(process.execPath, ["-e", script], { encoding: "utf8", timeout: 60_000 });
    expect(r.stderr).not.toMatch(/terminate called/);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain("main alive after worker exit 0");
  });

  it("typed arrays on a SharedArrayBuffer are read as any other (they failed with 'Invalid argument')", async () => {
    const shared = (n: number) => new Float32Array(new SharedArrayBuffer(4 * n));
    const vocab = shared(4 * 3);
    vocab.set([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]);
    const queries = shared(4);
    queries.set([0.1, 0.9, 0, 0]);
    const index = await VocabIndex.create(vocab, { dim: 4, metric: "cosine", backend: "cpu" });
    try {
      expect([...(await index.search(queries, { k: 1 })).indices]).toEqual([1]);
    } finally {
      index.dispose();
    }
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
    try {
      const ids = new Int32Array(new SharedArrayBuffer(16));
      ids.set([1, 2, 3, 4]);
      const a = await model.forward({ inputIds: ids, batch: 1, seqLen: 4 });
      const b = await model.forward({ inputIds: Int32Array.from(ids), batch: 1, seqLen: 4 });
      expect(Buffer.from(a.logits!.buffer).equals(Buffer.from(b.logits!.buffer))).toBe(true);
    } finally {
      model.dispose();
    }
  });

  it("tokenEmbeddings() during a training step is the table before or after it, never a mix", async () => {
    const model = await loadTrainableModel(modelDir("gpt2-tiny"), { threads: 1 });
    try {
      const trainer = new Pretrainer(model, { lr: 1e-2, weightDecay: 0 });
      const ids = new Int32Array(4 * 32).map((_, i) => (i * 7919) % model.config.vocabSize);
      for (let s = 0; s < 3; s++) {
        const before = model.tokenEmbeddings();
        let done = false;
        const step = trainer.step({ inputIds: ids, batch: 4, seqLen: 32 }).then(() => {
          done = true;
        });
        const copies: Float32Array[] = [];
        while (!done) {
          copies.push(model.tokenEmbeddings());
          await new Promise((r) => setImmediate(r));
        }
        await step;
        const after = model.tokenEmbeddings();
        for (const c of copies) {
          const same = (t: Float32Array) => Buffer.from(c.buffer).equals(Buffer.from(t.buffer));
          expect(same(before) || same(after)).toBe(true);
        }
      }
    } finally {
      model.dispose();
    }
  });

  it("PromptTrainer steps called together run in call order, each from the previous step's prompt", async () => {
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
    try {
      const C = model.config.hiddenSize;
      const prompt = new Float32Array(4 * C).map((_, i) => Math.sin(i) * 0.02);
      const batch = (s: number) => {
        const ids = new Int32Array(16).map((_, i) => (i * 31 + s * 7) % model.config.vocabSize);
        return { inputIds: ids, labels: ids, batch: 1, seqLen: 16 };
      };
      const seq = await model.promptTrainer({ prompt }, { lr: 0.1 });
      const s1 = await seq.step(batch(1));
      const s2 = await seq.step(batch(2));
      const together = await model.promptTrainer({ prompt }, { lr: 0.1 });
      // The second batch's arrays are refilled right after the call: the step uses them as they were.
      const b2 = batch(2);
      const calls = [together.step(batch(1)), together.step(b2), together.tensors()] as const;
      b2.inputIds.fill(0);
      const [c1, c2, t] = await Promise.all(calls);
      expect([c1.loss, c2.loss, c2.step]).toEqual([s1.loss, s2.loss, 2]);
      const p = (await seq.tensors()).prompt!;
      expect(Buffer.from(t.prompt!.buffer).equals(Buffer.from(p.buffer))).toBe(true);
    } finally {
      model.dispose();
    }
  });

  it("a raw NativeModel config without numHeads is a TypeError (it divided by zero: SIGFPE)", () => {
    const script = `
      const addon = require(${JSON.stringify(addonPath())});
      try {
        new addon.NativeModel({ architecture: "gpt2", vocabSize: 10, hiddenSize: 8, numLayers: 1, intermediateSize: 8, maxPositions: 8 });
        console.log("no error");
      } catch (e) { console.log(e.name + ": " + e.message); }`;
    const r = spawnSync(process.execPath, ["-e", script], { encoding: "utf8", timeout: 60_000 });
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe("TypeError: config.numHeads: required (an integer >= 1)");
  });
});
