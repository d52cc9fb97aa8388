// Collapse metrics: closed-form checks (Mahalanobis under a known covariance, chi-square tails, effective
// rank of a known spectrum, pairwise cosines, divergence) and the report's shape for every kind of source.
import { describe, expect, it } from "vitest";
import { CollapseReference, collapseReport, createCollapseReference } from "../lib/collapse.js";
import { addon } from "../lib/native.js";
import {
  chiSquareLogSurvival,
  effectiveRank,
  percentileRank,
  quantile,
  sampleWithoutReplacement,
} from "../lib/stats.js";

function gaussian(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const r = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(r(), 1e-12);
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r()) * scale;
  }
  return out;
}

/** ln of e^{-x/2} sum_{j < dof/2} (x/2)^j / j!: the exact chi-square tail for even dof, summed in logs. */
function evenDofLogTail(x: number, dof: number): number {
  const h = x / 2;
  const terms: number[] = [];
  let logTerm = 0;
  for (let j = 0; j < dof / 2; j++) {
    if (j > 0) logTerm += Math.log(h) - Math.log(j);
    terms.push(logTerm);
  }
  const m = Math.max(...terms);
  return -h + m + Math.log(terms.reduce((s, t) => s + Math.exp(t - m), 0));
}

describe("statistics helpers", () => {
  it("chi-square tail equals the closed form for even degrees of freedom, both series branches", () => {
    for (const [x, dof] of [
      [0.5, 2],
      [3, 2],
      [7, 4],
      [1, 10],
      [30, 10],
      [700, 768],
      [768, 768],
      [900, 768],
      [5000, 768],
      [1e5, 2048],
    ]) {
      const got = chiSquareLogSurvival(x, dof);
      const want = evenDofLogTail(x, dof);
      expect(Math.abs(got - want)).toBeLessThanOrEqual(1e-9 * Math.max(1, Math.abs(want)));
    }
    expect(chiSquareLogSurvival(0, 5)).toBe(0);
    expect(chiSquareLogSurvival(3, 2)).toBeCloseTo(-1.5, 12);
  });

  it("effective rank, percentile ranks, quantiles, sampling", () => {
    expect(effectiveRank(new Array(20).fill(1), 0.95)).toBe(19);
    expect(effectiveRank([100, 1, 1, 1], 0.95)).toBe(1); // 100/103 = 0.971
    expect(effectiveRank([100, 1, 1, 1], 0.98)).toBe(2); // 101/103 = 0.981
    expect(effectiveRank([0, 0], 0.95)).toBe(0);
    const sorted = Float64Array.from([1, 2, 2, 3]);
    expect(percentileRank(sorted, 2)).toBe(50);
    expect(percentileRank(sorted, 0)).toBe(0);
    expect(percentileRank(sorted, 9)).toBe(100);
    expect(quantile(Float64Array.from([0, 10]), 0.25)).toBe(2.5);
    const s = sampleWithoutReplacement(100, 30, 7);
    expect(new Set(s).size).toBe(30);
    expect(Array.from(sampleWithoutReplacement(100, 30, 7))).toEqual(Array.from(s));
    expect(Array.from(sampleWithoutReplacement(5, 9, 1)).sort()).toEqual([0, 1, 2, 3, 4]);
  });

  it("Gram eigenvalues: known singular values, and trace identities in both orientations", async () => {
    const x = new Float32Array(3 * 8);
    x[0] = 3; // rows 3 e0, 2 e5, 0.5 e7: singular values 3, 2, 0.5
    x[8 + 5] = 2;
    x[16 + 7] = 0.5;
    expect(Array.from(await addon().gramEigenvalues(x, 8, 2)).map((v) => Math.round(v * 1e9) / 1e9)).toEqual([
      9, 4, 0.25,
    ]);
    for (const [n, d] of [
      [7, 12],
      [40, 6],
    ]) {
      const a = gaussian(n * d, n + d);
      const eig = await addon().gramEigenvalues(a, d, 2);
      expect(eig.length).toBe(Math.min(n, d));
      // sum of eigenvalues = |A|_F^2, sum of squares = |A^T A|_F^2.
      let fro = 0;
      for (const v of a) fro += v * v;
      const m = Math.min(n, d);
      const g = new Float64Array(m * m);
      for (let i = 0; i < m; i++)
        for (let j = 0; j < m; j++) {
          let s = 0;
          if (n <= d) for (let t = 0; t < d; t++) s += a[i * d + t] * a[j * d + t];
          else for (let t = 0; t < n; t++) s += a[t * d + i] * a[t * d + j];
          g[i * m + j] = s;
        }
      let g2 = 0;
      for (const v of g) g2 += v * v;
      expect(eig.reduce((s, v) => s + v, 0)).toBeCloseTo(fro, 8);
      expect(eig.reduce((s, v) => s + v * v, 0) / g2).toBeCloseTo(1, 12);
      for (let i = 1; i < eig.length; i++) expect(eig[i]).toBeLessThanOrEqual(eig[i - 1]);
    }
  });

  it("Gram eigenvalues of a rank-deficient matrix converge (a collapsed prompt: rows that repeat a few)", async () => {
    // 300 x 300 of rank 2. The QL iteration's deflation test was relative to neighbouring diagonal entries
    // only: the null space's couplings shrank through 1e-100 with them and never passed ("did not converge").
    const n = 300;
    const x = new Float32Array(n * n);
    for (let r = 0; r < n; r++)
      for (let j = 0; j < n; j++)
        x[r * n + j] = (r % 2 ? 1 : -1) * (j + 1) * 1e-3 + (r % 3 === 0 ? j * j * 1e-5 : 0);
    const eig = await addon().gramEigenvalues(x, n, 2);
    let fro = 0;
    for (const v of x) fro += v * v;
    expect(eig.reduce((s, v) => s + v, 0) / fro).toBeCloseTo(1, 10);
    expect(eig[1]! / eig[0]!).toBeGreaterThan(1e-6); // two directions
    for (const v of eig.slice(2)) expect(Math.abs(v)).toBeLessThan(1e-9 * eig[0]!); // the rest null
  });
});

