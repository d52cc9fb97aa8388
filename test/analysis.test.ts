// Statistics, projections, activation capture and plots, checked against closed forms and independent
// implementations written here (a Jacobi eigen-solver, direct float64 sums).
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { captureActivations, loadActivations } from "../lib/activations.js";
import {
  convergenceByRun,
  convergenceStep,
  fitGaussian,
  frechetDistance,
  gaussianKl,
  kMeans,
  linearProbe,
  lossCurve,
  mannWhitneyU,
  mmd,
  normalTwoSidedP,
  readMetrics,
  studentTwoSidedP,
  trajectoryStatistics,
  welchTTest,
} from "../lib/analysis.js";
import { loadModel, type Model } from "../lib/model.js";
import { addon } from "../lib/native.js";
import { barSpec, lossCurveSpec, renderFigure, scatterSpec } from "../lib/plots.js";
import { exactNeighbors, fitPca, tsne, umap } from "../lib/projection.js";
import { Rng } from "../lib/rng.js";
import type { EvalRecord, StepRecord } from "../lib/train.js";
import { modelDir } from "./helpers.js";

/** n x d rows of N(shift, scale^2) per coordinate. */
function gaussianRows(n: number, d: number, rng: Rng, shift = 0, scale = 1): Float32Array {
  const x = new Float32Array(n * d);
  for (let i = 0; i < x.length; i++) x[i] = shift + scale * rng.normal();
  return x;
}

/** Cyclic Jacobi eigenvalue algorithm (Golub and Van Loan, section 8.5): an independent reference. */
function jacobiEigen(a: Float64Array, n: number): { values: number[]; vectors: number[][] } {
  const A = Float64Array.from(a);
  const V = new Float64Array(n * n);
  for (let i = 0; i < n; i++) V[i * n + i] = 1;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) off += A[p * n + q] ** 2;
    if (off < 1e-26) break;
    for (let p = 0; p < n; p++)
      for (let q = p + 1; q < n; q++) {
        if (A[p * n + q] === 0) continue;
        const theta = (A[q * n + q] - A[p * n + p]) / (2 * A[p * n + q]);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = A[k * n + p];
          const akq = A[k * n + q];
          A[k * n + p] = c * akp - s * akq;
          A[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = A[p * n + k];
          const aqk = A[q * n + k];
          A[p * n + k] = c * apk - s * aqk;
          A[q * n + k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = V[k * n + p];
          const vkq = V[k * n + q];
          V[k * n + p] = c * vkp - s * vkq;
          V[k * n + q] = s * vkp + c * vkq;
        }
      }
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => A[y * n + y] - A[x * n + x]);
  return {
    values: order.map((i) => A[i * n + i]),
    vectors: order.map((i) => Array.from({ length: n }, (_, k) => V[k * n + i])),
  };
}

function covarianceOf(x: Float32Array, n: number, d: number): { mean: Float64Array; cov: Float64Array } {
  const mean = new Float64Array(d);
  for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) mean[j] += x[r * d + j] / n;
  const cov = new Float64Array(d * d);
  for (let r = 0; r < n; r++)
    for (let i = 0; i < d; i++)
      for (let j = 0; j < d; j++)
        cov[i * d + j] += ((x[r * d + i] - mean[i]) * (x[r * d + j] - mean[j])) / (n - 1);
  return { mean, cov };
}

const gaussian2 = (mean: number[], cov: number[]) => ({
  dim: 2,
  mean: Float64Array.from(mean),
  covariance: Float64Array.from(cov),
});

