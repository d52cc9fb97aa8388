// Loading a Hugging Face directory a user downloaded: damaged or inconsistent files are errors that name the
// file and tensor (never garbage weights), config options we implement are honoured, and a tokenizer that
// cannot be read does not stop the model from loading.
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parseConfig } from "../lib/config.js";
import { loadModel } from "../lib/model.js";
import { addon } from "../lib/native.js";
import { hfConfigJson } from "../lib/pretrain.js";
import {
  readSafetensorsHeader,
  readTensors,
  type TensorToWrite,
  writeSafetensors,
} from "../lib/safetensors.js";
import { byteLevelBpeJson } from "../lib/tokenizer.js";
import { copyModelDir, modelDir } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "priortune-loading-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const copyModel = (name: string, as: string) => copyModelDir(name, join(tmp, as));

const editJson = (path: string, edit: (j: Record<string, unknown>) => void) => {
  const j = JSON.parse(readFileSync(path, "utf8"));
  edit(j);
  writeFileSync(path, JSON.stringify(j));
};

/** A safetensors file with the given raw header object and `bytes` bytes of zero data. */
function rawSafetensors(path: string, header: unknown, bytes: number) {
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, Buffer.alloc(bytes)]));
}

/** Rewrites a model file as F32 after `edit` changes its tensors (by name). */
function rewrite(file: string, edit: (name: string, data: Float32Array) => void) {
  const { tensors, metadata } = readTensors(file);
  const out: TensorToWrite[] = [];
  for (const [name, t] of tensors) {
    const data = Float32Array.from(t.data as Float32Array);
    edit(name, data);
    out.push({ name, dtype: "F32", shape: t.shape, data });
  }
  writeSafetensors(file, out, metadata);
}

describe("safetensors headers", () => {
  it("tensors must tile the data: overlaps, gaps and offsets before the data are refused", () => {
    const f = join(tmp, "bad.safetensors");
    const t = (begin: number, end: number) => ({ dtype: "F32", shape: [2], data_offsets: [begin, end] });
    rawSafetensors(f, { a: t(0, 8), b: t(0, 8) }, 16); // b aliases a
    expect(() => readSafetensorsHeader(f)).toThrow(/tensor '(a|b)' starts at data byte 0, expected 8/);
    rawSafetensors(f, { a: t(0, 8), b: t(16, 24) }, 24); // a gap
    expect(() => readSafetensorsHeader(f)).toThrow(/tensor 'b' starts at data byte 16, expected 8/);
    rawSafetensors(f, { a: t(-8, 0) }, 8);
    expect(() => readSafetensorsHeader(f)).toThrow(/tensor 'a': data_offsets \[-8,0\] is not \[begin, end\]/);
    rawSafetensors(f, { a: t(0, 8) }, 16); // bytes nobody owns at the end
    expect(() => readSafetensorsHeader(f)).toThrow(/the tensors cover 8 of the 16 data bytes/);
    rawSafetensors(f, { a: { dtype: "F32", data_offsets: [0, 8] } }, 8);
    expect(() => readSafetensorsHeader(f)).toThrow(/tensor 'a': shape undefined is not a list/);
    rawSafetensors(f, null, 0);
    expect(() => readSafetensorsHeader(f)).toThrow(/header is not a JSON object/);
    // An unknown dtype on a tensor the model may not need is kept (its bytes still checked).
    rawSafetensors(f, { a: t(0, 8), odd: { dtype: "X9", shape: [3], data_offsets: [8, 11] } }, 11);
    expect(readSafetensorsHeader(f).tensors.get("odd")?.byteLength).toBe(3);
  });

  it("a shard holding a tensor the index maps elsewhere is refused; a single file wins over an index", async () => {
    const dir = copyModel("llama-tiny-untied", "shards");
    const index = JSON.parse(readFileSync(join(dir, "model.safetensors.index.json"), "utf8"));
    const home = index.weight_map["model.embed_tokens.weight"] as string;
    const other = (Object.values(index.weight_map) as string[]).find((s) => s !== home)!;
    const extra = readTensors(join(dir, home)).tensors.get("model.embed_tokens.weight")!;
    const { tensors, metadata } = readTensors(join(dir, other));
    const list: TensorToWrite[] = [...tensors].map(([name, t]) => ({
      name,
      dtype: "F32",
      shape: t.shape,
      data: Float32Array.from(t.data as Float32Array),
    }));
    list.push({
      name: "model.embed_tokens.weight",
      dtype: "F32",
      shape: extra.shape,
      data: extra.data as Float32Array,
    });
    writeSafetensors(join(dir, other), list, metadata);
    await expect(loadModel(dir, { backend: "cpu", threads: 1 })).rejects.toThrow(
      `maps tensor 'model.embed_tokens.weight' to ${home}, but ${other} holds it too`,
    );
    // With a model.safetensors beside the (broken) index, the single file is what loads, as in Transformers.
    copyFileSync(join(modelDir("llama-tiny"), "model.safetensors"), join(dir, "model.safetensors"));
    copyFileSync(join(modelDir("llama-tiny"), "config.json"), join(dir, "config.json"));
    const single = await loadModel(dir, { backend: "cpu", threads: 1 });
    const reference = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 1 });
    expect(
      Buffer.from(single.tokenEmbeddings().buffer).equals(Buffer.from(reference.tokenEmbeddings().buffer)),
    ).toBe(true);
    single.dispose();
    reference.dispose();
  });
});

