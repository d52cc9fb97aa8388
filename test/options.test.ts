// Options objects of the public API: a misspelt key is refused (naming it, with the close match), a
// non-object options argument is refused, and a known key set to undefined still means its default. Also the
// argument checks that run before any work (tune's deep settings, evaluatePrompt's counts), the copies taken
// of callers' arrays, disposed models, and the per-model queue of native calls.
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { captureActivations } from "../lib/activations.js";
import {
  convergenceByRun,
  fitGaussian,
  kMeans,
  linearProbe,
  lossCurve,
  mmd,
  type RunMetrics,
  randomWalkTrajectories,
} from "../lib/analysis.js";
import { cudaSelfTest } from "../lib/backend.js";
import { collapseReport, createCollapseReference } from "../lib/collapse.js";
import { encodeExample, generateArithmetic, generateCloze, generateQaFacts } from "../lib/index.js";
import { nearestNeighbors, VocabIndex } from "../lib/knn.js";
import { loadModel, type Model } from "../lib/model.js";
import { AdamW } from "../lib/optim.js";
import { createModel, Pretrainer, saveModel } from "../lib/pretrain.js";
import { createPrior, datasetActivations, type Prior } from "../lib/priors.js";
import { pca, tsne, umap } from "../lib/projection.js";
import { buildReport } from "../lib/report.js";
import { loadTask, parseTaskSpec, type Task } from "../lib/tasks.js";
import { evaluatePrompt, type TuneOptions, tune } from "../lib/train.js";
import { checkOptions, suggestKey } from "../lib/validate.js";
import { modelDir } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "priortune-options-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// Options as a plain-JavaScript caller may write them (any key, any value).
// biome-ignore lint/suspicious/noExplicitAny: deliberately untyped options
type Loose = any;

/** A matcher for the unknown-key error: names the key, and the suggestion when one is expected. */
const unknownKey = (key: string, hint?: string) =>
  new RegExp(
    `unknown option "${key}"${hint ? ` \\(did you mean "${hint}"\\?\\)` : ""}`.replace(/[[\]]/g, "\\$&"),
  );

function seededRows(n: number, dim: number, seed = 1): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n * dim }, () => {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    return s / 2 ** 31 - 0.5;
  });
}

describe("checkOptions", () => {
  const known = { lr: true, weightDecay: true, maxGradNorm: true, eosId: true, minDelta: true } as const;
  it("undefined is {}; non-objects are a TypeError naming the argument", () => {
    expect(checkOptions(undefined, "f options", known)).toEqual({});
    expect(() => checkOptions("l2" as Loose, "options", known)).toThrow(
      new TypeError("options: expected an object, got string l2"),
    );
    for (const bad of [null, 3, [1], () => 1, new Float32Array(2)])
      expect(() => checkOptions(bad as Loose, "f options", known)).toThrow(
        /^f options: expected an object, got /,
      );
  });
  it("an unknown key names it, the known keys and a close match; undefined values of known keys pass", () => {
    expect(() => checkOptions({ learningRate: 1 } as Loose, "f options", known)).toThrow(
      /^f options: unknown option "learningRate" \(did you mean "lr"\?\); known: lr, weightDecay, maxGradNorm, eosId, minDelta$/,
    );
    expect(() => checkOptions({ lr: 1, weight_decay: 1 } as Loose, "f options", known)).toThrow(
      unknownKey("weight_decay", "weightDecay"),
    );
    // A misspelt key is refused whatever its value.
    expect(() => checkOptions({ eos_id: undefined } as Loose, "f options", known)).toThrow(
      unknownKey("eos_id", "eosId"),
    );
    const given = { lr: undefined, minDelta: 0.1 };
    expect(checkOptions(given, "f options", known)).toBe(given);
  });
  it("suggests case, snake_case, edit-distance, abbreviation and cross-function aliases", () => {
    expect(suggestKey("clipNorm", ["lr", "maxGradNorm"])).toBe("maxGradNorm");
    expect(suggestKey("maxGradNorm", ["clipNorm", "lr"])).toBe("clipNorm");
    expect(suggestKey("jitter", ["ridgeRelative", "shrinkage"])).toBe("ridgeRelative");
    expect(suggestKey("covarianceJitter", ["ridgeRelative"])).toBe("ridgeRelative");
    expect(suggestKey("jitter", ["covarianceJitter", "seed"])).toBe("covarianceJitter");
    expect(suggestKey("evalevery", ["evalEvery", "steps"])).toBe("evalEvery");
    expect(suggestKey("attention_mask", ["attentionMask", "inputIds"])).toBe("attentionMask");
    expect(suggestKey("bandwith", ["bandwidth", "seed"])).toBe("bandwidth");
    expect(suggestKey("levle", ["level", "source"])).toBe("level");
    expect(suggestKey("maxIter", ["maxIterations", "k"])).toBe("maxIterations");
    expect(suggestKey("nComponents", ["components", "method"])).toBe("components");
    expect(suggestKey("n_neighbors", ["neighbors", "epochs"])).toBe("neighbors");
    expect(suggestKey("nIter", ["iterations", "theta"])).toBe("iterations");
    expect(suggestKey("warmup", ["warmupSteps", "lr"])).toBe("warmupSteps");
    expect(suggestKey("template", ["digits", "count"])).toBeUndefined();
  });
});