describe("symmetric eigen-decomposition (native)", () => {
  it("matches a Jacobi reference, reconstructs the matrix and does not depend on the thread count", async () => {
    const n = 60;
    const rng = new Rng(3);
    const a = new Float64Array(n * n);
    for (let i = 0; i < n; i++)
      for (let j = 0; j <= i; j++) {
        const v = rng.normal();
        a[i * n + j] = v;
        a[j * n + i] = v;
      }
    const one = await addon().analysisSymmetricEigen(a, n, true, 1);
    const two = await addon().analysisSymmetricEigen(a, n, true, 2);
    expect(Array.from(two.values)).toEqual(Array.from(one.values));
    expect(Array.from(two.vectors!)).toEqual(Array.from(one.vectors!));
    const ref = jacobiEigen(a, n);
    let err = 0;
    for (let k = 0; k < n; k++) {
      err = Math.max(err, Math.abs(one.values[k] - ref.values[k]));
      let dot = 0;
      for (let j = 0; j < n; j++) dot += one.vectors![k * n + j] * ref.vectors[k][j];
      err = Math.max(err, Math.abs(Math.abs(dot) - 1));
    }
    // float64 on a matrix of norm ~ 2 sqrt(n): agreement to ~1e-12 (distinct eigenvalues of a random matrix).
    expect(err).toBeLessThan(1e-9);
    let rec = 0;
    for (let i = 0; i < n; i++)
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let k = 0; k < n; k++) s += one.values[k] * one.vectors![k * n + i] * one.vectors![k * n + j];
        rec = Math.max(rec, Math.abs(s - a[i * n + j]));
      }
    expect(rec).toBeLessThan(1e-12);
    const valuesOnly = await addon().analysisSymmetricEigen(a, n, false, 2);
    expect(valuesOnly.vectors).toBeNull();
    for (let k = 0; k < n; k++) expect(valuesOnly.values[k]).toBeCloseTo(one.values[k], 11);
  });

  it("handles a repeated eigenvalue and a 1 x 1 matrix", async () => {
    const eye = await addon().analysisSymmetricEigen(
      Float64Array.from([2, 0, 0, 0, 2, 0, 0, 0, 2]),
      3,
      true,
      1,
    );
    expect(Array.from(eye.values)).toEqual([2, 2, 2]);
    const one = await addon().analysisSymmetricEigen(Float64Array.from([5]), 1, true, 1);
    expect(Array.from(one.values)).toEqual([5]);
    expect(Array.from(one.vectors!)).toEqual([1]);
  });
});

describe("distances between Gaussians", () => {
  it("Frechet distance equals the closed forms", async () => {
    // Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt a_i - sqrt b_i)^2.
    const a = gaussian2([0, 0], [1, 0, 0, 1]);
    const b = gaussian2([1, 2], [4, 0, 0, 9]);
    const f = await frechetDistance(a, b, { threads: 1 });
    expect(f.meanTerm).toBeCloseTo(5, 12);
    expect(f.covarianceTerm).toBeCloseTo(1 + 4, 12);
    // Non-commuting 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), M = S1^1/2 S2 S1^1/2, tr M = tr(S1 S2),
    // det M = det S1 det S2.
    const s1 = [2, 0.7, 0.7, 1];
    const s2 = [1, -0.4, -0.4, 3];
    const trS1S2 = s1[0] * s2[0] + s1[1] * s2[2] + s1[2] * s2[1] + s1[3] * s2[3];
    const det = (m: number[]) => m[0] * m[3] - m[1] * m[2];
    const cross = Math.sqrt(trS1S2 + 2 * Math.sqrt(det(s1) * det(s2)));
    const g = await frechetDistance(gaussian2([1, -1], s1), gaussian2([0, 0.5], s2), { threads: 2 });
    expect(g.distanceSquared).toBeCloseTo(1 + 2.25 + 3 + 4 - 2 * cross, 12);
    // Zero for a Gaussian and itself, including a singular covariance.
    const singular = gaussian2([3, 3], [1, 1, 1, 1]);
    expect((await frechetDistance(singular, singular)).distanceSquared).toBeLessThan(1e-12);
  });

  it("KL and symmetric KL equal the closed form", async () => {
    const s1 = [2, 0.7, 0.7, 1];
    const s2 = [1, -0.4, -0.4, 3];
    const m1 = [1, -1];
    const m2 = [0, 0.5];
    const det = (m: number[]) => m[0] * m[3] - m[1] * m[2];
    const inv = (m: number[]) => [m[3], -m[1], -m[2], m[0]].map((v) => v / det(m));
    const kl = (ma: number[], sa: number[], mb: number[], sb: number[]) => {
      const ib = inv(sb);
      const tr = ib[0] * sa[0] + ib[1] * sa[2] + ib[2] * sa[1] + ib[3] * sa[3];
      const dx = mb[0] - ma[0];
      const dy = mb[1] - ma[1];
      const quad = dx * (ib[0] * dx + ib[1] * dy) + dy * (ib[2] * dx + ib[3] * dy);
      return 0.5 * (tr + quad - 2 + Math.log(det(sb) / det(sa)));
    };
    const r = await gaussianKl(gaussian2(m1, s1), gaussian2(m2, s2), { threads: 1 });
    expect(r.forward).toBeCloseTo(kl(m1, s1, m2, s2), 12);
    expect(r.backward).toBeCloseTo(kl(m2, s2, m1, s1), 12);
    expect(r.symmetric).toBeCloseTo(r.forward + r.backward, 12);
    const same = await gaussianKl(gaussian2(m1, s1), gaussian2(m1, s1));
    expect(Math.abs(same.symmetric)).toBeLessThan(1e-12);
  });

  it("fitGaussian recovers the sample moments (with its small ridge) and feeds the distances", async () => {
    const rng = new Rng(5);
    const d = 6;
    const n = 500;
    const x = gaussianRows(n, d, rng);
    const g = await fitGaussian(x, d, { ridgeRelative: 0 });
    const ref = covarianceOf(x, n, d);
    for (let i = 0; i < d; i++) expect(g.mean[i]).toBeCloseTo(ref.mean[i], 6);
    const cov = g.covariance();
    for (let i = 0; i < d * d; i++) expect(cov[i]).toBeCloseTo(ref.cov[i], 5);
    const y = gaussianRows(n, d, rng, 2);
    const h = await fitGaussian(y, d, { ridgeRelative: 0 });
    // Means 2 apart in each of 6 coordinates, covariances ~ I: Frechet ~ 24, symmetric KL ~ 24.
    expect((await frechetDistance(g, h)).distanceSquared).toBeGreaterThan(20);
    expect((await gaussianKl(g, h)).symmetric).toBeGreaterThan(20);
  });

  it("the fit is float64: nearly collinear columns without a ridge match a float64 reference", async () => {
    // x2 = x1 + 1e-4 noise: the covariance's smallest direction is 1e-8 of its scale. The fp32 GEMM
    // products the fit used before carried ~1e-7 rounding: Mahalanobis^2 of the probe 1.32 instead of 4.99.
    const rng = new Rng(7);
    const n = 2000;
    const x = new Float32Array(2 * n);
    for (let r = 0; r < n; r++) {
      const a = rng.normal();
      x[2 * r] = a;
      x[2 * r + 1] = a + 1e-4 * rng.normal();
    }
    const ref = covarianceOf(x, n, 2);
    const [sxx, sxy, , syy] = ref.cov;
    const det = sxx! * syy! - sxy! * sxy!;
    const probe = Float32Array.from([1, 1 + 2e-4]);
    const dx = probe[0]! - ref.mean[0]!;
    const dy = probe[1]! - ref.mean[1]!;
    const m2 = (syy! * dx * dx - 2 * sxy! * dx * dy + sxx! * dy * dy) / det;
    const g = await fitGaussian(x, 2, { ridgeRelative: 0, threads: 1 });
    expect(g.mahalanobisSquared(probe)[0]! / m2).toBeCloseTo(1, 6);
    expect(g.logDet / Math.log(det)).toBeCloseTo(1, 8);
  });
});

