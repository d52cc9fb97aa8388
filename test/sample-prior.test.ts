// sample-prior without the model: priors that need only the vocabulary matrix and the tokenizer read just the
// token-embedding tensor. Their files must equal, byte for byte, those written with the whole model loaded,
// over every way a checkpoint stores that tensor (F16 under "transformer.", BF16 under "model.", F32 in a
// sharded untied model, and the repo's small model); priors that need activations still load the model.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it, vi } from "vitest";
import { type SamplePriorOptions, samplePrior } from "../lib/cli-sample-prior.js";
import { loadModel, readTokenEmbeddings } from "../lib/model.js";
import { createPrior } from "../lib/priors.js";
import { Rng } from "../lib/rng.js";
import {
  readSafetensorsHeader,
  readTensorFloat32,
  readTensors,
  writeSafetensors,
} from "../lib/safetensors.js";
import { copyModelDir, fixtures, modelDir } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "priortune-sample-prior-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const smallModel = join(dirname(fileURLToPath(import.meta.url)), "..", "models", "priortune-small");
const corpus = join(fixtures, "data", "prose.txt");

type Flags = Omit<Partial<SamplePriorOptions>, "out">;

/** Runs sample-prior (stdout muted) and returns the file it wrote. */
async function sample(model: string, flags: Flags, name: string, loadWholeModel = false): Promise<string> {
  const out = join(dir, `${name}.safetensors`);
  const spy = vi.spyOn(process.stdout, "write").mockImplementation(() => true);
  try {
    const options = { count: 7, seed: 3, threads: 1, backend: "cpu", precision: "fp32", ...flags, out };
    await samplePrior(model, options as SamplePriorOptions, loadWholeModel);
  } finally {
    spy.mockRestore();
  }
  return out;
}

/** stats without the fit's timings (covarianceSeconds, choleskySeconds), which differ from run to run. */
function withoutTimings(stats: string): unknown {
  return Object.fromEntries(Object.entries(JSON.parse(stats)).filter(([k]) => !k.endsWith("Seconds")));
}

const PRIORS: [string, Flags, { timings?: true }][] = [
  ["vocab", { prior: "vocab" }, {}],
  ["vocab frequent", { prior: "vocab", corpus, top: 50 }, {}],
  ["class-label", { prior: "class-label", words: ["keeper", "storm"] }, {}],
  ["knn", { prior: "knn", sampleRows: "300", fitSeed: 2 }, {}],
  ["fitted-gaussian vocab", { prior: "fitted-gaussian", source: "vocab", rows: 400 }, { timings: true }],
  ["exclusion", { prior: "exclusion", rows: 400 }, { timings: true }],
  // A record without its base: the library's default base is the vocabulary's Gaussian.
  ["exclusion spec", { spec: '{"kind":"exclusion","c":3}' }, { timings: true }],
];

const MODELS: [string, string][] = [
  ["gpt2-tiny (F16, transformer.)", modelDir("gpt2-tiny")],
  ["llama-tiny (BF16, model.)", modelDir("llama-tiny")],
  ["llama-tiny-untied (F32, 4 shards)", modelDir("llama-tiny-untied")],
  ["priortune-small", smallModel],
];