describe("cudaSelfTest", () => {
  it("refuses a misspelt key before looking for a device", async () => {
    await expect(cudaSelfTest({ part: ["gemm"] } as Loose)).rejects.toThrow(
      /cudaSelfTest options: unknown option "part" \(did you mean "parts"\?\)/,
    );
  });
});

describe("models: forward, lossAndGrad, generate, promptTrainer, loadModel", () => {
  let model: Model;
  const d = () => model.config.hiddenSize;
  const batch = () => ({ inputIds: new Int32Array([1, 2, 3, 4]), batch: 1, seqLen: 4 });
  beforeAll(async () => {
    model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
  });
  afterAll(() => model?.dispose());

  it("refuses misspelt keys, naming them", async () => {
    const prompt = new Float32Array(2 * d()).fill(0.01);
    await expect(model.forward({ ...batch(), deepPrompt: {} } as Loose)).rejects.toThrow(
      unknownKey("deepPrompt", "deepPrompts"),
    );
    await expect(model.forward({ ...batch(), attention_mask: new Uint8Array(4) } as Loose)).rejects.toThrow(
      unknownKey("attention_mask", "attentionMask"),
    );
    await expect(
      model.lossAndGrad({ ...batch(), prompt, Labels: new Int32Array([1, 2, 3, 4]) } as Loose),
    ).rejects.toThrow(unknownKey("Labels", "labels"));
    await expect(model.generate({ ...batch(), maxNewTokens: 2, eos_id: 0 } as Loose)).rejects.toThrow(
      unknownKey("eos_id", "eosId"),
    );
    await expect(model.promptTrainer({ prompt }, { lr: 0.1, clipNorm: 1 } as Loose)).rejects.toThrow(
      unknownKey("clipNorm", "maxGradNorm"),
    );
    await expect(model.promptTrainer({ prompt }, { lr: 0.1, weight_decay: 0 } as Loose)).rejects.toThrow(
      unknownKey("weight_decay", "weightDecay"),
    );
    await expect(model.promptTrainer({ promt: prompt } as Loose, { lr: 0.1 })).rejects.toThrow(
      unknownKey("promt", "prompt"),
    );
    const trainer = await model.promptTrainer({ prompt }, { lr: 0.1 });
    await expect(
      trainer.step({ ...batch(), labels: new Int32Array([1, 2, 3, 4]), lables: 1 } as Loose),
    ).rejects.toThrow(unknownKey("lables", "labels"));
    for (const [key, hint] of [
      ["thread", "threads"],
      ["backed", "backend"],
      ["precison", "precision"],
    ])
      await expect(loadModel(modelDir("gpt2-tiny"), { [key!]: "cpu" } as Loose)).rejects.toThrow(
        unknownKey(key!, hint),
      );
  });

  it("refuses non-object options, naming the argument", async () => {
    await expect(model.forward("x" as Loose)).rejects.toThrow(/^forward options: expected an object/);
    await expect(model.generate(null as Loose)).rejects.toThrow(/^generate options: expected an object/);
    await expect(model.promptTrainer({ prompt: new Float32Array(d()) }, undefined as Loose)).rejects.toThrow(
      new TypeError("promptTrainer options: expected an object, got undefined"),
    );
    await expect(loadModel(modelDir("gpt2-tiny"), null as Loose)).rejects.toThrow(
      new TypeError("loadModel options: expected an object, got null"),
    );
    await expect(loadModel(modelDir("gpt2-tiny"), "cpu" as Loose)).rejects.toThrow(
      /^loadModel options: expected an object, got string cpu/,
    );
  });

  it("undefined values mean the default", async () => {
    const plain = await model.forward(batch());
    const same = await model.forward({
      ...batch(),
      attentionMask: undefined,
      prompt: undefined,
      hiddenStates: undefined,
      logits: undefined,
    });
    expect(same.logits).toEqual(plain.logits);
    const ids = await model.generate({ ...batch(), maxNewTokens: 2, eosId: undefined });
    expect(ids).toEqual(await model.generate({ ...batch(), maxNewTokens: 2 }));
    const loaded = await loadModel(modelDir("gpt2-tiny"), {
      backend: "cpu",
      threads: undefined,
      logger: undefined,
      precision: undefined,
    });
    expect(loaded.threads).toBeGreaterThan(0);
    loaded.dispose();
  });

  it("concurrent calls on one model queue in JS and give the sequential results; arrays are copied", async () => {
    const n = 12;
    const inputs = Array.from({ length: n }, (_, i) => new Int32Array([1 + i, 2, 3 + (i % 5), 4]));
    const sequential: Float32Array[] = [];
    for (const inputIds of inputs) sequential.push((await model.forward({ ...batch(), inputIds })).logits!);
    const prompt = new Float32Array(2 * d()).fill(0.02);
    const labels = new Int32Array([1, 2, 3, 4]);
    const gradBefore = await model.lossAndGrad({ ...batch(), prompt, labels });
    const genBefore = await model.generate({ ...batch(), maxNewTokens: 3 });
    // All at once, with the caller's arrays overwritten right after the calls.
    const pending = inputs.map((inputIds) => model.forward({ ...batch(), inputIds }));
    const grad = model.lossAndGrad({ ...batch(), prompt, labels });
    const genIds = batch().inputIds;
    const gen = model.generate({ ...batch(), inputIds: genIds, maxNewTokens: 3 });
    for (const a of inputs) a.fill(0);
    prompt.fill(5);
    genIds.fill(7);
    const results = await Promise.all(pending);
    results.forEach((r, i) => {
      expect(r.logits).toEqual(sequential[i]);
    });
    expect((await grad).loss).toBe(gradBefore.loss);
    expect((await grad).promptGrad).toEqual(gradBefore.promptGrad);
    expect(await gen).toEqual(genBefore);
    // A failing call in the queue does not stop the ones after it.
    const bad = model.forward({ ...batch(), seqLen: 5 });
    const after = model.forward(batch());
    await expect(bad).rejects.toThrow(/inputIds/);
    expect((await after).logits).toEqual((await model.forward(batch())).logits);
  });

  it("calls made before dispose() complete; calls after it are refused", async () => {
    const m = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
    const ids = Int32Array.from([5, 6, 7, 8]);
    const want = await m.forward({ inputIds: ids, batch: 1, seqLen: 4 });
    const made = m.forward({ inputIds: ids, batch: 1, seqLen: 4 });
    const generated = m.generate({ inputIds: ids, batch: 1, seqLen: 4, maxNewTokens: 2 });
    m.dispose();
    expect((await made).logits).toEqual(want.logits);
    expect(await generated).toHaveLength(2);
    await expect(m.forward({ inputIds: ids, batch: 1, seqLen: 4 })).rejects.toThrow("Model is disposed");
  });

  it("a disposed model: deviceMemory, deviceProfile and new Pretrainer throw", async () => {
    const cpu = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
    expect(cpu.deviceMemory()).toBeNull();
    expect(cpu.deviceProfile()).toBeNull();
    cpu.dispose();
    expect(() => cpu.deviceMemory()).toThrow("Model is disposed");
    expect(() => cpu.deviceProfile()).toThrow("Model is disposed");
    const trainable = await createModel(modelDir("llama-tiny"), { seed: 1, threads: 1 });
    trainable.dispose();
    expect(() => new Pretrainer(trainable, { lr: 1e-3 })).toThrow("Model is disposed");
  });
});