describe("config and weights agree", () => {
  it("a tensor whose shape the config does not imply is named (GQA config without num_key_value_heads)", async () => {
    const dir = copyModel("llama-tiny", "no-kv");
    editJson(join(dir, "config.json"), (c) => {
      delete c.num_key_value_heads;
    });
    await expect(loadModel(dir, { backend: "cpu", threads: 1 })).rejects.toThrow(
      /tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' in .* has shape \[32,96\], but config\.json implies \[96,96\]/,
    );
  });

  it("Llama heads that do not divide the hidden size need head_dim", () => {
    expect(() =>
      parseConfig({
        architectures: ["LlamaForCausalLM"],
        vocab_size: 10,
        hidden_size: 96,
        num_attention_heads: 5,
        num_hidden_layers: 1,
        intermediate_size: 8,
      }),
    ).toThrow("hidden_size (96) is not a multiple of num_attention_heads (5) and no head_dim is given");
  });

  it("GPT-2's scale_attn_by_inverse_layer_idx: the same as q scaled by 1 / (l + 1) in each layer", async () => {
    // The score q.k / sqrt(hd) / (l + 1) equals (q / (l + 1)).k / sqrt(hd): a model with the flag and one
    // without it whose q weights and biases are divided by l + 1 give the same logits.
    const flagged = copyModel("gpt2-tiny", "inverse-flag");
    editJson(join(flagged, "config.json"), (c) => {
      c.scale_attn_by_inverse_layer_idx = true;
    });
    const scaled = copyModel("gpt2-tiny", "inverse-weights");
    const C = (JSON.parse(readFileSync(join(scaled, "config.json"), "utf8")) as { n_embd: number }).n_embd;
    rewrite(join(scaled, "model.safetensors"), (name, data) => {
      const m = /h\.(\d+)\.attn\.c_attn\.(weight|bias)$/.exec(name);
      if (!m) return;
      const s = 1 / (Number(m[1]) + 1);
      if (m[2] === "bias") for (let j = 0; j < C; j++) data[j] *= s;
      else for (let r = 0; r < C; r++) for (let j = 0; j < C; j++) data[r * 3 * C + j] *= s; // Conv1D [C, 3C]
    });
    const plain = copyModel("gpt2-tiny", "inverse-none");
    rewrite(join(plain, "model.safetensors"), () => {}); // the same F32 weights, unscaled
    const ids = new Int32Array([5, 17, 3, 99, 42, 7, 250, 1]);
    const logits = async (dir: string) => {
      const model = await loadModel(dir, { backend: "cpu", threads: 1 });
      try {
        return (await model.forward({ inputIds: ids, batch: 1, seqLen: ids.length })).logits!;
      } finally {
        model.dispose();
      }
    };
    const [a, b, c] = [await logits(flagged), await logits(scaled), await logits(plain)];
    let diff = 0;
    let effect = 0;
    for (let i = 0; i < a.length; i++) {
      diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
      effect = Math.max(effect, Math.abs(a[i]! - c[i]!));
    }
    expect(diff).toBeLessThan(1e-4);
    expect(effect).toBeGreaterThan(1e-3); // the flag was ignored before: logits equal to the plain model's
  });

  it("a saved config keeps the sliding window and the GPT-2 layer-scaling flag", () => {
    const llama = parseConfig({
      architectures: ["MistralForCausalLM"],
      vocab_size: 10,
      hidden_size: 8,
      num_attention_heads: 2,
      num_hidden_layers: 1,
      intermediate_size: 8,
      sliding_window: 16,
    });
    expect(parseConfig(hfConfigJson(llama)).slidingWindow).toBe(16);
    // Mistral's config class: written as model_type "mistral" (Transformers builds the class with the
    // window from it: "llama" built one without), an absent window is its default 4096 (it was none), an
    // explicit null no window, written back as null (absent would read as 4096).
    expect(hfConfigJson(llama).model_type).toBe("mistral");
    const { sliding_window: _, ...noKey } = { ...hfConfigJson(llama) };
    expect(parseConfig(noKey).slidingWindow).toBe(4096);
    expect(parseConfig({ ...noKey, max_position_embeddings: undefined }).maxPositions).toBe(131072);
    const unwindowed = parseConfig({ ...noKey, sliding_window: null });
    expect(unwindowed.slidingWindow).toBeUndefined();
    expect(hfConfigJson(unwindowed).sliding_window).toBeNull();
    expect(parseConfig(hfConfigJson(unwindowed)).slidingWindow).toBeUndefined();
    // model_type decides where given (an earlier saveModel wrote "llama" beside the Mistral name: no window).
    expect(parseConfig({ ...noKey, model_type: "llama" }).slidingWindow).toBeUndefined();
    const plainLlama = parseConfig({ ...noKey, architectures: ["LlamaForCausalLM"], model_type: "llama" });
    expect([plainLlama.slidingWindow, hfConfigJson(plainLlama).model_type]).toEqual([undefined, "llama"]);
    expect("sliding_window" in hfConfigJson(plainLlama)).toBe(false);
    const gpt2 = parseConfig({
      architectures: ["GPT2LMHeadModel"],
      vocab_size: 10,
      n_embd: 8,
      n_head: 2,
      n_layer: 1,
      n_positions: 16,
      scale_attn_by_inverse_layer_idx: true,
    });
    expect(parseConfig(hfConfigJson(gpt2)).scaleAttnByInverseLayerIdx).toBe(true);
  });
});