describe("MMD, linear probe, k-means: edge cases", () => {
  it("MMD's fallback bandwidth follows the data's scale when most points coincide", async () => {
    const x = new Float32Array(15 * 2); // 15 copies of the origin
    const y = (v: number) => new Float32Array(10).fill(v); // 5 copies of (v, v)
    const small = await mmd(x, y(1e-3), 2, { threads: 1 });
    const large = await mmd(x, y(1e3), 2, { threads: 1 });
    expect(small.mmd2).toBeCloseTo(large.mmd2, 6); // 2e-6 against 2 with the old fixed bandwidth of 1
    expect(small.mmd2).toBeGreaterThan(0.1);
  });

  it("the linear probe refuses non-finite rows and a bad l2; k-means' inertia is of its centroids", async () => {
    const rows = gaussianRows(40, 3, new Rng(4));
    const labels = Int32Array.from({ length: 40 }, (_, i) => i % 2);
    const bad = rows.slice();
    bad[7] = Number.NaN;
    await expect(linearProbe(bad, labels, 3, { threads: 1 })).rejects.toThrow(
      "rows: row 2, column 1 is NaN (values must be finite)",
    );
    await expect(linearProbe(rows, labels, 3, { l2: -5, threads: 1 })).rejects.toThrow(
      "l2: expected a finite number >= 0, got -5",
    );
    // Stopped by maxIterations: the inertia is recomputed for the centroids returned (it was the previous
    // centroids' before, 215 against 143 in the review's case).
    const data = gaussianRows(30, 4, new Rng(5));
    const km = await kMeans(data, 4, { k: 3, maxIterations: 1, restarts: 1, seed: 2, threads: 1 });
    let inertia = 0;
    for (let i = 0; i < 30; i++) {
      let best = Number.POSITIVE_INFINITY;
      for (let c = 0; c < 3; c++) {
        let d2 = 0;
        for (let j = 0; j < 4; j++) d2 += (data[i * 4 + j] - km.centroids[c * 4 + j]) ** 2;
        best = Math.min(best, d2);
      }
      inertia += best;
    }
    expect(km.inertia).toBeCloseTo(inertia, 3);
  });

  it("t-SNE options are checked; figures survive control characters in labels", async () => {
    const rows = gaussianRows(12, 3, new Rng(6));
    await expect(tsne(rows, 3, { learningRate: Number.NaN, threads: 1 })).rejects.toThrow(
      "learningRate: expected a finite number > 0, got NaN",
    );
    await expect(tsne(rows, 3, { init: "bogus" as "pca", threads: 1 })).rejects.toThrow(
      'init: expected "pca" or "random", got "bogus"',
    );
    await expect(tsne(rows, 3, { perplexity: 0.3, threads: 1 })).rejects.toThrow(
      "perplexity: expected a number >= 1, got 0.3",
    );
    // One-dimensional rows: PCA gives one component (the default init asked for two and threw).
    const line = Float32Array.from({ length: 30 }, (_, i) => i + (i % 3) * 0.1);
    const t = await tsne(line, 1, { iterations: 50, threads: 1 });
    expect(t).toHaveLength(60);
    expect(t.every(Number.isFinite)).toBe(true);
    // UMAP: a fractional or infinite epoch count hung the process in umap-js; 0 ran its default silently.
    for (const [o, message] of [
      [{ epochs: 2.5 }, /epochs: expected an integer/],
      [{ epochs: Number.POSITIVE_INFINITY }, /epochs: expected an integer/],
      [{ epochs: 0 }, /epochs: expected an integer/],
      [{ spread: -1 }, /spread: expected a finite number > 0, got -1/],
      [{ minDist: 5 }, /minDist: expected a number from 0 to spread \(1\), got 5/],
    ] as const)
      await expect(umap(rows, 3, { ...o, threads: 1 })).rejects.toThrow(message);
    const fig = await renderFigure(barSpec([{ name: "tab\there\u0001ctl", value: 1 }], { title: "x" }));
    expect(fig.svg).toContain("\uFFFD");
    expect(fig.png.length).toBeGreaterThan(100);
  });
});