describe("AdamW, Pretrainer, createModel, saveModel", () => {
  it("refuse misspelt keys and non-objects; undefined values are defaults", async () => {
    const p = new Float32Array(4);
    expect(() => new AdamW([p], { lr: 0.1, weight_decay: 0 } as Loose)).toThrow(
      unknownKey("weight_decay", "weightDecay"),
    );
    expect(() => new AdamW([p], { lr: 0.1, clipNorm: 1 } as Loose)).toThrow(unknownKey("clipNorm"));
    expect(() => new AdamW([p], "fast" as Loose)).toThrow(/^AdamW options: expected an object/);
    expect(new AdamW([p], { lr: 0.1, weightDecay: undefined, lrScale: undefined }).weightDecay).toBe(0.01);

    await expect(createModel(modelDir("llama-tiny"), { init_std: 0.02 } as Loose)).rejects.toThrow(
      unknownKey("init_std", "initStd"),
    );
    await expect(createModel(modelDir("llama-tiny"), "seed" as Loose)).rejects.toThrow(
      /^createModel options: expected an object/,
    );
    const model = await createModel(modelDir("llama-tiny"), { seed: 1, threads: 1, initStd: undefined });
    try {
      expect(() => new Pretrainer(model, { lr: 1e-3, clipNorm: 1 } as Loose)).toThrow(
        unknownKey("clipNorm", "maxGradNorm"),
      );
      expect(() => new Pretrainer(model, { lr: 1e-3, lrScale: [1] } as Loose)).toThrow(unknownKey("lrScale"));
      const trainer = new Pretrainer(model, { lr: 1e-3, maxGradNorm: undefined, beta2: undefined });
      await expect(
        trainer.step({ inputIds: new Int32Array([1, 2]), batch: 1, seqLen: 2, label: 1 } as Loose),
      ).rejects.toThrow(unknownKey("label", "labels"));
      expect((await trainer.step({ inputIds: new Int32Array([1, 2]), batch: 1, seqLen: 2 })).step).toBe(1);

      const out = join(tmp, "saved");
      expect(() => saveModel(model, out, { tokenizer_dir: modelDir("llama-tiny") } as Loose)).toThrow(
        unknownKey("tokenizer_dir", "tokenizerDir"),
      );
      expect(() => saveModel(model, out, null as Loose)).toThrow(/^saveModel options: expected an object/);
      // (d) A tokenizerDir holding no tokenizer is refused before anything is written.
      expect(() => saveModel(model, out, { tokenizerDir: join(tmp, "no-such-dir") })).toThrow(
        /tokenizerDir: .*no-such-dir holds no tokenizer/,
      );
      expect(existsSync(out)).toBe(false);
      saveModel(model, out, { tokenizerDir: undefined, tokenizer: undefined });
      expect(existsSync(join(out, "model.safetensors"))).toBe(true);
    } finally {
      model.dispose();
    }
  });
});

