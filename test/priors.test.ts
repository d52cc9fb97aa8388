// Priors and regularisers: statistical tests of every prior against its stated law, the exclusion prior's
// acceptance law against closed forms in 1-D and 2-D (and the chi-square form in 96-D), determinism, and
// central finite differences of the regularisers' gradients.
//
// Statistical bounds. Every test draws a fixed, seeded sample, so it passes or fails deterministically; the
// bounds say how surprising a failure would be if the code were right:
// - Means: each coordinate's z = (mean - mu_j) / sqrt(Sigma_jj / n) is N(0, 1) (exactly for Gaussian
//   priors, by the CLT otherwise); we require max_j |z| < 4.5: P(|z| > 4.5) = 6.8e-6, so over d = 96
//   coordinates a false failure has probability < 7e-4 (Bonferroni).
// - Covariances: each entry's z = (S_jk - Sigma_jk) / se_jk, with se_jk the standard error of the mean of the
//   centred products (x_j - m_j)(x_k - m_k) estimated from the same sample (valid for any law with fourth
//   moments: no Gaussian formula assumed, so it covers uniform, interpolation and mixture priors); we require
//   max |z| < 5.5: P(|z| > 5.5) = 3.8e-8, times d (d + 1) / 2 = 4656 entries < 2e-4.
// - Distributions: the Kolmogorov-Smirnov distance D_n to the exact CDF must stay below 1.95 / sqrt(n), the
//   asymptotic 0.1% critical value (P(sqrt(n) D_n > 1.95) = 0.001).
// - Rates: an empirical acceptance rate must be within 5 binomial standard errors of the exact rate
//   (two-sided P = 5.7e-7).
// - Counts: each of m categories' counts within 4.5 binomial standard errors (m = 50: < 3.4e-4).
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { priorRecordFromOptions, registerSamplePrior } from "../lib/cli-sample-prior.js";
import type { ExclusionLaw, GaussianPrior } from "../lib/gaussian.js";
import { loadModel, type Model } from "../lib/model.js";
import { addon } from "../lib/native.js";
import {
  createPrior,
  createRegularizer,
  datasetActivations,
  type Prior,
  type PriorContext,
  type PriorRecord,
  readTexts,
} from "../lib/priors.js";
import { Rng } from "../lib/rng.js";
import { readTensors, writeSafetensors } from "../lib/safetensors.js";
import { chiSquareLogSurvival, quantile } from "../lib/stats.js";
import { modelDir } from "./helpers.js";

const Z_MEAN = 4.5;
const Z_COV = 5.5;
const ksBound = (n: number) => 1.95 / Math.sqrt(n);

function maxAbs(x: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
}

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function minOf(x: ArrayLike<number>): number {
  let m = Number.POSITIVE_INFINITY;
  for (let i = 0; i < x.length; i++) m = Math.min(m, x[i]);
  return m;
}

function sampleMean(x: Float32Array, d: number): Float64Array {
  const n = x.length / d;
  const m = new Float64Array(d);
  for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) m[j] += x[r * d + j];
  return m.map((v) => v / n);
}

/** Max |z| of the sample mean against mu and of the sample covariance against sigma (see the header). */
function momentZ(
  x: Float32Array,
  d: number,
  mu: ArrayLike<number>,
  sigma: ArrayLike<number>,
): { mean: number; cov: number } {
  const n = x.length / d;
  const m = sampleMean(x, d);
  let zMean = 0;
  for (let j = 0; j < d; j++)
    zMean = Math.max(zMean, Math.abs(m[j] - mu[j]) / Math.sqrt(sigma[j * d + j] / n));
  const c = new Float64Array(n * d);
  for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) c[r * d + j] = x[r * d + j] - m[j];
  let zCov = 0;
  for (let j = 0; j < d; j++)
    for (let k = 0; k <= j; k++) {
      let s = 0;
      let s2 = 0;
      for (let r = 0; r < n; r++) {
        const p = c[r * d + j] * c[r * d + k];
        s += p;
        s2 += p * p;
      }
      const mean = s / n;
      const se = Math.sqrt((s2 / n - mean * mean) / n);
      const S = s / (n - 1);
      zCov = Math.max(zCov, Math.abs(S - sigma[j * d + k]) / se);
    }
  return { mean: zMean, cov: zCov };
}

function expectMoments(x: Float32Array, d: number, mu: ArrayLike<number>, sigma: ArrayLike<number>) {
  const z = momentZ(x, d, mu, sigma);
  expect(z.mean).toBeLessThan(Z_MEAN);
  expect(z.cov).toBeLessThan(Z_COV);
}

/** Kolmogorov-Smirnov distance of a sample to a CDF. */
function ksDistance(values: ArrayLike<number>, cdf: (t: number) => number): number {
  const v = Float64Array.from(values).sort();
  const n = v.length;
  let D = 0;
  for (let i = 0; i < n; i++) {
    const F = cdf(v[i]);
    D = Math.max(D, F - i / n, (i + 1) / n - F);
  }
  return D;
}

/** Exact CDF of the accepted draws' squared Mahalanobis radius (see ExclusionLaw): [Pw(r*^2, t) - P(r*^2, t)] / Z. */
function exclusionRadiusCdf(law: ExclusionLaw, d: number): (t: number) => number {
  const Q = (x: number) => Math.exp(chiSquareLogSurvival(x, d));
  const r0 = law.thresholdMahalanobisSquared;
  const Z = Math.exp(law.logAcceptanceRate);
  return (t) => (t <= r0 ? 0 : (Q(r0 / law.cDim) - Q(t / law.cDim) - (Q(r0) - Q(t))) / Z);
}