describe("MMD, linear probe, k-means", () => {
  const d = 8;
  const rng = new Rng(11);
  const x = gaussianRows(300, d, rng);
  const y = gaussianRows(300, d, rng);
  const shifted = gaussianRows(300, d, rng, 0.8);

  it("MMD is about 0 for one distribution and positive for a shift, with a permutation p-value", async () => {
    const same = await mmd(x, y, d, { permutations: 100, threads: 2 });
    const self = await mmd(x, x, d);
    const shift = await mmd(x, shifted, d, { permutations: 100, threads: 2 });
    expect(Math.abs(same.mmd2)).toBeLessThan(0.01);
    expect(Math.abs(self.mmd2)).toBeLessThan(0.01);
    expect(shift.mmd2).toBeGreaterThan(0.1);
    expect(same.pValue!).toBeGreaterThan(0.01);
    expect(shift.pValue!).toBeLessThan(0.02);
    // The median heuristic: the median distance of two N(0, I_8) points is about sqrt(2 * 8).
    expect(same.bandwidth).toBeGreaterThan(3.5);
    expect(same.bandwidth).toBeLessThan(4.5);
  });

  it("the linear probe separates shifted sets and not identical ones", async () => {
    const labels = new Int32Array(600).fill(1, 300);
    const join2 = (a: Float32Array, b: Float32Array) => {
      const out = new Float32Array(a.length + b.length);
      out.set(a);
      out.set(b, a.length);
      return out;
    };
    const far = gaussianRows(300, d, rng, 3);
    const sep = await linearProbe(join2(x, far), labels, d, { threads: 2 });
    const none = await linearProbe(join2(x, y), labels, d, { threads: 2 });
    expect(sep.accuracy).toBeGreaterThan(0.99);
    expect(sep.chance).toBe(0.5);
    expect(sep.foldAccuracies).toHaveLength(5);
    expect(none.accuracy).toBeLessThan(0.6);
  });

  it("k-means finds three separable blobs, the same way for a seed", async () => {
    const centres = [-10, 0, 10];
    const blobs = new Float32Array(3 * 100 * d);
    centres.forEach((c, b) => {
      blobs.set(gaussianRows(100, d, rng, c), b * 100 * d);
    });
    const r = await kMeans(blobs, d, { k: 3, seed: 1 });
    for (let b = 0; b < 3; b++) {
      const ids = new Set(r.assignments.subarray(b * 100, (b + 1) * 100));
      expect(ids.size).toBe(1);
    }
    expect(new Set(r.assignments).size).toBe(3);
    const again = await kMeans(blobs, d, { k: 3, seed: 1 });
    expect(Array.from(again.assignments)).toEqual(Array.from(r.assignments));
    expect(again.inertia).toBe(r.inertia);
  });
});