describe("nearest-neighbour search", () => {
  const dim = 4;
  const vocab = seededRows(10, dim);
  it("refuses misspelt keys, naming them; undefined values are defaults", async () => {
    await expect(VocabIndex.create(vocab, { dim, metrc: "l2" } as Loose)).rejects.toThrow(
      unknownKey("metrc", "metric"),
    );
    await expect(
      nearestNeighbors(vocab.subarray(0, dim), vocab, { dim, k: 1, Metric: "l2" } as Loose),
    ).rejects.toThrow(unknownKey("Metric", "metric"));
    const index = await VocabIndex.create(vocab, {
      dim,
      backend: "cpu",
      metric: undefined,
      threads: undefined,
    });
    try {
      expect(index.metric).toBe("cosine");
      await expect(index.selfSearch({ k: 1, row: [0] } as Loose)).rejects.toThrow(unknownKey("row", "rows"));
      await expect(index.search(vocab, { k: 1, K: 2 } as Loose)).rejects.toThrow(unknownKey("K", "k"));
      await expect(index.search(vocab, 3 as Loose)).rejects.toThrow(/options: expected an object/);
      const a = await index.selfSearch({ k: 1, rows: undefined, chunkRows: undefined });
      expect(a.count).toBe(10);
    } finally {
      index.dispose();
    }
    const r = await nearestNeighbors(vocab.subarray(0, dim), vocab, {
      dim,
      k: 2,
      backend: "cpu",
      metric: undefined,
      threads: undefined,
    });
    expect(r.indices[0]).toBe(0);
  });
});

