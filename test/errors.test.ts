// Bad input gets an error that names the argument; nothing aborts the process.
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { nativeConfig, parseConfig } from "../lib/config.js";
import { loadModel, type Model } from "../lib/index.js";
import { createModel, loadTrainableModel } from "../lib/pretrain.js";
import { addon } from "../lib/native.js";
import { modelDir } from "./helpers.js";

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
    rmSync(dir, { recursive: true, force: true });
    copyDir(modelDir("gpt2-tiny"), dir);
    const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    cfg.architectures = ["BertForMaskedLM"];
    writeFileSync(join(dir, "config.json"), JSON.stringify(cfg));
    await expect(loadModel(dir)).rejects.toThrow(/unsupported architecture 'BertForMaskedLM'/);
  });

  it("names a missing tensor", async () => {
    const dir = join(tmp, "missing");
    rmSync(dir, { recursive: true, force: true });
    copyDir(modelDir("llama-tiny-untied"), dir);
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

function copyDir(src: string, dst: string) {
  mkdirSync(dst, { recursive: true });
  for (const f of readdirSync(src)) copyFileSync(join(src, f), join(dst, f));
}
