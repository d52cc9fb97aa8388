// Greedy generation with the key/value cache against a naive greedy loop that reruns the full forward
// pass for every new token: the same ids, for padded batches, with soft prompts and both deep-prompt kinds.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DeepPrompts, loadModel, type Model } from "../lib/index.js";
import { modelDir } from "./helpers.js";

function randn(n: number, seed: number, scale: number): Float32Array {
  let s = seed;
  return new Float32Array(n).map(() => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return (s / 2147483648 - 0.5) * 2 * scale;
  });
}

async function naiveGreedy(
  model: Model,
  seqs: number[][],
  maxNew: number,
  prompt?: Float32Array,
  deepPrompts?: DeepPrompts,
): Promise<number[][]> {
  const out: number[][] = [];
  for (const seq of seqs) {
    const ids = [...seq];
    const gen: number[] = [];
    for (let t = 0; t < maxNew; t++) {
      const r = await model.forward({
        inputIds: Int32Array.from(ids),
        batch: 1,
        seqLen: ids.length,
        prompt,
        deepPrompts,
      });
      const V = model.config.vocabSize;
      const last = r.logits!.subarray((r.positions - 1) * V, r.positions * V);
      let best = 0;
      for (let v = 1; v < V; v++) if (last[v]! > last[best]!) best = v;
      gen.push(best);
      ids.push(best);
    }
    out.push(gen);
  }
  return out;
}

describe.each(["gpt2-tiny", "llama-tiny", "llama-tiny-untied"])("generate with a KV cache: %s", (name) => {
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(modelDir(name), { backend: "cpu", threads: 2 });
  });
  afterAll(() => model?.dispose());
  const seqs = [
    [5, 17, 42, 7, 99, 3],
    [11, 12, 13],
  ];
  const T = 6;
  const inputIds = Int32Array.from([...seqs[0]!, ...seqs[1]!, 0, 0, 0]);
  const attentionMask = Uint8Array.from([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
  const maxNew = 5;

  it("matches naive greedy decoding, padded batch, soft prompt", async () => {
    const prompt = randn(3 * model.config.hiddenSize, 1, 0.5);
    const got = await model.generate({
      inputIds,
      attentionMask,
      batch: 2,
      seqLen: T,
      prompt,
      maxNewTokens: maxNew,
    });
    const want = await naiveGreedy(model, seqs, maxNew, prompt);
    expect([Array.from(got.subarray(0, maxNew)), Array.from(got.subarray(maxNew))]).toEqual(want);
  });

  it("matches with hidden deep prompts and with prefixes", async () => {
    const C = model.config.hiddenSize;
    const L = model.config.numLayers;
    const hidden: DeepPrompts = {
      kind: "hidden",
      layers: [0, L - 1],
      vectors: [randn(2 * C, 2, 0.5), randn(3 * C, 3, 0.5)],
    };
    const per = model.config.numKvHeads * model.config.headDim;
    const prefix: DeepPrompts = {
      kind: "prefix",
      layers: [1],
      keys: [randn(4 * per, 4, 0.5)],
      values: [randn(4 * per, 5, 0.5)],
    };
    for (const deepPrompts of [hidden, prefix]) {
      const got = await model.generate({
        inputIds,
        attentionMask,
        batch: 2,
        seqLen: T,
        deepPrompts,
        maxNewTokens: maxNew,
      });
      const want = await naiveGreedy(model, seqs, maxNew, undefined, deepPrompts);
      expect(
        [Array.from(got.subarray(0, maxNew)), Array.from(got.subarray(maxNew))],
        deepPrompts.kind,
      ).toEqual(want);
    }
  });

  it("gives each sequence the tokens it gets alone, in a batch of any size up to 32", async () => {
    const prompt = randn(3 * model.config.hiddenSize, 7, 0.5);
    const lengths = [9, 1, 4, 7, 2, 9, 5];
    const T9 = 9;
    const seqOf = (b: number) => Array.from({ length: lengths[b]! }, (_, t) => (37 * b + 11 * t + 5) % 500);
    const ids = new Int32Array(lengths.length * T9);
    const mask = new Uint8Array(lengths.length * T9);
    lengths.forEach((n, b) => {
      ids.set(seqOf(b), b * T9);
      mask.fill(1, b * T9, b * T9 + n);
    });
    const batch = await model.generate({
      inputIds: ids,
      attentionMask: mask,
      batch: lengths.length,
      seqLen: T9,
      prompt,
      maxNewTokens: maxNew,
    });
    for (let b = 0; b < lengths.length; b++) {
      const alone = await model.generate({
        inputIds: Int32Array.from(seqOf(b)),
        batch: 1,
        seqLen: lengths[b]!,
        prompt,
        maxNewTokens: maxNew,
      });
      expect(Array.from(batch.subarray(b * maxNew, (b + 1) * maxNew)), `sequence ${b}`).toEqual(
        Array.from(alone),
      );
    }
  });

  it("stops a sequence at eos and fills the rest with -1", async () => {
    const free = await model.generate({ inputIds, attentionMask, batch: 2, seqLen: T, maxNewTokens: maxNew });
    const eos = free[1]!; // the first sequence's second token
    const got = await model.generate({
      inputIds,
      attentionMask,
      batch: 2,
      seqLen: T,
      maxNewTokens: maxNew,
      eosId: eos,
    });
    expect(got[1]).toBe(eos);
    expect(Array.from(got.subarray(2, maxNew))).toEqual(new Array(maxNew - 2).fill(-1));
  });

  it("refuses a maxNewTokens whose caches cannot be sized (a Llama model has no position limit to stop it)", async () => {
    // 4 x 2^62 wrapped to 0: the output was allocated empty and written through (SIGSEGV).
    const ids = new Int32Array(4).fill(5);
    await expect(
      model.generate({ inputIds: ids, batch: 4, seqLen: 1, maxNewTokens: 2 ** 62 }),
    ).rejects.toThrow(/maxNewTokens: expected at most 2\^32|positions/);
  });

  it("refuses left padding", async () => {
    const mask = Uint8Array.from([1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]);
    await expect(
      model.generate({ inputIds, attentionMask: mask, batch: 2, seqLen: T, maxNewTokens: 2 }),
    ).rejects.toThrow(/right padding/);
  });
});