describe("collapse reports", () => {
  const dim = 4;
  const vocab = seededRows(40, dim, 3);
  const src = { vocab, dim };
  const x = seededRows(3, dim, 9);
  it("refuse misspelt keys and non-object options", async () => {
    for (const [key, hint] of [
      ["neighbourSample", "neighborSample"],
      ["metrc", "metric"],
      ["jitter", "covarianceJitter"],
      ["collapseThreshhold", "collapseThreshold"],
      ["K", "k"],
    ])
      await expect(collapseReport(x, src, { [key!]: 1, backend: "cpu" } as Loose)).rejects.toThrow(
        unknownKey(key!, hint),
      );
    await expect(collapseReport(x, src, "l2" as Loose)).rejects.toThrow(
      /^collapseReport options: expected an object, got string l2/,
    );
    await expect(collapseReport(x, src, null as Loose)).rejects.toThrow(
      /^collapseReport options: expected an object, got null/,
    );
    await expect(createCollapseReference(src, { seeed: 1 } as Loose)).rejects.toThrow(
      unknownKey("seeed", "seed"),
    );
  });
  it("a CollapseReference source refuses reference options instead of dropping them", async () => {
    const ref = await createCollapseReference(src, { backend: "cpu" });
    try {
      await expect(collapseReport(x, ref, { metric: "bogus" } as Loose)).rejects.toThrow(
        /collapseReport options: metric configure a new reference/,
      );
      await expect(collapseReport(x, ref, { k: 2, seed: 3 })).rejects.toThrow(
        /seed configure a new reference/,
      );
      await expect(ref.report(x, { kk: 2 } as Loose)).rejects.toThrow(unknownKey("kk", "k"));
      const viaReport = await collapseReport(x, ref, { k: 2, seed: undefined, energy: undefined });
      expect(viaReport.vectors[0]!.nearest.length).toBe(2);
      expect(viaReport.aggregate.energy).toBe(0.95);
    } finally {
      ref.dispose();
    }
  });
  it("(e) reads the caller's vectors once: changing them while the call runs changes nothing", async () => {
    const expected = await collapseReport(x, src, { backend: "cpu" });
    const mine = x.slice();
    const pending = collapseReport(mine, src, { backend: "cpu" });
    mine.fill(100);
    expect(await pending).toEqual(expected);
    const ref = await createCollapseReference(src, { backend: "cpu" });
    try {
      const again = x.slice();
      const p = ref.report(again);
      again.fill(-3);
      expect(await p).toEqual(expected);
    } finally {
      ref.dispose();
    }
  });
});

describe("analyses and projections", () => {
  const dim = 3;
  const a = seededRows(30, dim, 5);
  const b = seededRows(30, dim, 6);
  const metrics: RunMetrics = {
    steps: [1, 2, 3].map((step) => ({ type: "step", step, loss: 3 - step }) as RunMetrics["steps"][number]),
    evals: [{ type: "eval", step: 3, validationLoss: 1, ms: 0 }],
  };
  it("refuse misspelt keys, naming them and the close match", async () => {
    await expect(mmd(a, b, dim, { permutation: 10 } as Loose)).rejects.toThrow(
      unknownKey("permutation", "permutations"),
    );
    await expect(mmd(a, b, dim, { bandwith: 1 } as Loose)).rejects.toThrow(
      unknownKey("bandwith", "bandwidth"),
    );
    const labels = Int32Array.from({ length: 30 }, (_, i) => i % 2);
    await expect(linearProbe(a, labels, dim, { fold: 2 } as Loose)).rejects.toThrow(
      unknownKey("fold", "folds"),
    );
    await expect(kMeans(a, dim, { k: 2, maxIter: 3 } as Loose)).rejects.toThrow(
      unknownKey("maxIter", "maxIterations"),
    );
    for (const key of ["jitter", "covarianceJitter"])
      await expect(fitGaussian(a, dim, { [key]: 1e-3 } as Loose)).rejects.toThrow(
        unknownKey(key, "ridgeRelative"),
      );
    expect(() => randomWalkTrajectories(a, dim, { count: 1, length: 2, sed: 1 } as Loose)).toThrow(
      unknownKey("sed", "seed"),
    );
    expect(() => lossCurve(metrics, { windw: 2 } as Loose)).toThrow(unknownKey("windw", "window"));
    expect(() => lossCurve(metrics, { sorce: "train" } as Loose)).toThrow(unknownKey("sorce", "source"));
    expect(() => convergenceByRun([{ name: "a", metrics }], { levle: 1 } as Loose)).toThrow(
      unknownKey("levle", "level"),
    );
    await expect(pca(a, dim, { nComponents: 2 } as Loose)).rejects.toThrow(
      unknownKey("nComponents", "components"),
    );
    await expect(umap(a, dim, { nNeighbors: 5 } as Loose)).rejects.toThrow(
      unknownKey("nNeighbors", "neighbors"),
    );
    await expect(umap(a, dim, { nEpochs: 5 } as Loose)).rejects.toThrow(unknownKey("nEpochs", "epochs"));
    await expect(tsne(a, dim, { nIter: 5 } as Loose)).rejects.toThrow(unknownKey("nIter", "iterations"));
  });
  it("refuse non-object options; undefined values are defaults", async () => {
    await expect(mmd(a, b, dim, "rbf" as Loose)).rejects.toThrow(/^mmd options: expected an object/);
    expect(() => lossCurve(metrics, null as Loose)).toThrow(/^lossCurve options: expected an object/);
    await expect(kMeans(a, dim, undefined as Loose)).rejects.toThrow(/^kMeans options: expected an object/);
    const r1 = await mmd(a, b, dim, { seed: 1 });
    const r2 = await mmd(a, b, dim, { seed: 1, bandwidth: undefined, permutations: undefined });
    expect(r2).toEqual(r1);
    expect(lossCurve(metrics, { source: undefined, window: undefined })).toEqual(lossCurve(metrics));
    expect(convergenceByRun([{ name: "a", metrics }], { level: undefined }).level).toBe(1);
    const p1 = await pca(a, dim, { components: undefined });
    expect(p1.projection.length).toBe(30 * 2);
  });
  it("(e) kMeans reads the caller's rows once", async () => {
    const expected = await kMeans(a, dim, { k: 3, seed: 2, threads: 1 });
    const mine = a.slice();
    const pending = kMeans(mine, dim, { k: 3, seed: 2, threads: 1 });
    mine.fill(9);
    expect(await pending).toEqual(expected);
  });
});