describe("sample-prior reads only the vocabulary", () => {
  for (const [modelName, model] of MODELS)
    it(`${modelName}: the same files as with the model loaded`, async () => {
      for (const [i, [priorName, flags, { timings }]] of PRIORS.entries()) {
        const read = await sample(model, flags, `read-${i}`);
        const loaded = await sample(model, flags, `loaded-${i}`, true);
        if (!timings) {
          expect(readFileSync(read).equals(readFileSync(loaded)), `${priorName}: files differ`).toBe(true);
          continue;
        }
        // A fit's statistics hold its timings: everything else must match, the draw bit for bit.
        const a = readTensors(read);
        const b = readTensors(loaded);
        const prompt = (t: typeof a) => Buffer.from((t.tensors.get("prompt")!.data as Float32Array).buffer);
        expect(prompt(a).equals(prompt(b)), `${priorName}: draws differ`).toBe(true);
        expect({ ...a.metadata, stats: withoutTimings(a.metadata.stats!) }).toEqual({
          ...b.metadata,
          stats: withoutTimings(b.metadata.stats!),
        });
      }
    });

  it("a prior over activations still loads the model and draws what the library draws", async () => {
    const texts = join(dir, "texts.txt");
    writeFileSync(texts, readFileSync(corpus, "utf8").split("\n").filter(Boolean).slice(0, 12).join("\n"));
    const out = await sample(
      modelDir("llama-tiny"),
      { prior: "fitted-gaussian", texts, layer: 2, jitterMode: "absolute" },
      "activations",
    );
    const { tensors, metadata } = readTensors(out);
    const record = JSON.parse(metadata.prior!);
    expect(record).toMatchObject({ kind: "fitted-gaussian", source: "activations", layer: 2 });
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 1 });
    try {
      const prior = await createPrior(record, { model, threads: 1 });
      expect(tensors.get("prompt")!.data).toEqual(prior.sample(7, new Rng(3)));
    } finally {
      model.dispose();
    }
  });

  it("reads no weight but the embeddings; an activation prior reads them all", async () => {
    // A NaN in a layer's weight: the loader refuses the model, the vocabulary priors never read that tensor.
    const damaged = copyModelDir("llama-tiny", join(dir, "damaged-layer"));
    const file = join(damaged, "model.safetensors");
    const weight = readSafetensorsHeader(file).tensors.get("model.layers.0.mlp.down_proj.weight")!;
    const fd = openSync(file, "r+");
    writeSync(fd, Buffer.from([0xc0, 0x7f]), 0, 2, weight.offset); // BF16 NaN at [0, 0]
    closeSync(fd);
    const nan = /tensor 'model\.layers\.0\.mlp\.down_proj\.weight' in .*: value NaN at \[0, 0\]/;
    for (const [i, [priorName, flags]] of PRIORS.entries())
      await expect(sample(damaged, flags, `damaged-${i}`), priorName).resolves.toBeTypeOf("string");
    await expect(sample(damaged, { prior: "vocab" }, "damaged-loaded", true)).rejects.toThrow(nan);
    writeFileSync(join(dir, "one.txt"), "The lighthouse keeper\nclimbed the stairs\n");
    await expect(
      sample(damaged, { prior: "fitted-gaussian", texts: join(dir, "one.txt"), layer: 1 }, "damaged-acts"),
    ).rejects.toThrow(nan);
  });

  it("errors name the embedding tensor and its file, as the loader's do", async () => {
    // A vocabulary size that config.json and the tensor disagree on.
    const resized = copyModelDir("llama-tiny", join(dir, "resized"));
    const config = JSON.parse(readFileSync(join(resized, "config.json"), "utf8"));
    writeFileSync(join(resized, "config.json"), JSON.stringify({ ...config, vocab_size: 400 }));
    await expect(sample(resized, { prior: "knn" }, "resized")).rejects.toThrow(
      /tensor 'model\.embed_tokens\.weight' in .*resized\/model\.safetensors has shape \[500,96\], but config\.json implies \[400,96\]/,
    );
    // A NaN in the embeddings: the same message with or without the model.
    const damaged = copyModelDir("llama-tiny", join(dir, "damaged-embeddings"));
    const file = join(damaged, "model.safetensors");
    const emb = readSafetensorsHeader(file).tensors.get("model.embed_tokens.weight")!;
    const fd = openSync(file, "r+");
    writeSync(fd, Buffer.from([0x80, 0x7f]), 0, 2, emb.offset + 2 * (7 * 96 + 5)); // BF16 +inf at [7, 5]
    closeSync(fd);
    const message =
      /^tensor 'model\.embed_tokens\.weight' in .*damaged-embeddings\/model\.safetensors: value infinite at \[7, 5\] \(weights must be finite: the file is damaged\)$/;
    await expect(sample(damaged, { prior: "vocab" }, "inf-read")).rejects.toThrow(message);
    await expect(sample(damaged, { prior: "vocab" }, "inf-loaded", true)).rejects.toThrow(message);
  });
});

describe("readTensorFloat32", () => {
  it("widens every finite F16 value exactly, and rounds F64 to the nearest float", () => {
    // Every F16 bit pattern but the infinities and NaNs, written as raw safetensors.
    const halves = Uint16Array.from({ length: 65536 }, (_, h) => h).filter((h) => (h & 0x7c00) !== 0x7c00);
    const json = JSON.stringify({
      h: { dtype: "F16", shape: [halves.length], data_offsets: [0, halves.byteLength] },
    });
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    const f16 = join(dir, "f16.safetensors");
    writeFileSync(f16, Buffer.concat([len, Buffer.from(json), Buffer.from(halves.buffer)]));
    const got = readTensorFloat32(readSafetensorsHeader(f16).tensors.get("h")!);
    // The value of each pattern by its definition (IEEE 754 binary16).
    halves.forEach((h, i) => {
      const sign = h & 0x8000 ? -1 : 1;
      const exp = (h >> 10) & 0x1f;
      const man = h & 0x3ff;
      const want = exp === 0 ? sign * man * 2 ** -24 : sign * (1 + man / 1024) * 2 ** (exp - 15);
      if (!Object.is(got[i], want))
        expect(`${h.toString(16)} -> ${got[i]}`).toBe(`${h.toString(16)} -> ${want}`);
    });
    const wide = Float64Array.of(1 / 3, -2.5e-40, 3.4e38, 1 + 2 ** -24, 1 + 3 * 2 ** -24);
    const f64 = join(dir, "f64.safetensors");
    writeSafetensors(f64, [{ name: "w", dtype: "F64", shape: [5], data: wide }]);
    expect(readTensorFloat32(readSafetensorsHeader(f64).tensors.get("w")!)).toEqual(Float32Array.from(wide));
  });

  it("readTokenEmbeddings gives the loaded model's embeddings bit for bit (F16, BF16, sharded F32)", async () => {
    const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
    for (const name of ["gpt2-tiny", "llama-tiny", "llama-tiny-untied"]) {
      const { config, vocab: read } = readTokenEmbeddings(modelDir(name));
      expect(read.length).toBe(config.vocabSize * config.hiddenSize);
      const model = await loadModel(modelDir(name), { backend: "cpu", threads: 1 });
      try {
        expect(bits(read).equals(bits(model.tokenEmbeddings())), name).toBe(true);
      } finally {
        model.dispose();
      }
    }
  });
});