describe("tests and trajectories", () => {
  it("p-values match tabulated quantiles", () => {
    expect(studentTwoSidedP(1, 1)).toBeCloseTo(0.5, 12); // Cauchy
    expect(studentTwoSidedP(2.228138851986274, 10)).toBeCloseTo(0.05, 9);
    expect(normalTwoSidedP(1.959963984540054)).toBeCloseTo(0.05, 12);
    const u = mannWhitneyU([1, 2, 3], [4, 5, 6]);
    expect(u.u).toBe(0);
    expect(u.probabilityGreater).toBe(0);
    // Welch by hand: t = (m_a - m_b) / sqrt(v_a/n_a + v_b/n_b), Welch-Satterthwaite df.
    const a = [19.8, 20.4, 19.6, 17.8, 18.5, 18.9, 18.3, 18.9, 19.5, 22.0];
    const b = [28.2, 26.6, 20.1, 23.3, 25.2, 22.1, 17.7, 27.6, 20.6, 13.7, 23.2, 17.5];
    const moments = (x: number[]) => {
      const m = x.reduce((p, q) => p + q, 0) / x.length;
      return { m, v: x.reduce((p, q) => p + (q - m) ** 2, 0) / (x.length - 1) / x.length, n: x.length };
    };
    const ma = moments(a);
    const mb = moments(b);
    const w = welchTTest(a, b);
    expect(w.statistic).toBeCloseTo((ma.m - mb.m) / Math.sqrt(ma.v + mb.v), 12);
    expect(w.df).toBeCloseTo((ma.v + mb.v) ** 2 / (ma.v ** 2 / (ma.n - 1) + mb.v ** 2 / (mb.n - 1)), 10);
    expect(w.pValue).toBeCloseTo(studentTwoSidedP(w.statistic, w.df!), 14);
  });

  it("trajectory statistics tell a narrower step spread from a random walk with the same mean step", () => {
    const rng = new Rng(9);
    const d = 5;
    // A walk whose step lengths are uniform in `range`, in random directions.
    const walk = (T: number, lo: number, hi: number) => {
      const t = new Float32Array(T * d);
      for (let p = 1; p < T; p++) {
        const dir = Array.from({ length: d }, () => rng.normal());
        const norm = Math.hypot(...dir);
        const len = lo + (hi - lo) * rng.uniform();
        for (let j = 0; j < d; j++) t[p * d + j] = t[(p - 1) * d + j] + (len * dir[j]) / norm;
      }
      return t;
    };
    const data = Array.from({ length: 40 }, () => walk(20, 0.9, 1.1));
    const base = Array.from({ length: 40 }, () => walk(20, 0, 2));
    const s = trajectoryStatistics(data, base, d);
    expect(s.data.count).toBe(40 * 19);
    // Step lengths are float32 sums: 1e-5 of the exact uniform draws.
    expect(s.data.mean).toBeCloseTo(1, 1);
    expect(s.baseline.mean).toBeCloseTo(1, 1);
    expect(s.spreadRatio).toBeCloseTo(0.1, 1); // (0.2 / sqrt 12) / (2 / sqrt 12)
    expect(s.spread.pValue).toBeLessThan(1e-10);
    expect(s.welch.pValue).toBeGreaterThan(1e-3);
  });
});