describe("buildReport", () => {
  it("refuses misspelt keys and bad values before any work", async () => {
    const runs = [join(tmp, "no-such-run")];
    const outDir = join(tmp, "report");
    for (const [key, value, hint] of [
      ["projecton", "pca", "projection"],
      ["maxVocabPoints", 10, "maxVocabularyPoints"],
      ["name", ["a"], "names"],
    ] as const)
      await expect(buildReport(runs, { outDir, [key]: value } as Loose)).rejects.toThrow(
        unknownKey(key, hint),
      );
    await expect(buildReport(runs, { outDir, activations: { layer: [1] } } as Loose)).rejects.toThrow(
      /buildReport options.activations: unknown option "layer" \(did you mean "layers"\?\)/,
    );
    await expect(buildReport(runs, { outDir, level: "0.5" } as Loose)).rejects.toThrow(
      /^level: expected a finite number, got string "0.5"/,
    );
    await expect(buildReport(runs, { outDir, projection: "pcaa" } as Loose)).rejects.toThrow(/^projection:/);
    await expect(buildReport(runs, null as Loose)).rejects.toThrow(
      /^buildReport options: expected an object/,
    );
    expect(existsSync(outDir)).toBe(false);
  });
});

describe("data: generators, encoding, activations", () => {
  it("refuse misspelt keys; undefined values are defaults", async () => {
    expect(() => generateArithmetic({ count: 2, digit: 2 } as Loose)).toThrow(unknownKey("digit", "digits"));
    expect(() => generateArithmetic({ count: 2, template: "{question}" } as Loose)).toThrow(
      unknownKey("template"),
    );
    expect(generateArithmetic({ count: 2, seed: 1, digits: undefined })).toBe(
      generateArithmetic({ count: 2, seed: 1 }),
    );
    expect(() => generateQaFacts({ count: 2, unanswerable: 0.5 } as Loose)).toThrow(
      unknownKey("unanswerable", "unanswerableFraction"),
    );
    const text = "The quick brown foxes jumped over seven lazy sleeping dogs today.";
    expect(() => generateCloze({ text, minword: 3 } as Loose)).toThrow(unknownKey("minword", "minWords"));
    expect(generateCloze({ text, minWords: undefined, seed: 1 })).toBe(generateCloze({ text, seed: 1 }));
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 });
    try {
      const tok = model.tokenizer!;
      const ex = { prompt: "1 + 1 =", completion: " 2" };
      expect(() => encodeExample(tok, ex, { maxlength: 4 } as Loose)).toThrow(
        unknownKey("maxlength", "maxLength"),
      );
      expect(() => encodeExample(tok, ex, "x" as Loose)).toThrow(
        /^encodeExample options: expected an object/,
      );
      expect(encodeExample(tok, ex, { maxLength: undefined, eosId: undefined })).toEqual(
        encodeExample(tok, ex),
      );
      await expect(
        datasetActivations(model, ["a b"], { layer: 1, poolling: "mean" } as Loose),
      ).rejects.toThrow(unknownKey("poolling", "pooling"));
      await expect(
        captureActivations(model, ["a b"], { layers: [1], maxlength: 4 } as Loose),
      ).rejects.toThrow(unknownKey("maxlength", "maxLength"));
      await expect(
        captureActivations(model, ["a b"], { layers: [1], outdir: join(tmp, "acts") } as Loose),
      ).rejects.toThrow(unknownKey("outdir", "outDir"));
      expect(existsSync(join(tmp, "acts"))).toBe(false);
      const set = await captureActivations(model, ["a b"], {
        layers: [1],
        outDir: undefined,
        pooling: undefined,
      });
      expect(set.index.pooling).toBe("both");
    } finally {
      model.dispose();
    }
    expect(() => parseTaskSpec({ kind: "arithmetic", digit: 2 })).toThrow(
      /unknown option "digit" for kind "arithmetic" \(did you mean "digits"\?\)/,
    );
  });
});