describe("config values that would give garbage", () => {
  const llama = {
    architectures: ["LlamaForCausalLM"],
    vocab_size: 10,
    hidden_size: 8,
    num_attention_heads: 2,
    num_hidden_layers: 1,
    intermediate_size: 8,
  };
  it("RoPE theta and factors must be > 0, low < high frequency factor; norm eps >= 0; window a positive integer", () => {
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ rope_theta: 0 }, /"rope_theta" must be > 0, got 0/],
      [{ rope_scaling: { rope_type: "linear", factor: 0 } }, /"factor" must be > 0, got 0/],
      [{ rope_parameters: { rope_type: "linear", rope_theta: -1, factor: 2 } }, /"rope_theta" must be > 0/],
      [
        {
          rope_scaling: {
            rope_type: "llama3",
            factor: 8,
            low_freq_factor: 4,
            high_freq_factor: 1,
            original_max_position_embeddings: 16,
          },
        },
        /"high_freq_factor" \(1\) must exceed "low_freq_factor" \(4\)/,
      ],
      [{ rms_norm_eps: -1 }, /"rms_norm_eps" must be >= 0, got -1/],
      [{ sliding_window: 0 }, /"sliding_window" must be a positive integer or null, got 0/],
      [{ sliding_window: 2.5 }, /"sliding_window" must be a positive integer or null, got 2\.5/],
    ];
    for (const [extra, message] of bad) expect(() => parseConfig({ ...llama, ...extra })).toThrow(message);
    expect(parseConfig({ ...llama, sliding_window: null }).slidingWindow).toBeUndefined();
  });

  it("a NaN or infinite weight is refused at load, naming the tensor and element", async () => {
    // Before: it loaded, and the attention softmax passed over the NaN scores it made: finite, wrong logits.
    const dir = copyModel("llama-tiny", "nan-k");
    rewrite(join(dir, "model.safetensors"), (name, data) => {
      if (name === "model.layers.0.self_attn.k_proj.weight") data[3 * 96 + 5] = Number.NaN;
      if (name === "model.layers.1.mlp.up_proj.weight") data[7] = Number.POSITIVE_INFINITY;
    });
    await expect(loadModel(dir, { backend: "cpu", threads: 1 })).rejects.toThrow(
      /tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' in .*model\.safetensors: value NaN at \[3, 5\] \(weights must be finite/,
    );
  });

  it("a NaN attention score makes the row NaN, as in PyTorch (the CPU softmax passed over it)", () => {
    const { ops } = addon();
    // B = 1, S = 2, H = KV = 1, hd = 2: the second query's score against key 0 is NaN.
    const qkv = Float32Array.from([1, 0, Number.NaN, 0, 0, 1, 1, 1, 0, 1, 2, 2]);
    const [out] = ops.attention(qkv, null, null, null, 0, 1, 2, 1, 1, 2, 1);
    expect(Array.from(out.subarray(0, 2)).every(Number.isNaN)).toBe(true); // row 0 sees key 0 (NaN)
    expect(Array.from(out.subarray(2, 4)).every(Number.isNaN)).toBe(true);
  });

  it("the sliding window counts hidden deep prompt rows and generated tokens", async () => {
    const dir = copyModel("llama-tiny", "window");
    editJson(join(dir, "config.json"), (c) => {
      c.architectures = ["MistralForCausalLM"];
      c.sliding_window = 10;
    });
    const model = await loadModel(dir, { backend: "cpu", threads: 1 });
    try {
      const C = model.config.hiddenSize;
      const inputIds = new Int32Array(8).fill(3);
      const base = { inputIds, batch: 1, seqLen: 8 };
      await expect(model.generate({ ...base, maxNewTokens: 3 })).resolves.toHaveLength(3); // 8 + 2 fed back
      await expect(model.generate({ ...base, maxNewTokens: 8 })).rejects.toThrow(
        /sequence of 15 positions \(prompt, tokens, generated tokens\) exceeds the sliding window \(10\)/,
      );
      const deepPrompts = { kind: "hidden" as const, layers: [0], vectors: [new Float32Array(4 * C)] };
      await expect(model.forward({ ...base, deepPrompts })).rejects.toThrow(
        /sequence of 12 positions \(prompt, tokens, deep prompt rows\) exceeds the sliding window/,
      );
    } finally {
      model.dispose();
    }
  });

  it("GPT-2 generation may use the last position: the last new token takes none", async () => {
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 }); // 64 positions
    try {
      const inputIds = new Int32Array(58).fill(3);
      const got = await model.generate({ inputIds, batch: 1, seqLen: 58, maxNewTokens: 7 }); // 58 + 6 = 64
      expect(got).toHaveLength(7);
      await expect(model.generate({ inputIds, batch: 1, seqLen: 58, maxNewTokens: 8 })).rejects.toThrow(
        /seqLen 58 \+ 7 generated exceeds the model's 64 positions/,
      );
    } finally {
      model.dispose();
    }
  });
});

describe("tokenizers", () => {
  it("merges.txt with CRLF line endings gives the same tokenizer as with LF", () => {
    const vocab = { a: 0, b: 1, ab: 2 };
    const lf = byteLevelBpeJson(vocab, "#version: 0.2\na b\n");
    const crlf = byteLevelBpeJson(vocab, "#version: 0.2\r\na b\r\n");
    expect(crlf).toEqual(lf);
  });

  it("a tokenizer that cannot be read is left out with a warning; the model still loads", async () => {
    const dir = copyModel("llama-tiny", "bad-tokenizer");
    writeFileSync(join(dir, "tokenizer.json"), "{ not json");
    const warnings: string[] = [];
    const model = await loadModel(dir, {
      backend: "cpu",
      threads: 1,
      logger: (level, m) => level === "warn" && warnings.push(m),
    });
    expect(model.tokenizer).toBeNull();
    expect(warnings.join("\n")).toMatch(/tokenizer not loaded \(.*tokenizer\.json: not valid JSON/);
    model.dispose();
  });
});