describe("convergence from metrics.jsonl", () => {
  it("reads step and eval records and finds the first step at a level", () => {
    const dir = mkdtempSync(join(tmpdir(), "priortune-metrics-"));
    const write = (name: string, evals: [number, number][]) => {
      mkdirSync(join(dir, name));
      const lines = [
        ...evals.map(([step, v]) => JSON.stringify({ type: "eval", step, validationLoss: v })),
        JSON.stringify({ type: "step", step: 1, loss: 3 }),
        '{"type": "step", "step"', // a torn last line is skipped
      ];
      writeFileSync(join(dir, name, "metrics.jsonl"), `${lines.join("\n")}`);
      return readMetrics(join(dir, name));
    };
    const near = write("near", [
      [10, 2.0],
      [20, 1.2],
      [30, 1.0],
    ]);
    const far = write("far", [
      [10, 3.0],
      [20, 2.0],
      [30, 1.5],
      [40, 1.1],
    ]);
    expect(near.steps).toHaveLength(1);
    const c = convergenceByRun([
      { name: "near", metrics: near },
      { name: "far", metrics: far },
    ]);
    expect(c.level).toBe(1.1);
    expect(c.steps.map((s) => s.step)).toEqual([30, 40]);
    const at = convergenceByRun([{ name: "far", metrics: far }], { level: 2 });
    expect(at.steps[0].step).toBe(20);
  });

  it("records without a finite loss never count as reaching a level", () => {
    // A collapse-only record (its NaN validation loss is null in JSON) at step 2 and a diverged training
    // loss: before, null <= level read as 0 <= level, so step 2 'converged'.
    const metrics = {
      steps: [5, 4, null, 3].map((loss, i) => ({ type: "step", step: i + 1, loss }) as unknown as StepRecord),
      evals: [
        { type: "eval", step: 2, validationLoss: null },
        { type: "eval", step: 4, validationLoss: 3.2 },
      ] as unknown as EvalRecord[],
    };
    expect(convergenceStep(metrics, 3.5)).toBe(4);
    expect(lossCurve(metrics).map((p) => p.step)).toEqual([4]);
    const train = lossCurve(metrics, { source: "train", window: 2 });
    expect(train.map((p) => p.loss)).toEqual([5, 4.5, Number.NaN, Number.NaN]);
    expect(convergenceStep(metrics, 1, { source: "train", window: 2 })).toBeNull();
    expect(() => lossCurve(metrics, { source: "valid" as "train" })).toThrow(
      'source: expected "validation" or "train", got "valid"',
    );
  });
});

describe("projections", () => {
  const rng = new Rng(21);
  const d = 12;
  // Anisotropic data: coordinate j has standard deviation 12 - j, then a random rotation (via Gram-Schmidt).
  const n = 400;
  const raw = new Float32Array(n * d);
  for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) raw[r * d + j] = (d - j) * rng.normal();

  it("exact PCA equals a direct eigen-decomposition of the covariance; randomised PCA agrees", async () => {
    const exact = await fitPca(raw, d, { components: 3, method: "exact", threads: 2 });
    const { cov } = covarianceOf(raw, n, d);
    const ref = jacobiEigen(cov, d);
    for (let c = 0; c < 3; c++) {
      expect(exact.explainedVariance[c]).toBeCloseTo(ref.values[c], 3);
      let dot = 0;
      for (let j = 0; j < d; j++) dot += exact.axes[c * d + j] * ref.vectors[c][j];
      expect(Math.abs(dot)).toBeCloseTo(1, 6);
    }
    const total = ref.values.reduce((s, v) => s + v, 0);
    expect(exact.explainedVarianceRatio[0]).toBeCloseTo(ref.values[0] / total, 4);
    const rand = await fitPca(raw, d, { components: 3, method: "randomized", seed: 1, threads: 2 });
    for (let c = 0; c < 3; c++) {
      expect(rand.explainedVariance[c] / exact.explainedVariance[c]).toBeCloseTo(1, 3);
      let dot = 0;
      for (let j = 0; j < d; j++) dot += exact.axes[c * d + j] * rand.axes[c * d + j];
      expect(dot).toBeCloseTo(1, 3); // same sign convention
    }
    const projected = exact.transform(raw.subarray(0, d));
    let manual = 0;
    for (let j = 0; j < d; j++) manual += (raw[j] - exact.mean[j]) * exact.axes[j];
    expect(projected[0]).toBeCloseTo(manual, 10);
  });

  it("exact neighbours, t-SNE and UMAP keep separated blobs apart, deterministically", async () => {
    const per = 40;
    const blobs = new Float32Array(3 * per * d);
    [-6, 0, 6].forEach((c, b) => {
      blobs.set(gaussianRows(per, d, rng, c), b * per * d);
    });
    const nn = await exactNeighbors(blobs, d, 5, 2);
    let brute = 0;
    for (let j = 0; j < 3 * per; j++) {
      if (j === 0) continue;
      let s = 0;
      for (let c = 0; c < d; c++) s += (blobs[c] - blobs[j * d + c]) ** 2;
      if (Math.sqrt(s) < nn.distances[0] - 1e-4) brute++;
    }
    expect(brute).toBe(0);
    const purity = (xy: Float64Array) => {
      let same = 0;
      const m = 3 * per;
      for (let i = 0; i < m; i++) {
        let best = -1;
        let bestD = Number.POSITIVE_INFINITY;
        for (let j = 0; j < m; j++) {
          if (j === i) continue;
          const dd = (xy[2 * i] - xy[2 * j]) ** 2 + (xy[2 * i + 1] - xy[2 * j + 1]) ** 2;
          if (dd < bestD) {
            bestD = dd;
            best = j;
          }
        }
        if (Math.floor(best / per) === Math.floor(i / per)) same++;
      }
      return same / m;
    };
    const t1 = await tsne(blobs, d, { perplexity: 10, iterations: 500, seed: 2, threads: 2 });
    const t2 = await tsne(blobs, d, { perplexity: 10, iterations: 500, seed: 2, threads: 2 });
    expect(Array.from(t2)).toEqual(Array.from(t1));
    expect(purity(t1)).toBeGreaterThan(0.95);
    const u1 = await umap(blobs, d, { neighbors: 10, epochs: 100, seed: 3, threads: 2 });
    const u2 = await umap(blobs, d, { neighbors: 10, epochs: 100, seed: 3, threads: 2 });
    expect(Array.from(u2)).toEqual(Array.from(u1));
    expect(purity(u1)).toBeGreaterThan(0.95);
  });
});