describe("tune and evaluatePrompt", () => {
  let model: Model;
  let task: Task;
  let prior: Prior;
  beforeAll(async () => {
    model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    task = await loadTask({ kind: "arithmetic", trainCount: 8, validationCount: 3, seed: 3 });
    prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
  });
  afterAll(() => model?.dispose());
  const base = (): TuneOptions => ({ model, task, prior, promptLength: 2, steps: 1, batchSize: 2 });

  it("refuses misspelt keys (top level and nested) before anything is written", async () => {
    const runDir = join(tmp, "typo-run");
    const cases: [Loose, RegExp][] = [
      [{ optimizer: { learningRate: 0.1 } }, unknownKey("learningRate")],
      [{ optimizer: { warmup: 2 } }, unknownKey("warmup", "warmupSteps")],
      [{ promptLen: 3 }, unknownKey("promptLen", "promptLength")],
      [{ evalevery: 1 }, unknownKey("evalevery", "evalEvery")],
      [
        { regularizer: { regularizer: { kind: "l2-init" }, lambda: 1, shedule: "linear" } },
        unknownKey("shedule", "schedule"),
      ],
      [{ evalEvery: 1, earlyStopping: { patience: 1, mindelta: 0.1 } }, unknownKey("mindelta", "minDelta")],
      [{ optimizer: "adamw" }, /^tune options.optimizer: expected an object, got string adamw/],
      [{ optimizer: null }, /^tune options.optimizer: expected an object, got null/],
      [{ earlyStopping: null }, /^tune options.earlyStopping: expected an object, got null/],
    ];
    for (const [extra, message] of cases) {
      await expect(tune({ ...base(), ...extra, runDir })).rejects.toThrow(message);
      expect(existsSync(runDir)).toBe(false);
    }
    await expect(tune({ ...base(), optimizer: { learningRate: 0.1 } } as Loose)).rejects.toThrow(
      /tune options.optimizer: unknown option "learningRate" \(did you mean "lr"\?\); known: lr, /,
    );
  });

  it("(c) refuses missing or non-object arguments with a TypeError naming them", async () => {
    await expect(tune(null as Loose)).rejects.toThrow(
      new TypeError("tune options: expected an object, got null"),
    );
    await expect(tune(undefined as Loose)).rejects.toThrow(
      /^tune options: expected an object, got undefined/,
    );
    const { prior: _, ...noPrior } = base();
    await expect(tune(noPrior as Loose)).rejects.toThrow(/^prior: expected a Prior/);
    await expect(tune({ ...base(), model: undefined } as Loose)).rejects.toThrow(/^model: expected a Model/);
    await expect(tune({ ...base(), task: "arithmetic" } as Loose)).rejects.toThrow(/^task: expected a Task/);
  });

  it("(b) checks deep settings before anything is written, naming the option", async () => {
    const runDir = join(tmp, "deep-run");
    const cases: [Loose, RegExp][] = [
      [{ mode: "deep-hidden", deepLayers: [99] }, /^deepLayers\[0\] = 99: expected an integer in 0\.\.2/],
      [
        { mode: "deep-hidden", deepLayers: "4" },
        /^deepLayers: expected an array of layer indices, got string/,
      ],
      [{ mode: "deep-hidden", deepLayers: [1, 1] }, /^deepLayers: layer 1 is repeated/],
      [{ mode: "deep-hidden", deepLayers: [] }, /^deepLayers: expected at least one layer index/],
      [{ mode: "deep-prefix", deepLength: 0 }, /^deepLength: expected an integer >= 1, got 0/],
      [{ mode: "deep-prefix", deepLength: -1 }, /^deepLength: expected an integer >= 1, got -1/],
      [{ mode: "deep-prefix", deepLength: 1.5 }, /^deepLength: expected an integer >= 1, got 1\.5/],
      [{ mode: "deep-prefix", deepLength: "1" }, /^deepLength: expected an integer >= 1, got string "1"/],
      [
        { mode: "deep-prefix", prefixInitStd: Number.NaN },
        /^prefixInitStd: expected a finite number >= 0, got NaN/,
      ],
      [{ mode: "deep-prefix", prefixInitStd: -1 }, /^prefixInitStd: expected a finite number >= 0, got -1/],
      [{ mode: "deep-prefix", prefixInitStd: "0.1" }, /^prefixInitStd: .* got string "0\.1"/],
    ];
    for (const [extra, message] of cases) {
      await expect(tune({ ...base(), ...extra, runDir })).rejects.toThrow(message);
      expect(existsSync(runDir)).toBe(false);
    }
  });

  it("undefined values mean the default, and run.json records only known optimizer keys", async () => {
    const runDir = join(tmp, "defaults-run");
    await tune({
      ...base(),
      runDir,
      mode: undefined,
      batchSize: undefined,
      optimizer: { lr: undefined, clipNorm: undefined, schedule: undefined },
      earlyStopping: undefined,
      regularizer: undefined,
      deepLayers: undefined,
      prefixInitStd: undefined,
      seed: undefined,
    });
    const run = JSON.parse(readFileSync(join(runDir, "run.json"), "utf8"));
    expect(run.optimizer).toEqual({
      lr: 5e-3,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: 0.01,
      schedule: "constant",
      warmupSteps: 0,
      accumulate: 1,
    });
    expect(run.batchSize).toBe(2);
    expect(run.generationBatchSize).toBe(16);
    expect(run.mode).toBe("soft");
  });

  it("evaluatePrompt: refuses misspelt keys and (a) checks its counts, naming the option", async () => {
    const opts = { model, task, scores: false };
    for (const [key, hint] of [
      ["maxNewToken", "maxNewTokens"],
      ["score", "scores"],
      ["evalexamples", "evalExamples"],
    ])
      await expect(evaluatePrompt({ ...opts, [key!]: 1 } as Loose)).rejects.toThrow(unknownKey(key!, hint));
    const cases: [Loose, RegExp][] = [
      [{ evalExamples: -1 }, /^evalExamples: expected an integer >= 1, got -1/],
      [{ evalExamples: 0 }, /^evalExamples: expected an integer >= 1, got 0/],
      [{ evalExamples: Number.NaN }, /^evalExamples: expected an integer >= 1, got NaN/],
      [{ evalExamples: 1.5 }, /^evalExamples: expected an integer >= 1, got 1\.5/],
      [{ batchSize: -1 }, /^batchSize: expected an integer >= 1, got -1/],
      [{ maxNewTokens: 0 }, /^maxNewTokens: expected an integer >= 1, got 0/],
      [{ generationBatchSize: 0 }, /^generationBatchSize: expected an integer >= 1, got 0/],
      [{ scores: "false" }, /^scores: expected a boolean, got string "false"/],
    ];
    for (const [extra, message] of cases)
      await expect(evaluatePrompt({ ...opts, ...extra })).rejects.toThrow(message);
    await expect(evaluatePrompt(null as Loose)).rejects.toThrow(
      /^evaluatePrompt options: expected an object/,
    );
    const plain = await evaluatePrompt({ ...opts, evalExamples: 2 });
    const same = await evaluatePrompt({
      ...opts,
      evalExamples: 2,
      batchSize: undefined,
      maxLength: undefined,
    });
    expect(same.validationLoss).toBe(plain.validationLoss);
    expect(Number.isFinite(plain.validationLoss)).toBe(true);
  });

  it("evaluatePrompt decodes in groups of generationBatchSize (default 16), the loss pass in batchSize", async () => {
    const seven = await loadTask({ kind: "arithmetic", trainCount: 2, validationCount: 7, seed: 5 });
    const prompt = new Float32Array(2 * model.config.hiddenSize).fill(0.01);
    const generate = model.generate.bind(model);
    const groups: number[] = [];
    const spied = model as unknown as { generate: typeof generate };
    spied.generate = (o) => {
      groups.push(o.batch);
      return generate(o);
    };
    try {
      const scores: number[] = [];
      for (const [g, want] of [
        [undefined, [7]],
        [3, [3, 3, 1]],
        [1, [1, 1, 1, 1, 1, 1, 1]],
      ] as const) {
        groups.length = 0;
        const totals: number[] = [];
        const r = await evaluatePrompt({
          model,
          task: seven,
          prompt,
          batchSize: 2,
          generationBatchSize: g,
          maxNewTokens: 3,
          onProgress: (_done, total) => totals.push(total),
        });
        expect(groups, `generationBatchSize ${g}`).toEqual(want);
        expect(new Set(totals)).toEqual(new Set([4 + want.length])); // 4 loss batches of 2, then the groups
        scores.push(r.accuracy!);
      }
      expect(new Set(scores).size).toBe(1);
    } finally {
      delete (spied as Partial<typeof spied>).generate;
    }
  });
});