describe("collapseReport", () => {
  it("Mahalanobis distance under a known diagonal covariance (reference rows +-a_i e_i)", async () => {
    const d = 6;
    const a = [1, 2, 0.5, 3, 1.5, 0.25];
    const vocab = new Float32Array(2 * d * d);
    for (let i = 0; i < d; i++) {
      vocab[2 * i * d + i] = a[i];
      vocab[(2 * i + 1) * d + i] = -a[i];
    }
    const jitter = 0.01;
    const x = Float32Array.from([0.3, -1, 2, 0, 0.7, 0.1]);
    const report = await collapseReport(
      x,
      { vocab, dim: d },
      { covarianceJitter: jitter, k: 2, backend: "cpu" },
    );
    // Sigma_ii = 2 a_i^2 / (N - 1) with N = 2d rows, mean 0; ridge = jitter * trace / d.
    const sigma = a.map((v) => (2 * v * v) / (2 * d - 1));
    const ridge = (jitter * sigma.reduce((s, v) => s + v, 0)) / d;
    let m2 = 0;
    for (let i = 0; i < d; i++) m2 += (x[i] * x[i]) / (sigma[i] + ridge);
    expect(report.reference.gaussian.ridge).toBeCloseTo(ridge, 12);
    expect(report.vectors[0].mahalanobis).toBeCloseTo(Math.sqrt(m2), 5);
    expect(report.vectors[0].chiSquareLogTail).toBeCloseTo(evenDofLogTail(m2, d), 5);
    expect(report.vectors[0].norm).toBeCloseTo(Math.hypot(...x), 6);
  });

  it("Mahalanobis against a float64 solve for a full covariance", async () => {
    const d = 5;
    const n = 300;
    const base = gaussian(n * d, 3);
    // Correlate the dimensions: row -> row * M.
    const vocab = new Float32Array(n * d);
    for (let r = 0; r < n; r++)
      for (let j = 0; j < d; j++) {
        let s = 0;
        for (let t = 0; t <= j; t++) s += base[r * d + t] * (1 + t + j);
        vocab[r * d + j] = s;
      }
    const x = gaussian(3 * d, 4, 5);
    const report = await collapseReport(x, { vocab, dim: d }, { covarianceJitter: 0, backend: "cpu" });
    const mean = new Float64Array(d);
    for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) mean[j] += vocab[r * d + j] / n;
    const cov: number[][] = Array.from({ length: d }, () => new Array(d).fill(0));
    for (let r = 0; r < n; r++)
      for (let i = 0; i < d; i++)
        for (let j = 0; j < d; j++)
          cov[i][j] += ((vocab[r * d + i] - mean[i]) * (vocab[r * d + j] - mean[j])) / (n - 1);
    for (let v = 0; v < 3; v++) {
      // Solve cov z = (x - mean) by Gaussian elimination; m2 = (x - mean) . z.
      const A = cov.map((row, i) => [...row, x[v * d + i] - mean[i]]);
      for (let c = 0; c < d; c++)
        for (let r = c + 1; r < d; r++) {
          const f = A[r][c] / A[c][c];
          for (let t = c; t <= d; t++) A[r][t] -= f * A[c][t];
        }
      const z = new Array(d).fill(0);
      for (let r = d - 1; r >= 0; r--) {
        let s = A[r][d];
        for (let t = r + 1; t < d; t++) s -= A[r][t] * z[t];
        z[r] = s / A[r][r];
      }
      let m2 = 0;
      for (let i = 0; i < d; i++) m2 += (x[v * d + i] - mean[i]) * z[i];
      expect(report.vectors[v].mahalanobis / Math.sqrt(m2)).toBeCloseTo(1, 5);
    }
  });

  it("pairwise cosine, effective rank and spread of known prompt matrices", async () => {
    const d = 32;
    const vocab = gaussian(200 * d, 5);
    const reference = await createCollapseReference({ vocab, dim: d }, { backend: "cpu" });
    try {
      // 20 orthogonal vectors of equal norm: pairwise cosine 0, effective rank 19 at 95% (the paper's 19/20).
      const ortho = new Float32Array(20 * d);
      for (let i = 0; i < 20; i++) ortho[i * d + i] = 2;
      const r1 = await reference.report(ortho);
      expect(r1.aggregate.meanPairwiseCosine).toBeCloseTo(0, 12);
      expect(r1.aggregate.effectiveRank).toBe(19);
      expect(r1.aggregate.singularValues.slice(0, 20).every((s) => Math.abs(s - 2) < 1e-9)).toBe(true);
      // Column t < 20 holds one 2 among 20 rows: sample std = sqrt((2^2 - 20 (0.1)^2) / 19) ... = sqrt(0.2 * 19/19 ...)
      const col = [2, ...new Array(19).fill(0)];
      const m = 0.1;
      const std = Math.sqrt(col.reduce((s, v) => s + (v - m) ** 2, 0) / 19);
      expect(r1.aggregate.spread.perDimensionStd![0]).toBeCloseTo(std, 6);
      expect(r1.aggregate.spread.perDimensionStd![25]).toBe(0);
      expect(r1.aggregate.spread.meanStd).toBeCloseTo((20 * std) / d, 6);
      // Identical vectors: cosine 1, rank 1; a vector and its negative: -1.
      const same = new Float32Array(3 * d).fill(0.5);
      expect((await reference.report(same)).aggregate.meanPairwiseCosine).toBeCloseTo(1, 12);
      expect((await reference.report(same)).aggregate.effectiveRank).toBe(1);
      const opposite = new Float32Array(2 * d);
      opposite.fill(1, 0, d);
      opposite.fill(-1, d);
      expect((await reference.report(opposite)).aggregate.meanPairwiseCosine).toBeCloseTo(-1, 12);
    } finally {
      reference.dispose();
    }
    await expect(reference.report(new Float32Array(d))).rejects.toThrow("CollapseReference is disposed");
  });

  it("keeps no copy of a { vocab, dim } source: its nearest cosine and L2 are float64 values of the rows as given", async () => {
    const d = 37;
    const V = 400;
    const vocab = gaussian(V * d, 31);
    const given = vocab.slice();
    const x = gaussian(6 * d, 32);
    x.set(vocab.subarray(9 * d, 10 * d), 0);
    const reference = await createCollapseReference(
      { vocab, dim: d },
      { backend: "cpu", neighborSample: 150, gaussianSample: 300 },
    );
    try {
      const before = await reference.report(x, { k: 4 });
      vocab.fill(0.25); // the caller's array is its own once the reference is built
      const after = await reference.report(x, { k: 4 });
      expect(after).toEqual(before);
      for (const [i, v] of after.vectors.entries())
        for (const n of v.nearest) {
          // Summed in the order of lib/collapse.ts's float64 loop: the same bits.
          let dot = 0;
          let aa = 0;
          let bb = 0;
          let d2 = 0;
          for (let t = 0; t < d; t++) {
            const a = x[i * d + t];
            const b = given[n.id * d + t];
            dot += a * b;
            aa += a * a;
            bb += b * b;
            d2 += (a - b) * (a - b);
          }
          expect(n.cosine).toBe(dot / Math.sqrt(aa * bb));
          expect(n.l2).toBe(Math.sqrt(d2));
        }
      expect(after.vectors[0].nearest[0]).toMatchObject({ id: 9, l2: 0 });
    } finally {
      reference.dispose();
    }
    await expect(reference.report(x)).rejects.toThrow("CollapseReference is disposed");
  });

  it("dispose() during a report: the report completes, later ones are refused", async () => {
    const d = 16;
    const vocab = gaussian(500 * d, 51);
    const x = gaussian(3 * d, 52);
    const reference = await createCollapseReference({ vocab, dim: d }, { backend: "cpu", threads: 1 });
    const want = await reference.report(x);
    const pending = [reference.report(x), reference.report(x)];
    reference.dispose();
    await expect(reference.report(x)).rejects.toThrow("CollapseReference is disposed");
    for (const r of await Promise.all(pending)) expect(r).toEqual(want);
    await expect(reference.report(x)).rejects.toThrow("CollapseReference is disposed");
    reference.dispose(); // idempotent
  });

  it("rows past the tokenizer's vocabulary: no token, and [id N] in the projected prompt", async () => {
    const d = 8;
    const V = 12;
    const vocab = gaussian(V * d, 41);
    // A tokenizer of 6 tokens for 12 embedding rows (a padded embedding matrix).
    const tokenizer = {
      decode: (ids: number[]) => ids.map((i) => `<${i}>`).join(""),
      idToToken: (id: number) => (id < 6 ? `<${id}>` : undefined),
    };
    const ids = [2, 7, 3, 9, 11, 4, 5];
    const x = new Float32Array(ids.length * d);
    for (const [i, id] of ids.entries()) x.set(vocab.subarray(id * d, (id + 1) * d), i * d);
    const r = await collapseReport(x, { vocab, dim: d, tokenizer }, { backend: "cpu", k: 2 });
    expect(r.aggregate.projectedTokenIds).toEqual(ids);
    expect(r.aggregate.projectedPrompt).toBe("<2>[id 7]<3>[id 9][id 11]<4><5>");
    expect(r.vectors.map((v) => v.nearest[0].token)).toEqual(["<2>", null, "<3>", null, null, "<4>", "<5>"]);
    // Without idToToken every id is decoded, as before.
    const plain = await collapseReport(
      x,
      { vocab, dim: d, tokenizer: { decode: tokenizer.decode } },
      { backend: "cpu" },
    );
    expect(plain.aggregate.projectedPrompt).toBe("<2><7><3><9><11><4><5>");
  });

  it("divergence equals the mean distance to all rows when M covers the reference", async () => {
    const d = 16;
    const V = 120;
    const vocab = gaussian(V * d, 6);
    const x = gaussian(4 * d, 7, 2);
    const report = await collapseReport(x, { vocab, dim: d }, { divergenceRows: V, backend: "cpu" });
    for (let i = 0; i < 4; i++) {
      let s = 0;
      for (let r = 0; r < V; r++) {
        let d2 = 0;
        for (let t = 0; t < d; t++) d2 += (x[i * d + t] - vocab[r * d + t]) ** 2;
        s += Math.sqrt(d2);
      }
      expect(report.vectors[i].divergence).toBeCloseTo(s / V, 9);
    }
    expect(report.aggregate.meanDivergence).toBeCloseTo(
      report.vectors.reduce((s, v) => s + v.divergence, 0) / 4,
      12,
    );
  });

  it("the reference's own divergence leaves out each row's zero distance to itself", async () => {
    // 50 rows, M = 1000 > V: the divergence rows are all 50 rows, and the reference's own divergence is the
    // mean distance over ordered pairs of different rows (with the zero terms it came out 2% low).
    const d = 8;
    const V = 50;
    const vocab = gaussian(V * d, 21);
    let sum = 0;
    for (let i = 0; i < V; i++)
      for (let j = 0; j < V; j++) {
        if (i === j) continue;
        let d2 = 0;
        for (let t = 0; t < d; t++) d2 += (vocab[i * d + t] - vocab[j * d + t]) ** 2;
        sum += Math.sqrt(d2);
      }
    const ref = await createCollapseReference({ vocab, dim: d }, { backend: "cpu" });
    expect(ref.summary.referenceDivergence).toBeCloseTo(sum / (V * (V - 1)), 9);
    // With 2M rows or more, M other rows: no row is measured against itself.
    const big = await createCollapseReference({ vocab, dim: d }, { backend: "cpu", divergenceRows: 25 });
    const drawn = sampleWithoutReplacement(V, 50, 2); // the reference's draw (seed 0 + 2), split 25 + 25
    let pairs = 0;
    for (let a = 0; a < 25; a++)
      for (let b = 25; b < 50; b++) {
        let d2 = 0;
        for (let t = 0; t < d; t++) d2 += (vocab[drawn[a]! * d + t] - vocab[drawn[b]! * d + t]) ** 2;
        pairs += Math.sqrt(d2);
      }
    expect(big.summary.referenceDivergence).toBeCloseTo(pairs / 625, 9);
    ref.dispose();
    big.dispose();
  });

  it("a model source: tokens, projected prompt, collapse of a copied token row, percentiles", async () => {
    const d = 24;
    const V = 500;
    // Tokens in 50 tight clusters of 10: each token's nearest neighbour has cosine ~0.99, far above what a
    // random direction reaches.
    const centres = gaussian(50 * d, 8);
    const noise = gaussian(V * d, 13, 0.05);
    const emb = new Float32Array(V * d);
    for (let r = 0; r < V; r++)
      for (let t = 0; t < d; t++) emb[r * d + t] = centres[(r % 50) * d + t] + noise[r * d + t];
    const model = {
      tokenEmbeddings: () => emb,
      config: { hiddenSize: d, vocabSize: V },
      tokenizer: { decode: (ids: number[]) => ids.map((i) => `<${i}>`).join("") },
    };
    const prompt = new Float32Array(2 * d);
    prompt.set(emb.subarray(17 * d, 18 * d), 0); // collapsed onto token 17
    prompt.set(gaussian(d, 9, 30), d); // far away
    const report = await collapseReport(prompt, model, { k: 3, backend: "cpu" });
    expect(report.version).toBe(1);
    expect(report.count).toBe(2);
    expect(report.reference.rows).toBe(V);
    expect(report.reference.neighborSampleRows).toBe(V);
    const [a, b] = report.vectors;
    expect(a.nearest[0]).toEqual({ id: 17, token: "<17>", cosine: 1, l2: 0 });
    expect(a.nearestDistancePercentile.l2).toBe(0);
    expect(a.collapsed).toBe(true);
    expect(b.collapsed).toBe(false);
    expect(b.nearestDistancePercentile.l2).toBe(100);
    expect(b.mahalanobis).toBeGreaterThan(a.mahalanobis);
    expect(report.aggregate.collapseRate).toBe(0.5);
    expect(report.aggregate.projectedTokenIds[0]).toBe(17);
    expect(report.aggregate.projectedPrompt).toBe(`<17><${b.nearest[0].id}>`);
    expect(report.aggregate.collapseThreshold.rule).toBe("quantile");
    const q = report.reference.nearestCosineQuantiles;
    expect(report.aggregate.collapseThreshold.cosine).toBeCloseTo(q.q05, 12);
    expect(q.q05).toBeLessThanOrEqual(q.q50);
    // The reference's own divergence is the paper's vocab-to-vocab figure: about sqrt(2 d) for rows whose
    // centres are N(0, I) (the cluster noise adds little).
    expect(report.reference.referenceDivergence / Math.sqrt(2 * d)).toBeGreaterThan(0.85);
    expect(report.reference.referenceDivergence / Math.sqrt(2 * d)).toBeLessThan(1.1);
    // An absolute threshold overrides the quantile.
    const strict = await collapseReport(prompt, model, { collapseThreshold: 1, backend: "cpu" });
    expect(strict.aggregate.collapseThreshold).toEqual({ cosine: 1, rule: "absolute", quantile: null });
    expect(strict.aggregate.collapsedCount).toBe(1);
    expect(JSON.parse(JSON.stringify(report))).toEqual(report); // plain JSON
  });

  it("works on activation vectors against dataset activations (no tokenizer), with sampling", async () => {
    const d = 40;
    const activations = gaussian(3000 * d, 10);
    const reference = await CollapseReference.create(
      { vocab: activations, dim: d },
      { neighborSample: 256, gaussianSample: 1000, divergenceRows: 100, seed: 3, backend: "cpu" },
    );
    const report = await reference.report(gaussian(50 * d, 11), { perDimensionSpread: false });
    expect(report.reference.neighborSampleRows).toBe(256);
    expect(report.reference.gaussian.rows).toBe(1000);
    expect(report.vectors[0].nearest[0].token).toBeNull();
    expect(report.aggregate.projectedPrompt).toBeNull();
    expect(report.aggregate.spread.perDimensionStd).toBeNull();
    // Vectors drawn from the reference's own distribution sit in its bulk: Mahalanobis^2 ~ chi2_d.
    const meanM2 = report.vectors.reduce((s, v) => s + v.mahalanobis ** 2, 0) / 50;
    expect(meanM2 / d).toBeGreaterThan(0.8);
    expect(meanM2 / d).toBeLessThan(1.25);
    const p = report.vectors.map((v) => v.nearestDistancePercentile.cosine);
    expect(p.reduce((s, v) => s + v, 0) / 50).toBeGreaterThan(25);
    reference.dispose();
  });

  it("names the argument in its errors", async () => {
    const vocab = gaussian(10 * 4, 12);
    await expect(collapseReport(new Float32Array(4), 42 as never)).rejects.toThrow(
      "source: expected a loaded model, a { vocab, dim } object or a CollapseReference, got number 42",
    );
    await expect(collapseReport(new Float32Array(5), { vocab, dim: 4 }, { backend: "cpu" })).rejects.toThrow(
      "promptVectors: expected a non-empty length that is a multiple of dim (4)",
    );
    await expect(collapseReport([1] as never, { vocab, dim: 4 })).rejects.toThrow(
      "promptVectors: expected a Float32Array",
    );
    const bad = { tokenEmbeddings: () => vocab, config: { hiddenSize: 4, vocabSize: 11 } };
    await expect(collapseReport(new Float32Array(4), bad)).rejects.toThrow(
      "source.tokenEmbeddings(): expected vocabSize x hiddenSize = 44 elements, got 40",
    );
    await expect(
      collapseReport(new Float32Array(4), { vocab, dim: 4 }, { collapseQuantile: 2, backend: "cpu" }),
    ).rejects.toThrow("collapseQuantile: expected a number from 0 to 1, got number 2");
    // Non-finite values: the same message whichever of the report's searches would have met them first.
    const nan = gaussian(4 * 4, 13);
    nan[9] = Number.NaN;
    for (let i = 0; i < 3; i++)
      await expect(collapseReport(nan, { vocab, dim: 4 }, { backend: "cpu" })).rejects.toThrow(
        "promptVectors: row 2, column 1 is NaN (values must be finite)",
      );
  });

  it("a reference smaller than the default k lists all its rows; self-search rows are checked unconverted", async () => {
    const vocab = gaussian(3 * 4, 14);
    const report = await collapseReport(gaussian(2 * 4, 15), { vocab, dim: 4 }, { backend: "cpu" });
    expect(report.vectors[0].nearest).toHaveLength(3);
    const { VocabIndex } = await import("../lib/knn.js");
    const index = await VocabIndex.create(vocab, { dim: 4, metric: "cosine", backend: "cpu" });
    await expect(index.selfSearch({ k: 1, rows: [2 ** 32 + 1] })).rejects.toThrow(
      "rows: element 0 is 4294967297, outside the index's rows [0, 3)",
    );
    index.dispose();
  });
});