describe("activation capture", () => {
  let model: Model;
  const texts = [
    "Question: 12+7?\nAnswer: 19",
    "the cat sat",
    "a",
    "The river ran past the old mill at dawn.",
  ];
  beforeAll(async () => {
    model = await loadModel(modelDir("llama-tiny"), { threads: 2 });
  });
  afterAll(() => model?.dispose());

  it("GPT-2 with a soft prompt: the default length leaves the prompt's positions; a longer one is refused up front", async () => {
    const gpt2 = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 1 }); // 64 positions
    try {
      const prompt = new Float32Array(4 * gpt2.config.hiddenSize);
      const long = Int32Array.from({ length: 80 }, (_, i) => (i * 7) % 100);
      const acts = await captureActivations(gpt2, [long, [1, 2, 3]], { layers: [1], prompt });
      expect(acts.lengths()[0]).toBe(60); // was 64 + 4 prompt rows: refused after earlier chunks were written
      await expect(captureActivations(gpt2, [long], { layers: [1], prompt, maxLength: 64 })).rejects.toThrow(
        "maxLength: expected an integer from 1 to 60",
      );
    } finally {
      gpt2.dispose();
    }
  });

  it("token rows equal an unpadded forward of each text; means average them; padding is excluded", async () => {
    const acts = await captureActivations(model, texts, { layers: [0, 2], batchSize: 4 });
    const d = model.config.hiddenSize;
    const lengths = acts.lengths();
    const tokens = acts.tokens(2);
    const means = acts.mean(2);
    let offset = 0;
    for (let t = 0; t < texts.length; t++) {
      const ids = Int32Array.from(model.tokenizer!.encode(texts[t], { addSpecialTokens: true }));
      expect(lengths[t]).toBe(ids.length);
      const alone = await model.forward({
        inputIds: ids,
        batch: 1,
        seqLen: ids.length,
        hiddenStates: [2],
        logits: false,
      });
      const h = alone.hiddenStates[0];
      let err = 0;
      let scale = 0;
      for (let i = 0; i < ids.length * d; i++) {
        err = Math.max(err, Math.abs(tokens[offset * d + i] - h[i]));
        scale = Math.max(scale, Math.abs(h[i]));
      }
      // Batched with right padding vs alone: the same math in other GEMM shapes (fp32 rounding only).
      expect(err).toBeLessThan(1e-5 * scale);
      for (let j = 0; j < d; j++) {
        let s = 0;
        for (let p = 0; p < ids.length; p++) s += tokens[(offset + p) * d + j];
        expect(means[t * d + j]).toBeCloseTo(s / ids.length, 5);
      }
      offset += ids.length;
    }
    expect(acts.trajectories(0).map((x) => x.length / d)).toEqual(Array.from(lengths));
  });

  it("padding 'include' pads every text to maxLength and counts the pad positions", async () => {
    const acts = await captureActivations(model, texts, { layers: [3], padding: "include", maxLength: 16 });
    expect(Array.from(acts.lengths())).toEqual([16, 16, 16, 16]);
    expect(acts.index.tokens).toBe(64);
    const excluded = await captureActivations(model, texts, { layers: [3], maxLength: 16 });
    // "the cat sat" has fewer than 16 tokens: its mean now includes pad positions.
    const d = model.config.hiddenSize;
    expect(Array.from(acts.mean(3).subarray(d, 2 * d))).not.toEqual(
      Array.from(excluded.mean(3).subarray(d, 2 * d)),
    );
  });

  it("streams chunks to disk with an index, reads back the same rows, and reports progress", async () => {
    const dir = join(mkdtempSync(join(tmpdir(), "priortune-acts-")), "acts");
    const seen: number[] = [];
    const memory = await captureActivations(model, texts, { layers: [1, 3], chunkTexts: 3 });
    await captureActivations(model, texts, {
      layers: [1, 3],
      chunkTexts: 3,
      outDir: dir,
      onProgress: (p) => seen.push(p.texts),
    });
    const disk = loadActivations(dir);
    expect(disk.index.chunks).toHaveLength(2);
    expect(seen[seen.length - 1]).toBe(texts.length);
    expect(Array.from(disk.tokens(3))).toEqual(Array.from(memory.tokens(3)));
    expect(Array.from(disk.mean(1))).toEqual(Array.from(memory.mean(1)));
    expect(Array.from(disk.lengths())).toEqual(Array.from(memory.lengths()));
    await expect(captureActivations(model, texts, { layers: [1], outDir: dir })).rejects.toThrow(
      /already holds/,
    );
    expect(() => disk.mean(2)).toThrow(/layer: 2 was not captured/);
    // A capture that fails part way (here its progress callback; a full disk alike) removes its chunks, so
    // the directory can take the capture again; chunks without an index are named as an unfinished capture.
    const failed = join(dirname(dir), "failed");
    await expect(
      captureActivations(model, texts, {
        layers: [1],
        chunkTexts: 3,
        outDir: failed,
        onProgress: (p) => {
          if (p.texts > 3) throw new Error("stop here");
        },
      }),
    ).rejects.toThrow("stop here");
    expect(readdirSync(failed)).toEqual([]);
    await captureActivations(model, texts, { layers: [1], chunkTexts: 3, outDir: failed });
    rmSync(join(failed, "index.json"));
    await expect(captureActivations(model, texts, { layers: [1], outDir: failed })).rejects.toThrow(
      /holds the chunks of a capture that did not finish \(chunk-000000\.safetensors, no index\.json\)/,
    );
  });

  it("a soft prompt in front changes the text rows; its own rows are kept on request", async () => {
    const d = model.config.hiddenSize;
    const prompt = new Float32Array(3 * d).fill(0.1);
    const plain = await captureActivations(model, texts.slice(0, 2), { layers: [2], pooling: "token" });
    const prompted = await captureActivations(model, texts.slice(0, 2), {
      layers: [2],
      pooling: "token",
      prompt,
    });
    const withRows = await captureActivations(model, texts.slice(0, 2), {
      layers: [2],
      pooling: "token",
      prompt,
      includePrompt: true,
    });
    expect(Array.from(prompted.lengths())).toEqual(Array.from(plain.lengths()));
    expect(Array.from(withRows.lengths())).toEqual(Array.from(plain.lengths(), (l) => l + 3));
    expect(prompted.tokens(2)[0]).not.toBe(plain.tokens(2)[0]);
    expect(() => prompted.mean(2)).toThrow(/mean rows were not captured/);
  });
});

describe("plots", () => {
  it("render to valid SVG and to PNG at twice the size", async () => {
    const points = Array.from({ length: 30 }, (_, i) => ({
      x: Math.cos(i),
      y: Math.sin(i),
      group: i < 20 ? "vocabulary" : "trained prompts",
    }));
    const scatter = await renderFigure(scatterSpec(points, { title: "t", background: ["vocabulary"] }));
    expect(scatter.svg).toMatch(/^<svg[^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    expect(scatter.svg).toContain("</svg>");
    const width = Number(/^<svg[^>]*width="(\d+)"/.exec(scatter.svg)![1]);
    const png = scatter.png;
    expect(png.subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
    expect(png.readUInt32BE(16)).toBe(2 * width); // IHDR width
    const loss = await renderFigure(
      lossCurveSpec([
        { step: 1, loss: 3, run: "a", kind: "train" },
        { step: 2, loss: 2, run: "a", kind: "train" },
        { step: 2, loss: 2.5, run: "a", kind: "validation" },
      ]),
    );
    expect((loss.svg.match(/<path/g) ?? []).length).toBeGreaterThan(3);
  });
});