function identity(d: number, s2 = 1): Float64Array {
  const a = new Float64Array(d * d);
  for (let i = 0; i < d; i++) a[i * d + i] = s2;
  return a;
}

function vocabMoments(vocab: Float32Array, d: number): { mean: Float64Array; cov: Float64Array } {
  const n = vocab.length / d;
  const mean = sampleMean(vocab, d);
  const cov = new Float64Array(d * d);
  for (let r = 0; r < n; r++)
    for (let i = 0; i < d; i++) {
      const a = vocab[r * d + i] - mean[i];
      for (let j = 0; j < d; j++) cov[i * d + j] += a * (vocab[r * d + j] - mean[j]);
    }
  return { mean, cov: cov.map((v) => v / (n - 1)) };
}

/** Texts of words the fixture tokenizer knows (it was trained on licence texts), reproducible from a seed. */
function licenceTexts(count: number, seed: number): string[] {
  const words =
    "the software license copyright permission notice you may not use this file except in compliance with any warranty distribution source code free program terms conditions".split(
      " ",
    );
  const rng = new Rng(seed);
  return Array.from({ length: count }, () =>
    Array.from({ length: 3 + rng.int(15) }, () => words[rng.int(words.length)]).join(" "),
  );
}

/** Central finite differences of a regulariser's value along coordinates and a random direction. */
function finiteDifferenceError(
  value: (x: Float32Array) => number,
  gradient: Float32Array,
  x: Float32Array,
  coords: number[],
  h: number,
): number {
  let worst = 0;
  for (const i of coords) {
    const xp = x.slice();
    const xm = x.slice();
    xp[i] += h;
    xm[i] -= h;
    const fd = (value(xp) - value(xm)) / (xp[i] - xm[i]);
    worst = Math.max(worst, Math.abs(fd - gradient[i]) / Math.max(1e-3, Math.abs(gradient[i])));
  }
  return worst;
}

let llama: Model;
let gpt2: Model;
let dir: string;
const D = 96;

beforeAll(async () => {
  llama = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
  gpt2 = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 2 });
  dir = mkdtempSync(join(tmpdir(), "priortune-priors-"));
});

afterAll(() => {
  llama?.dispose();
  gpt2?.dispose();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("simple priors", () => {
  it("isotropic Gaussian: N(0, sigma^2 I) moments, default sigma 0.02, exact logProb", async () => {
    const prior = await createPrior({ kind: "gaussian" }, { dim: D });
    expect(prior.describe()).toEqual({ kind: "gaussian", sigma: 0.02, mean: 0 });
    const x = prior.sample(20000, new Rng(1));
    expectMoments(x, D, new Float64Array(D), identity(D, 0.02 ** 2));
    const lp = prior.logProb!(x.subarray(0, D));
    let r2 = 0;
    for (let j = 0; j < D; j++) r2 += (x[j] / 0.02) ** 2;
    expect(lp[0]).toBeCloseTo(-0.5 * r2 - D * Math.log(0.02) - 0.5 * D * Math.log(2 * Math.PI), 8);
  });

  it("uniform [-a, a] and Xavier uniform: bounds and moments (variance a^2 / 3)", async () => {
    const uniform = await createPrior({ kind: "uniform" }, { dim: D });
    const u = uniform.sample(20000, new Rng(2));
    expect(maxAbs(u)).toBeLessThanOrEqual(0.5);
    expectMoments(u, D, new Float64Array(D), identity(D, 0.25 / 3));
    expect(uniform.logProb!(new Float32Array(D))[0]).toBeCloseTo(0, 12); // density 1 on [-0.5, 0.5]^d
    expect(uniform.logProb!(new Float32Array(D).fill(0.6))[0]).toBe(Number.NEGATIVE_INFINITY);

    const xavier = await createPrior({ kind: "xavier" }, { dim: D });
    const P = 20000;
    const a = Math.sqrt(6 / (P + D)); // torch xavier_uniform_ on a P x d tensor
    const x = xavier.sample(P, new Rng(3));
    expect(maxAbs(x)).toBeLessThanOrEqual(a);
    expect(maxAbs(x)).toBeGreaterThan(0.999 * a);
    expectMoments(x, D, new Float64Array(D), identity(D, (a * a) / 3));
  });

  it("vocab: top-N tokens by corpus frequency through the tokenizer, sampled uniformly and distinctly", async () => {
    const text = licenceTexts(200, 5).join("\n");
    const counts = new Map<number, number>();
    for (const line of text.split("\n"))
      for (const id of gpt2.tokenizer!.encode(line)) counts.set(id, (counts.get(id) ?? 0) + 1);
    const expected = [...counts.entries()]
      .sort((p, q) => q[1] - p[1] || p[0] - q[0])
      .slice(0, 30)
      .map(([id]) => id);
    const file = join(dir, "corpus.txt");
    writeFileSync(file, text);
    const prior = await createPrior({ kind: "vocab", top: 30, corpus: file }, { model: gpt2 });
    const vocab = gpt2.tokenEmbeddings();
    expect(Array.from((prior as unknown as { ids: Int32Array }).ids)).toEqual(expected);
    const rng = new Rng(6);
    const hits = new Map<number, number>();
    const draws = 2000;
    for (let t = 0; t < draws; t++) {
      const x = prior.sample(5, rng);
      const ids = (prior as unknown as { lastIds: Int32Array }).lastIds;
      expect(new Set(ids).size).toBe(5); // without replacement
      ids.forEach((id, i) => {
        expect(x.subarray(i * D, (i + 1) * D)).toEqual(vocab.subarray(id * D, (id + 1) * D));
        hits.set(id, (hits.get(id) ?? 0) + 1);
      });
    }
    expect([...hits.keys()].sort((p, q) => p - q)).toEqual([...expected].sort((p, q) => p - q));
    const p = 5 / 30; // each token is in a given draw of 5 distinct tokens with probability 5/30
    for (const c of hits.values())
      expect(Math.abs(c - draws * p) / Math.sqrt(draws * p * (1 - p))).toBeLessThan(Z_MEAN);
    expect(prior.stats!().candidates).toBe(30);

    const uniform = await createPrior({ kind: "vocab" }, { model: gpt2 });
    expect(uniform.describe()).toEqual({ kind: "vocab", select: "uniform", replace: false });
    expect(() => uniform.sample(501, rng)).toThrow(/500 candidate tokens/);
  });

  it("class-label: mean embedding over each word's sub-tokens, then rows from the fill prior", async () => {
    const words = [" license", "Copyright notice"];
    const prior = await createPrior(
      { kind: "class-label", words, fill: { kind: "gaussian", sigma: 0.5 } },
      { model: gpt2 },
    );
    const vocab = gpt2.tokenEmbeddings();
    const x = prior.sample(4, new Rng(7));
    words.forEach((w, i) => {
      const ids = gpt2.tokenizer!.encode(w);
      for (let j = 0; j < D; j++) {
        const mean = ids.reduce((s, id) => s + vocab[id * D + j], 0) / ids.length;
        expect(x[i * D + j]).toBeCloseTo(mean, 6);
      }
    });
    // Rows 2-3 come from the fill prior, drawn from the same generator after the labels.
    expect(x.subarray(2 * D)).toEqual(
      (await createPrior({ kind: "gaussian", sigma: 0.5 }, { dim: D })).sample(2, new Rng(7)),
    );
    expect(prior.sample(1, new Rng(7))).toEqual(x.subarray(0, D));
    expect(prior.stats!()).toEqual({ labels: 2, subTokens: 7 });
  });
});

describe("fitted Gaussian", () => {
  it("fits mean and full covariance of the vocabulary (with the relative jitter) and samples from it", async () => {
    const prior = (await createPrior({ kind: "fitted-gaussian" }, { model: llama })) as GaussianPrior;
    const vocab = llama.tokenEmbeddings();
    const { mean, cov } = vocabMoments(vocab, D);
    let trace = 0;
    for (let j = 0; j < D; j++) trace += cov[j * D + j];
    const ridge = (1e-3 * trace) / D;
    for (let j = 0; j < D; j++) cov[j * D + j] += ridge;
    expect(prior.stats!().fittedRows).toBe(500);
    expect(prior.stats!().ridge).toBeCloseTo(ridge, 12);
    const scale = maxAbs(cov);
    // fp32 GEMM of centred rows, float64 accumulation: about 256 * 2^-24 relative per chunk, see collapse.h.
    expect(maxDiff(prior.covariance(), cov)).toBeLessThan(1e-5 * scale);
    expect(maxDiff(prior.mean, mean)).toBeLessThan(1e-7);
    expect(prior.describe()).toEqual({
      kind: "fitted-gaussian",
      source: "vocab",
      rows: 20000,
      seed: 0,
      jitter: 1e-3,
      jitterMode: "relative",
      shrinkage: 0,
    });

    const x = prior.sample(20000, new Rng(8));
    expectMoments(x, D, prior.mean, prior.covariance());
    // The squared Mahalanobis radius of N(mu, Sigma) draws is chi2_d; cross-checked against the collapse
    // metrics' independent forward substitution.
    const r2 = prior.mahalanobisSquared(x);
    const other = await addon().mahalanobisSquared(x.subarray(0, 50 * D), D, prior.mean, prior.cholesky!, 1);
    expect(maxDiff(other, r2.subarray(0, 50))).toBeLessThan(1e-9 * maxAbs(other));
    expect(ksDistance(r2, (t) => 1 - Math.exp(chiSquareLogSurvival(t, D)))).toBeLessThan(ksBound(r2.length));
  });

  it("random row subsets, shrinkage and absolute jitter; N < d needs the jitter", async () => {
    const sub = (await createPrior(
      { kind: "fitted-gaussian", rows: 50, seed: 3, jitter: 1e-2, jitterMode: "absolute", shrinkage: 0.5 },
      { model: llama },
    )) as GaussianPrior;
    const vocab = llama.tokenEmbeddings();
    // Rebuild the same 50 rows by hand: 50 distinct rows of 500 chosen with Rng(3) (partial Fisher-Yates).
    const rng = new Rng(3);
    const pool = Array.from({ length: 500 }, (_, i) => i);
    for (let i = 0; i < 50; i++) {
      const j = i + rng.int(500 - i);
      [pool[i], pool[j]] = [pool[j], pool[i]];
    }
    const chosen = pool.slice(0, 50).sort((p, q) => p - q);
    const rows = new Float32Array(50 * D);
    chosen.forEach((r, i) => {
      rows.set(vocab.subarray(r * D, (r + 1) * D), i * D);
    });
    const { cov } = vocabMoments(rows, D);
    let trace = 0;
    for (let j = 0; j < D; j++) trace += cov[j * D + j];
    const expected = cov.map((v, i) => 0.5 * v + (i % (D + 1) === 0 ? 0.5 * (trace / D) + 1e-2 : 0));
    const scale = maxAbs(expected);
    expect(maxDiff(sub.covariance(), expected)).toBeLessThan(1e-5 * scale);
    // 50 rows in 96 dimensions: singular without a ridge.
    await expect(
      createPrior({ kind: "fitted-gaussian", rows: 50, jitter: 0 }, { model: llama }),
    ).rejects.toThrow(/not positive definite.*fewer rows than dimensions/);
  });

  it("activations: per-text means at a layer with padding excluded, equal to unpadded single forwards", async () => {
    const texts = licenceTexts(12, 9);
    const acts = await datasetActivations(llama, texts, { layer: 2, batchSize: 5 });
    expect(acts.count).toBe(12);
    for (let t = 0; t < texts.length; t++) {
      const ids = Int32Array.from(llama.tokenizer!.encode(texts[t], { addSpecialTokens: true }));
      const out = await llama.forward({
        inputIds: ids,
        batch: 1,
        seqLen: ids.length,
        hiddenStates: [2],
        logits: false,
      });
      const h = out.hiddenStates[0];
      for (let j = 0; j < D; j++) {
        let s = 0;
        for (let p = 0; p < ids.length; p++) s += h[p * D + j];
        expect(Math.abs(acts.rows[t * D + j] - s / ids.length)).toBeLessThan(
          1e-4 * Math.max(1, Math.abs(s / ids.length)),
        );
      }
    }
    const tokens = await datasetActivations(llama, texts, { layer: 2, pooling: "token", batchSize: 5 });
    expect(tokens.count).toBe(acts.tokens);
  });

  it("activations from a texts file (C4-style JSON lines), per-token, reproducible from describe()", async () => {
    const file = join(dir, "c4.jsonl");
    writeFileSync(
      file,
      licenceTexts(80, 10)
        .map((text) => JSON.stringify({ text, url: "x" }))
        .join("\n"),
    );
    expect(readTexts(file)).toEqual(licenceTexts(80, 10));
    const spec: PriorRecord = {
      kind: "fitted-gaussian",
      source: "activations",
      layer: 1,
      textsFile: file,
      pooling: "token",
    };
    const prior = (await createPrior(spec, { model: llama })) as GaussianPrior;
    const again = (await createPrior(prior.describe(), { model: llama, threads: 1 })) as GaussianPrior;
    expect(again.sample(10, new Rng(4))).toEqual(prior.sample(10, new Rng(4)));
    const x = prior.sample(20000, new Rng(11));
    expectMoments(x, D, prior.mean, prior.covariance());
    writeFileSync(file, JSON.stringify({ text: "changed" }));
    await expect(createPrior(prior.describe(), { model: llama })).rejects.toThrow(
      /textsSha256: the file .* changed since this record was made/,
    );
  });
});

describe("exclusion prior", () => {
  it("1-D: draws follow (pdf_wide - pdf)^+ / Z exactly; Z checked by quadrature; acceptance rate", async () => {
    const prior = await createPrior({ kind: "exclusion", base: { kind: "gaussian", sigma: 1 } }, { dim: 1 });
    const law = (prior as unknown as { law: ExclusionLaw }).law;
    expect(law.cDim).toBeCloseTo(25, 12); // c^(2/d) with c = 5, d = 1
    // Z = integral of max(0, phi(x/5)/5 - phi(x)) dx, Simpson's rule on [-80, 80] (kinks at +-r*, error ~1e-10).
    const phi = (x: number) => Math.exp(-0.5 * x * x) / Math.sqrt(2 * Math.PI);
    const f = (x: number) => Math.max(0, phi(x / 5) / 5 - phi(x));
    const N = 400000;
    const h = 160 / N;
    let Z = f(-80) + f(80);
    for (let i = 1; i < N; i++) Z += (i % 2 ? 4 : 2) * f(-80 + i * h);
    Z *= h / 3;
    expect(Math.exp(law.logAcceptanceRate)).toBeCloseTo(Z, 8);
    const n = 20000;
    const x = prior.sample(n, new Rng(12));
    const radius = exclusionRadiusCdf(law, 1);
    const cdf = (t: number) => (t < 0 ? 0.5 * (1 - radius(t * t)) : 0.5 * (1 + radius(t * t)));
    expect(ksDistance(x, cdf)).toBeLessThan(ksBound(n));
    expect(minOf(x.map(Math.abs)) ** 2).toBeGreaterThan(law.thresholdMahalanobisSquared);
    const s = prior.stats!();
    expect(s.accepted).toBe(n);
    expect(Math.abs(s.acceptanceRate - Z) / Math.sqrt((Z * (1 - Z)) / s.tries)).toBeLessThan(5);
    // The accepted density integrates to 1.
    let total = 0;
    const grid = new Float32Array(N + 1).map((_, i) => -80 + i * h);
    const lp = prior.logProb!(grid);
    for (let i = 0; i <= N; i++) total += (i === 0 || i === N ? 1 : i % 2 ? 4 : 2) * Math.exp(lp[i]);
    expect((total * h) / 3).toBeCloseTo(1, 4);
  });

  it("2-D, full covariance: Mahalanobis radius against its closed form, uniform whitened angle", async () => {
    // Reference rows from a correlated 2-D Gaussian; the prior is fitted to them (source "context").
    const rng = new Rng(13);
    const activations = new Float32Array(4000);
    for (let i = 0; i < 2000; i++) {
      const a = rng.normal();
      const b = rng.normal();
      activations[2 * i] = 1 + 2 * a;
      activations[2 * i + 1] = -1 + 0.8 * a + 0.5 * b;
    }
    const prior = await createPrior(
      { kind: "exclusion", base: { kind: "fitted-gaussian", source: "context", jitter: 0 } },
      { dim: 2, activations },
    );
    const base = (prior as unknown as { base: GaussianPrior }).base;
    const law = (prior as unknown as { law: ExclusionLaw }).law;
    expect(law.cDim).toBeCloseTo(5, 12);
    // d = 2: P(chi2_2 > t) = exp(-t/2), so Z = exp(-r*^2 / (2 c_dim)) - exp(-r*^2 / 2) in closed form.
    const r0 = law.thresholdMahalanobisSquared;
    expect(r0).toBeCloseTo((2 * Math.log(5)) / (1 - 1 / 5), 12);
    const Z = Math.exp(-r0 / 10) - Math.exp(-r0 / 2);
    expect(Math.exp(law.logAcceptanceRate)).toBeCloseTo(Z, 12);
    const n = 20000;
    const x = prior.sample(n, new Rng(14));
    const r2 = base.mahalanobisSquared(x);
    const closedForm = (t: number) =>
      t <= r0 ? 0 : (Math.exp(-r0 / 10) - Math.exp(-t / 10) - Math.exp(-r0 / 2) + Math.exp(-t / 2)) / Z;
    expect(ksDistance(r2, closedForm)).toBeLessThan(ksBound(n));
    const [l00, l10, l11] = [base.cholesky![0], base.cholesky![2], base.cholesky![3]];
    const angles = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const w0 = (x[2 * i] - base.mean[0]) / l00;
      const w1 = (x[2 * i + 1] - base.mean[1] - l10 * w0) / l11;
      angles[i] = Math.atan2(w1, w0);
    }
    expect(ksDistance(angles, (t) => (t + Math.PI) / (2 * Math.PI))).toBeLessThan(ksBound(n));
    const s = prior.stats!();
    expect(Math.abs(s.acceptanceRate - Z) / Math.sqrt((Z * (1 - Z)) / s.tries)).toBeLessThan(5);
  });

  it("96-D on the vocabulary Gaussian: the thin shell r^2 > r*^2 ~ d + ln c, radius law, rate", async () => {
    const prior = await createPrior({ kind: "exclusion" }, { model: llama });
    const base = (prior as unknown as { base: GaussianPrior }).base;
    const law = (prior as unknown as { law: ExclusionLaw }).law;
    expect(law.thresholdMahalanobisSquared).toBeCloseTo(D + Math.log(5), 0);
    const n = 4000;
    const x = prior.sample(n, new Rng(15));
    const r2 = base.mahalanobisSquared(x);
    expect(minOf(r2)).toBeGreaterThan(law.thresholdMahalanobisSquared * (1 - 1e-6));
    expect(ksDistance(r2, exclusionRadiusCdf(law, D))).toBeLessThan(ksBound(n));
    const s = prior.stats!();
    const Z = s.expectedAcceptanceRate;
    expect(Math.abs(s.acceptanceRate - Z) / Math.sqrt((Z * (1 - Z)) / s.tries)).toBeLessThan(5);
    expect(prior.describe()).toMatchObject({
      kind: "exclusion",
      c: 5,
      maxTries: 10000,
      base: { kind: "fitted-gaussian" },
    });
  });

  it("bounded tries end in an error that names the rate and the remedy", async () => {
    const prior = await createPrior(
      { kind: "exclusion", base: { kind: "gaussian" }, maxTries: 1, c: 1.0001 },
      { dim: 64 },
    );
    expect(() => prior.sample(50, new Rng(1))).toThrow(
      /only \d+ of 50 samples accepted after 50 draws.*raise maxTries or lower c/,
    );
  });
});

describe("interpolation, kNN and posterior priors", () => {
  it("interpolation between the vocabulary and an activation Gaussian matches its exact moments", async () => {
    const texts = licenceTexts(60, 16);
    const first: PriorRecord = { kind: "fitted-gaussian" };
    const second: PriorRecord = {
      kind: "fitted-gaussian",
      source: "activations",
      layer: 1,
      texts,
      pooling: "token",
    };
    const prior = await createPrior({ kind: "interpolation", first, second }, { model: llama });
    const moments = (
      prior as unknown as { moments(): { mean: Float64Array; covariance: Float64Array } }
    ).moments();
    expectMoments(prior.sample(20000, new Rng(17)), D, moments.mean, moments.covariance);
    expect(prior.logProb).toBeUndefined(); // alpha ~ U[0, 1]: a continuous mixture, no closed-form density

    const fixed = await createPrior({ kind: "interpolation", first, second, alpha: 0.3 }, { model: llama });
    const m = (fixed as unknown as { moments(): { mean: Float64Array; covariance: Float64Array } }).moments();
    const x = fixed.sample(20000, new Rng(18));
    expectMoments(x, D, m.mean, m.covariance);
    // With a fixed alpha e is Gaussian: its squared Mahalanobis radius under the combined covariance is chi2_d.
    const r2 = fixed.energy!(x, false).mahalanobisSquared;
    expect(ksDistance(r2, (t) => 1 - Math.exp(chiSquareLogSurvival(t, D)))).toBeLessThan(ksBound(r2.length));
  });

  it("kNN: points at the chosen percentile of the vocabulary's nearest-neighbour distances from random rows", async () => {
    const vocab = llama.tokenEmbeddings();
    const nearest = new Float64Array(500).map((_, i) => {
      let best = Number.POSITIVE_INFINITY;
      for (let k = 0; k < 500; k++) {
        if (k === i) continue;
        let s = 0;
        for (let j = 0; j < D; j++) s += (vocab[i * D + j] - vocab[k * D + j]) ** 2;
        best = Math.min(best, s);
      }
      return Math.sqrt(best);
    });
    nearest.sort();
    for (const percentile of [10, 50]) {
      const prior = await createPrior({ kind: "knn", percentile, sampleRows: "all" }, { model: llama });
      const radius = quantile(nearest, percentile / 100);
      expect(prior.stats!().radius).toBeCloseTo(radius, 5);
      const x = prior.sample(200, new Rng(19));
      const anchors = (prior as unknown as { lastAnchors: Int32Array }).lastAnchors;
      anchors.forEach((a, i) => {
        let s = 0;
        for (let j = 0; j < D; j++) s += (x[i * D + j] - vocab[a * D + j]) ** 2;
        expect(Math.sqrt(s)).toBeCloseTo(radius, 4);
      });
      expect(new Set(anchors).size).toBeGreaterThan(150); // uniform anchors: ~164 distinct of 500 expected
    }
  });

  it("posterior: the first n vectors of an earlier run's prompt, plus N(0, noise^2) when asked", async () => {
    const prompt = (await createPrior({ kind: "gaussian", sigma: 1 }, { dim: D })).sample(20, new Rng(20));
    const file = join(dir, "prompt.safetensors");
    writeSafetensors(file, [{ name: "prompt", dtype: "F32", shape: [20, D], data: prompt }]);
    const exact = await createPrior({ kind: "posterior", path: file }, { dim: D });
    expect(exact.sample(20, new Rng(1))).toEqual(prompt);
    expect(exact.sample(5, new Rng(1))).toEqual(prompt.subarray(0, 5 * D));
    expect(() => exact.sample(21, new Rng(1))).toThrow(/holds 20 prompt vectors; asked for 21/);
    const noisy = await createPrior({ kind: "posterior", path: file, noise: 0.1 }, { dim: D });
    const diffs = new Float32Array(20 * D * 1000);
    const rng = new Rng(21);
    for (let t = 0; t < 1000; t++) {
      const x = noisy.sample(20, rng);
      for (let i = 0; i < x.length; i++) diffs[t * x.length + i] = x[i] - prompt[i];
    }
    expectMoments(diffs, D, new Float64Array(D), identity(D, 0.01));
    writeSafetensors(file, [
      { name: "prompt", dtype: "F32", shape: [20, D], data: prompt.map((v) => v + 1) },
    ]);
    await expect(createPrior(noisy.describe(), { dim: D })).rejects.toThrow(
      /prior\.sha256: the file .* changed/,
    );
  });
});

describe("reproducibility and errors", () => {
  it("every prior: the same seed gives the same draw, describe() rebuilds it, threads do not matter", async () => {
    const file = join(dir, "again.safetensors");
    writeSafetensors(file, [
      { name: "prompt", dtype: "F32", shape: [8, D], data: new Float32Array(8 * D).fill(0.5) },
    ]);
    const specs: PriorRecord[] = [
      { kind: "gaussian" },
      { kind: "xavier" },
      { kind: "uniform", range: 0.1 },
      { kind: "vocab", corpusText: licenceTexts(20, 1).join(" "), top: 40 },
      { kind: "vocab" },
      { kind: "class-label", words: ["the", " license"] },
      { kind: "fitted-gaussian", rows: 300, seed: 5 },
      { kind: "exclusion", c: 3 },
      { kind: "interpolation", first: { kind: "fitted-gaussian" }, second: { kind: "gaussian", sigma: 0.1 } },
      { kind: "knn", percentile: 90 },
      { kind: "posterior", path: file, noise: 0.01 },
    ];
    for (const spec of specs) {
      const context: PriorContext = { model: llama, threads: 2 };
      const prior = await createPrior(spec, context);
      const a = prior.sample(8, new Rng(99));
      expect(prior.sample(8, new Rng(99)), spec.kind).toEqual(a);
      expect(prior.sample(8, new Rng(98)), spec.kind).not.toEqual(a);
      const rebuilt = await createPrior(prior.describe(), { model: llama, threads: 1 });
      expect(rebuilt.describe(), spec.kind).toEqual(prior.describe());
      expect(rebuilt.sample(8, new Rng(99)), spec.kind).toEqual(a);
      expect(JSON.parse(JSON.stringify(prior.describe()))).toEqual(prior.describe());
    }
  });

  it("errors name the option, the expected value and what was given", async () => {
    await expect(createPrior({ kind: "gausian" }, { dim: 4 })).rejects.toThrow(
      /prior\.kind: expected one of "gaussian"/,
    );
    await expect(createPrior({ kind: "gaussian", sigma: -1 }, { dim: 4 })).rejects.toThrow(
      /prior\.sigma: expected a finite number >= 1e-30 and <= 1e\+30, got number -1/,
    );
    await expect(createPrior({ kind: "gaussian", sigma: 1, sgima: 2 }, { dim: 4 })).rejects.toThrow(
      /prior\.sgima: not an option/,
    );
    await expect(createPrior({ kind: "uniform" }, {})).rejects.toThrow(/give context\.dim or context\.model/);
    await expect(createPrior({ kind: "exclusion", base: { kind: "uniform" } }, { dim: 4 })).rejects.toThrow(
      /prior\.base: expected a "gaussian" or "fitted-gaussian" prior, got "uniform"/,
    );
    await expect(
      createPrior(
        { kind: "fitted-gaussian", source: "activations", layer: 9, texts: ["a"] },
        { model: llama },
      ),
    ).rejects.toThrow(/prior\.layer: expected an integer >= 0 and <= 3, got number 9/);
    await expect(
      createPrior(
        { kind: "interpolation", first: { kind: "gaussian" }, second: { kind: "gaussian" }, alpha: 2 },
        { dim: 4 },
      ),
    ).rejects.toThrow(/prior\.alpha: expected "uniform" or a number from 0 to 1/);
    const p = await createPrior({ kind: "gaussian" }, { dim: 4 });
    expect(() => p.sample(0, new Rng(1))).toThrow(/n: expected a positive integer/);
    expect(() => p.logProb!(new Float32Array(5))).toThrow(
      /x: expected a non-empty length that is a multiple of dim \(4\)/,
    );
    const a = addon();
    expect(() =>
      a.priorGaussianEnergy(
        new Float64Array(4) as unknown as Float32Array,
        2,
        new Float64Array(2),
        new Float64Array(4),
        true,
        1,
      ),
    ).toThrow(/x: expected Float32Array, got Float64Array/);
    expect(() =>
      a.priorGaussianTransform(new Float64Array(4), 2, new Float64Array(3), new Float64Array(4), 1, 1),
    ).toThrow(/mean: expected 2 elements, got 3/);
    await expect(a.priorCholesky(new Float64Array([1, 2, 2, 1]), 2, 1)).rejects.toThrow(
      /matrix: not positive definite/,
    );
  });
});

describe("regularisers", () => {
  it("prior-nll on a fitted Gaussian: 0.5 sum of squared Mahalanobis distances; gradient Sigma^-1 (x - mu)", async () => {
    const prior = (await createPrior({ kind: "fitted-gaussian" }, { model: llama })) as GaussianPrior;
    const reg = createRegularizer({ kind: "prior-nll" }, { prior, dim: D });
    const x = (await createPrior({ kind: "gaussian", sigma: 0.05 }, { dim: D })).sample(3, new Rng(22));
    const { value, gradient } = reg.valueAndGradient(x);
    const r2 = await addon().mahalanobisSquared(x, D, prior.mean, prior.cholesky!, 1);
    expect(value).toBeCloseTo(0.5 * (r2[0] + r2[1] + r2[2]), 6);
    // Sigma g = x - mu, row by row.
    const S = prior.covariance();
    for (let r = 0; r < 3; r++)
      for (let i = 0; i < D; i++) {
        let s = 0;
        for (let j = 0; j < D; j++) s += S[i * D + j] * gradient[r * D + j];
        expect(Math.abs(s - (x[r * D + i] - prior.mean[i]))).toBeLessThan(
          1e-5 * Math.abs(x[r * D + i] - prior.mean[i]) + 1e-7,
        );
      }
    const coords = Array.from({ length: 40 }, (_, i) => (i * 7) % (3 * D));
    // Quadratic energy: the central difference is exact up to rounding (fp32 steps, float64 values).
    expect(finiteDifferenceError((v) => reg.value(v), gradient, x, coords, 1e-3)).toBeLessThan(1e-3);
    expect(reg.describe()).toEqual({ kind: "prior-nll", prior: prior.describe() });
  });

  it("prior-nll on the isotropic Gaussian, a fixed-alpha interpolation and a noisy posterior; refused elsewhere", async () => {
    const iso = await createPrior({ kind: "gaussian", sigma: 0.1 }, { dim: D });
    const x = iso.sample(2, new Rng(23));
    const reg = createRegularizer({ kind: "prior-nll" }, { prior: iso, dim: D });
    expect(reg.value(x)).toBeCloseTo(0.5 * x.reduce((s, v) => s + (v / 0.1) ** 2, 0), 6);
    expect(
      finiteDifferenceError((v) => reg.value(v), reg.gradient(x), x, [0, 5, 100, 191], 1e-3),
    ).toBeLessThan(1e-3);
    const mixed = await createPrior(
      {
        kind: "interpolation",
        first: { kind: "fitted-gaussian" },
        second: { kind: "gaussian", sigma: 0.1 },
        alpha: 0.5,
      },
      { model: llama },
    );
    const mreg = createRegularizer({ kind: "prior-nll" }, { prior: mixed, dim: D });
    expect(finiteDifferenceError((v) => mreg.value(v), mreg.gradient(x), x, [1, 50, 150], 1e-3)).toBeLessThan(
      1e-3,
    );
    const file = join(dir, "nll.safetensors");
    writeSafetensors(file, [{ name: "prompt", dtype: "F32", shape: [2, D], data: x.map((v) => v * 0.5) }]);
    const post = await createPrior({ kind: "posterior", path: file, noise: 0.2 }, { dim: D });
    const preg = createRegularizer({ kind: "prior-nll" }, { prior: post, dim: D });
    expect(finiteDifferenceError((v) => preg.value(v), preg.gradient(x), x, [3, 99], 1e-3)).toBeLessThan(
      1e-3,
    );
    for (const spec of [
      { kind: "uniform" },
      { kind: "exclusion", base: { kind: "gaussian" } },
      { kind: "posterior", path: file }, // no noise: a point mass (it used to fail at the first step)
    ] as PriorRecord[]) {
      const prior: Prior = await createPrior(spec, { dim: D });
      expect(() => createRegularizer({ kind: "prior-nll" }, { prior, dim: D })).toThrow(
        /has no smooth log-density/,
      );
    }
  });

  it("uniform log-density holds at its own float32 samples' edge; scales that overflow float32 are refused", async () => {
    const uniform = await createPrior({ kind: "uniform", range: 0.3 }, { dim: 1 });
    // fround(0.3) > 0.3: a draw just inside the support rounds to it.
    expect(Math.fround(0.3)).toBeGreaterThan(0.3);
    expect(uniform.logProb!(new Float32Array([0.3]))[0]).toBeCloseTo(-Math.log(0.6), 12);
    expect(uniform.logProb!(new Float32Array([0.31]))[0]).toBe(Number.NEGATIVE_INFINITY);
    await expect(createPrior({ kind: "gaussian", sigma: 1e39 }, { dim: 2 })).rejects.toThrow(
      "prior.sigma: expected a finite number >= 1e-30 and <= 1e+30, got number 1e+39",
    );
    await expect(createPrior({ kind: "uniform", range: 1e308 }, { dim: 2 })).rejects.toThrow(/prior\.range/);
  });

  it("l2-init and nearest-vocab: values, gradients by central differences, exact nearest rows", async () => {
    const vocab = llama.tokenEmbeddings();
    const x0 = (await createPrior({ kind: "vocab" }, { model: llama })).sample(4, new Rng(24));
    const x = x0.map((v, i) => v + 0.01 * Math.sin(i));
    const l2 = createRegularizer({ kind: "l2-init" }, { init: x0, dim: D });
    expect(l2.value(x)).toBeCloseTo(0.5 * x.reduce((s, v, i) => s + (v - x0[i]) ** 2, 0), 8);
    expect(
      finiteDifferenceError((v) => l2.value(v), l2.gradient(x), x, [0, 10, 200, 383], 1e-3),
    ).toBeLessThan(1e-3);

    const near = createRegularizer({ kind: "nearest-vocab" }, { vocab, dim: D });
    const { value, gradient } = near.valueAndGradient(x);
    let expected = 0;
    for (let r = 0; r < 4; r++) {
      let best = Number.POSITIVE_INFINITY;
      for (let k = 0; k < 500; k++) {
        let s = 0;
        for (let j = 0; j < D; j++) s += (x[r * D + j] - vocab[k * D + j]) ** 2;
        best = Math.min(best, s);
      }
      expected += 0.5 * best;
    }
    expect(value).toBeCloseTo(expected, 8);
    // Small steps keep every row's nearest vocabulary row (a piecewise quadratic away from the cell walls).
    expect(finiteDifferenceError((v) => near.value(v), gradient, x, [0, 10, 200, 383], 1e-4)).toBeLessThan(
      1e-3,
    );
    near.dispose();
    expect(() => near.value(x)).toThrow(/Regularizer is disposed/);
    expect(() => createRegularizer({ kind: "l2-init" }, { dim: D })).toThrow(
      /context\.init: expected a Float32Array/,
    );
    expect(() => createRegularizer({ kind: "l2" } as never, { dim: D })).toThrow(
      /regularizer\.kind: expected/,
    );
  });
});

describe("priortune sample-prior", () => {
  async function run(...args: string[]): Promise<string> {
    const program = new Command().name("priortune").exitOverride();
    registerSamplePrior(program);
    const out: string[] = [];
    const spy = vi.spyOn(process.stdout, "write").mockImplementation((chunk) => {
      out.push(String(chunk));
      return true;
    });
    try {
      await program.parseAsync(["node", "priortune", "sample-prior", ...args]);
    } finally {
      spy.mockRestore();
    }
    return out.join("");
  }

  it("writes the draw with the prior's record, seed and statistics; the record rebuilds the same draw", async () => {
    const out = join(dir, "cli.safetensors");
    const text = await run(
      modelDir("llama-tiny"),
      "--prior",
      "exclusion",
      "--count",
      "6",
      "--seed",
      "4",
      "--out",
      out,
    );
    expect(text).toMatch(/wrote 6 x 96 exclusion prior vectors \(seed 4\)/);
    const { tensors, metadata } = readTensors(out);
    expect(tensors.get("prompt")!.shape).toEqual([6, D]);
    expect(metadata.seed).toBe("4");
    expect(JSON.parse(metadata.stats).accepted).toBe(6);
    const prior = await createPrior(JSON.parse(metadata.prior), { model: llama });
    expect(tensors.get("prompt")!.data).toEqual(prior.sample(6, new Rng(4)));
  });

  it("maps flags to records and refuses flags the kind does not take", async () => {
    expect(priorRecordFromOptions({ prior: "gaussian", sigma: 0.1 })).toEqual({
      kind: "gaussian",
      sigma: 0.1,
    });
    expect(
      priorRecordFromOptions({ prior: "fitted-gaussian", texts: "a.txt", layer: 2, pooling: "token" }),
    ).toEqual({
      kind: "fitted-gaussian",
      source: "activations",
      textsFile: "a.txt",
      layer: 2,
      pooling: "token",
    });
    expect(priorRecordFromOptions({ prior: "exclusion", base: "gaussian", sigma: 1, c: 3 })).toEqual({
      kind: "exclusion",
      base: { kind: "gaussian", sigma: 1 },
      c: 3,
    });
    expect(priorRecordFromOptions({ spec: '{"prior": {"kind": "uniform", "range": 0.1}}' })).toEqual({
      kind: "uniform",
      range: 0.1,
    });
    expect(() => priorRecordFromOptions({ prior: "uniform", sigma: 2 })).toThrow(
      /--sigma: not an option of --prior uniform/,
    );
    expect(() => priorRecordFromOptions({ spec: "{}", sigma: 2 })).toThrow(/leave out --sigma/);
    // Flags the chosen --base / --fill does not use were dropped (a different prior than asked for, exit 0).
    expect(() => priorRecordFromOptions({ prior: "exclusion", sigma: 5, mean: 3 })).toThrow(
      "--sigma, --mean: not used with --base fitted-gaussian",
    );
    expect(() =>
      priorRecordFromOptions({ prior: "exclusion", base: "gaussian", texts: "t.txt", layer: 2 }),
    ).toThrow(
      /--layer, --texts: not used with --base gaussian|--texts, --layer: not used with --base gaussian/,
    );
    expect(() =>
      priorRecordFromOptions({ prior: "class-label", words: ["yes"], sigma: 5, range: 3 }),
    ).toThrow("--sigma, --range: not used with --fill vocab");
    expect(
      priorRecordFromOptions({ prior: "class-label", words: ["yes"], fill: "uniform", range: 3 }),
    ).toEqual({
      kind: "class-label",
      words: ["yes"],
      fill: { kind: "uniform", range: 3 },
    });
    const stderr = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    try {
      await run(
        modelDir("llama-tiny"),
        "--prior",
        "knn",
        "--percentile",
        "101",
        "--out",
        join(dir, "x.safetensors"),
      );
      expect(process.exitCode).toBe(1);
      expect(String(stderr.mock.calls[0]?.[0])).toMatch(
        /prior\.percentile: expected a finite number >= 0 and <= 100/,
      );
    } finally {
      stderr.mockRestore();
      process.exitCode = 0;
    }
  });
});
