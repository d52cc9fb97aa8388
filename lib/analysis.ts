// Statistics behind the paper's analyses (paper.md, "Analyses"): Gaussians fitted per dataset and the
// distances between activation clusters (Frechet, symmetric KL, MMD, linear-probe separability), k-means,
// the step statistics of sentence trajectories against a random walk over the vocabulary (the paper's first
// figure), and convergence time by prior from a run's metrics.jsonl. The O(d^3) and O(n^2 d) work is native
// float64 (kernels/cpu/analysis_linalg.cpp); the rest is small enough for TypeScript.
import { existsSync, readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { fitGaussianPrior, GaussianPrior } from "./gaussian.js";
import { checkFiniteRows, checkFloat32, checkInteger, rowCount } from "./knn.js";
import { addon } from "./native.js";
import { Rng } from "./rng.js";
import { logGamma, logUpperGammaRegularized } from "./stats.js";
import type { EvalRecord, StepRecord } from "./train.js";
import { checkOptions, checkRequiredOptions, type OptionKeys, threadsOr } from "./validate.js";

/** Threads for native calls: the given count or every core. */
export function analysisThreads(threads: number | undefined): number {
  return threadsOr(threads, availableParallelism());
}

function checkDim(dim: unknown): number {
  return checkInteger("dim", dim, 1);
}

// ---------------------------------------------------------------------------------------------------------
// Gaussians

/** The first two moments of a Gaussian: what the distances below read. */
export interface GaussianMoments {
  dim: number;
  mean: Float64Array;
  /** dim x dim, row-major. */
  covariance: Float64Array;
  /** Lower Cholesky factor of the covariance, when known (computed on demand otherwise). */
  cholesky?: Float64Array | null;
  /** ln det of the covariance, when known. */
  logDet?: number;
}

export type GaussianLike = GaussianMoments | GaussianPrior;

export interface FitGaussianOptions {
  /** Shrinkage towards (tr S / d) I, from 0 to 1 (default 0). */
  shrinkage?: number;
  /** Ridge added to the diagonal, relative to the mean variance tr S / d (default 1e-3, the paper's jitter). */
  ridgeRelative?: number;
  /** Ridge added to the diagonal in absolute units (default 0). */
  ridgeAbsolute?: number;
  /** Shown in the Gaussian's describe() record. */
  name?: string;
  threads?: number;
}

const FIT_GAUSSIAN_KEYS = {
  shrinkage: true,
  ridgeRelative: true,
  ridgeAbsolute: true,
  name: true,
  threads: true,
} satisfies OptionKeys<FitGaussianOptions>;

const THREADS_KEYS = { threads: true } satisfies OptionKeys<{ threads?: number }>;

/**
 * N(mu, Sigma) fitted to rows x dim vectors (one dataset's activations, a prior's samples, trained prompts),
 * with the full covariance kept: lib/gaussian.ts's GaussianPrior, so it can also be sampled and scored. The
 * ridge keeps Sigma positive definite when there are fewer rows than dimensions (paper: "Sigma + 1e-3 I").
 */
export async function fitGaussian(
  rows: Float32Array,
  dim: number,
  optionsArg?: FitGaussianOptions,
): Promise<GaussianPrior> {
  const options = checkOptions(optionsArg, "fitGaussian options", FIT_GAUSSIAN_KEYS);
  checkFloat32("rows", rows);
  checkDim(dim);
  const n = rowCount("rows", rows, dim);
  if (n < 2) throw new RangeError(`rows: a Gaussian fit needs at least 2 rows, got ${n}`);
  const threads = analysisThreads(options.threads);
  const ridgeRelative = options.ridgeRelative ?? 1e-3;
  const ridgeAbsolute = options.ridgeAbsolute ?? 0;
  const shrinkage = options.shrinkage ?? 0;
  return fitGaussianPrior(
    rows,
    dim,
    { shrinkage, ridgeAbsolute, ridgeRelative },
    threads,
    {
      kind: "fitted-gaussian",
      source: "rows",
      name: options.name ?? null,
      rows: n,
      shrinkage,
      jitter: ridgeAbsolute > 0 ? ridgeAbsolute : ridgeRelative,
      jitterMode: ridgeAbsolute > 0 ? "absolute" : "relative",
    },
    (fit) => ({ fittedRows: n, ridge: fit.ridge, meanVariance: fit.meanVariance }),
  );
}

function momentsOf(name: string, g: GaussianLike): GaussianMoments {
  if (g instanceof GaussianPrior)
    return { dim: g.dim, mean: g.mean, covariance: g.covariance(), cholesky: g.cholesky, logDet: g.logDet };
  if (!g || !(g.mean instanceof Float64Array) || !(g.covariance instanceof Float64Array))
    throw new TypeError(
      `${name}: expected a GaussianPrior or { dim, mean: Float64Array, covariance: Float64Array }`,
    );
  if (g.mean.length !== g.dim || g.covariance.length !== g.dim * g.dim)
    throw new RangeError(
      `${name}: mean has ${g.mean.length} and covariance ${g.covariance.length} elements for dim ${g.dim}`,
    );
  return g;
}

function samePair(a: GaussianMoments, b: GaussianMoments): number {
  if (a.dim !== b.dim) throw new RangeError(`a, b: the Gaussians have dimensions ${a.dim} and ${b.dim}`);
  return a.dim;
}

function trace(m: Float64Array, d: number): number {
  let s = 0;
  for (let i = 0; i < d; i++) s += m[i * d + i];
  return s;
}

/**
 * The squared Frechet (2-Wasserstein) distance between two Gaussians, as FID reports it (Dowson and Landau
 * 1982): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1^(1/2) S2 S1^(1/2)). The covariances may be singular.
 */
export async function frechetDistance(
  a: GaussianLike,
  b: GaussianLike,
  optionsArg?: { threads?: number },
): Promise<{ distanceSquared: number; meanTerm: number; covarianceTerm: number }> {
  const options = checkOptions(optionsArg, "frechetDistance options", THREADS_KEYS);
  const ga = momentsOf("a", a);
  const gb = momentsOf("b", b);
  const d = samePair(ga, gb);
  let meanTerm = 0;
  for (let i = 0; i < d; i++) meanTerm += (ga.mean[i] - gb.mean[i]) ** 2;
  const cross = await addon().analysisTraceSqrtProduct(
    ga.covariance,
    gb.covariance,
    d,
    analysisThreads(options.threads),
  );
  // Rounding can leave a tiny negative covariance term for (nearly) equal covariances.
  const covarianceTerm = Math.max(0, trace(ga.covariance, d) + trace(gb.covariance, d) - 2 * cross);
  return { distanceSquared: meanTerm + covarianceTerm, meanTerm, covarianceTerm };
}

async function choleskyOf(g: GaussianMoments, threads: number): Promise<{ L: Float64Array; logDet: number }> {
  if (g.cholesky) {
    let logDet = g.logDet;
    if (logDet === undefined) {
      logDet = 0;
      for (let i = 0; i < g.dim; i++) logDet += 2 * Math.log(g.cholesky[i * g.dim + i]);
    }
    return { L: g.cholesky, logDet };
  }
  const c = await addon().priorCholesky(g.covariance, g.dim, threads);
  return { L: c.cholesky, logDet: c.logDet };
}

/** |L^-1 v|^2 = v^T (L L^T)^-1 v by forward substitution (float64). */
function mahalanobisOf(L: Float64Array, v: Float64Array, d: number): number {
  const z = new Float64Array(d);
  let s = 0;
  for (let i = 0; i < d; i++) {
    let t = v[i];
    for (let k = 0; k < i; k++) t -= L[i * d + k] * z[k];
    z[i] = t / L[i * d + i];
    s += z[i] * z[i];
  }
  return s;
}

/**
 * KL(a || b) = 0.5 [tr(Sb^-1 Sa) + (mu_b - mu_a)^T Sb^-1 (mu_b - mu_a) - d + ln det Sb - ln det Sa], and the
 * symmetric KL(a || b) + KL(b || a) (the log-determinants cancel). Both covariances must be positive definite
 * (fit with a ridge when there are fewer rows than dimensions).
 */
export async function gaussianKl(
  a: GaussianLike,
  b: GaussianLike,
  optionsArg?: { threads?: number },
): Promise<{ forward: number; backward: number; symmetric: number }> {
  const options = checkOptions(optionsArg, "gaussianKl options", THREADS_KEYS);
  const ga = momentsOf("a", a);
  const gb = momentsOf("b", b);
  const d = samePair(ga, gb);
  const threads = analysisThreads(options.threads);
  const ca = await choleskyOf(ga, threads);
  const cb = await choleskyOf(gb, threads);
  const delta = new Float64Array(d);
  for (let i = 0; i < d; i++) delta[i] = gb.mean[i] - ga.mean[i];
  const trBa = await addon().analysisTraceInverseProduct(cb.L, ca.L, d, threads);
  const trAb = await addon().analysisTraceInverseProduct(ca.L, cb.L, d, threads);
  const forward = 0.5 * (trBa + mahalanobisOf(cb.L, delta, d) - d + cb.logDet - ca.logDet);
  const backward = 0.5 * (trAb + mahalanobisOf(ca.L, delta, d) - d + ca.logDet - cb.logDet);
  return { forward, backward, symmetric: forward + backward };
}

/** Symmetric KL divergence KL(a || b) + KL(b || a) between two Gaussians (see gaussianKl). */
export async function symmetricKl(a: GaussianLike, b: GaussianLike, options?: { threads?: number }) {
  checkOptions(options, "symmetricKl options", THREADS_KEYS);
  return (await gaussianKl(a, b, options)).symmetric;
}

// ---------------------------------------------------------------------------------------------------------
// MMD

export interface MmdOptions {
  /** RBF bandwidth sigma in k(x, y) = exp(-|x - y|^2 / (2 sigma^2)); default the median heuristic. */
  bandwidth?: number;
  /** At most this many rows of each set are used (a seeded subsample beyond it; default 2000). */
  maxRows?: number;
  /** Permutations for the p-value of the null "same distribution" (default 0: no test). */
  permutations?: number;
  seed?: number;
  threads?: number;
}

const MMD_KEYS = {
  bandwidth: true,
  maxRows: true,
  permutations: true,
  seed: true,
  threads: true,
} satisfies OptionKeys<MmdOptions>;

export interface MmdResult {
  /** The unbiased estimate of MMD^2 (Gretton et al. 2012, eq. 3); can be slightly negative. */
  mmd2: number;
  bandwidth: number;
  rowsX: number;
  rowsY: number;
  /** Share of permuted splits whose MMD^2 reaches the observed one ((1 + count) / (1 + permutations)). */
  pValue: number | null;
}

function subsampleRows(rows: Float32Array, dim: number, max: number, rng: Rng): Float32Array {
  const n = rows.length / dim;
  if (n <= max) return rows;
  const pick = rng.shuffle(Array.from({ length: n }, (_, i) => i)).slice(0, max);
  pick.sort((a, b) => a - b);
  const out = new Float32Array(max * dim);
  pick.forEach((r, i) => {
    out.set(rows.subarray(r * dim, (r + 1) * dim), i * dim);
  });
  return out;
}

/** Median of the pairwise distances |z_i - z_j|, i < j, of an n x n squared-distance matrix (up to 1e6 pairs). */
export function medianDistance(sq: Float64Array, n: number, rng: Rng): number {
  const pairs = (n * (n - 1)) / 2;
  const maxPairs = 1_000_000;
  let values: Float64Array;
  if (pairs <= maxPairs) {
    values = new Float64Array(pairs);
    let k = 0;
    for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) values[k++] = sq[i * n + j];
  } else {
    values = new Float64Array(maxPairs);
    for (let k = 0; k < maxPairs; k++) {
      const i = rng.int(n);
      let j = rng.int(n - 1);
      if (j >= i) j++;
      values[k] = sq[i * n + j];
    }
  }
  return sqrtMedian(values);
}

/** The square root of the median of squared distances (sorts `values` in place). */
function sqrtMedian(values: Float64Array): number {
  values.sort();
  const m = values.length;
  return Math.sqrt(m % 2 === 1 ? values[(m - 1) / 2]! : 0.5 * (values[m / 2 - 1]! + values[m / 2]!));
}

/**
 * Maximum mean discrepancy between two sets of vectors with a Gaussian RBF kernel, unbiased estimator
 * (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012): about 0 for samples of one distribution, > 0 when
 * they differ. Bandwidth by the median heuristic (the median distance of the pooled sample) unless given.
 */
export async function mmd(
  x: Float32Array,
  y: Float32Array,
  dim: number,
  optionsArg?: MmdOptions,
): Promise<MmdResult> {
  const options = checkOptions(optionsArg, "mmd options", MMD_KEYS);
  checkFloat32("x", x);
  checkFloat32("y", y);
  checkDim(dim);
  rowCount("x", x, dim);
  rowCount("y", y, dim);
  const rng = new Rng(options.seed ?? 0);
  const maxRows = checkInteger("maxRows", options.maxRows ?? 2000, 2);
  const xs = subsampleRows(x, dim, maxRows, rng);
  const ys = subsampleRows(y, dim, maxRows, rng);
  const m = xs.length / dim;
  const n = ys.length / dim;
  if (m < 2 || n < 2)
    throw new RangeError(`x, y: the unbiased MMD needs at least 2 rows each, got ${m} and ${n}`);
  const pooled = new Float32Array(xs.length + ys.length);
  pooled.set(xs, 0);
  pooled.set(ys, xs.length);
  const N = m + n;
  const sq = await addon().analysisPairwiseSquaredDistances(
    pooled,
    null,
    dim,
    analysisThreads(options.threads),
  );
  let bandwidth = options.bandwidth ?? medianDistance(sq, N, rng);
  if (!(bandwidth > 0) || !Number.isFinite(bandwidth)) {
    if (options.bandwidth !== undefined)
      throw new RangeError(`bandwidth: expected a positive number, got ${options.bandwidth}`);
    // Half the pairs or more coincide: the median of the distances that are not zero, so that the
    // statistic does not depend on the data's units; 1 only when every point coincides (MMD 0 at any).
    const nonzero: number[] = [];
    for (let i = 0; i < N && nonzero.length < 1_000_000; i++)
      for (let j = i + 1; j < N; j++) if (sq[i * N + j] > 0) nonzero.push(sq[i * N + j]);
    bandwidth = nonzero.length === 0 ? 1 : sqrtMedian(Float64Array.from(nonzero));
  }
  const gamma = 1 / (2 * bandwidth * bandwidth);
  const K = new Float64Array(N * N);
  for (let i = 0; i < N * N; i++) K[i] = Math.exp(-gamma * sq[i]);
  const statistic = (inX: Uint8Array): number => {
    let sxx = 0;
    let syy = 0;
    let sxy = 0;
    for (let i = 0; i < N; i++) {
      const xi = inX[i];
      for (let j = i + 1; j < N; j++) {
        const k = K[i * N + j];
        if (xi && inX[j]) sxx += k;
        else if (!xi && !inX[j]) syy += k;
        else sxy += k;
      }
    }
    return (2 * sxx) / (m * (m - 1)) + (2 * syy) / (n * (n - 1)) - (2 * sxy) / (m * n);
  };
  const labels = new Uint8Array(N);
  labels.fill(1, 0, m);
  const mmd2 = statistic(labels);
  const permutations = checkInteger("permutations", options.permutations ?? 0, 0);
  let pValue: number | null = null;
  if (permutations > 0) {
    let reach = 0;
    const perm = Array.from(labels);
    for (let p = 0; p < permutations; p++) {
      rng.shuffle(perm);
      if (statistic(Uint8Array.from(perm)) >= mmd2) reach++;
    }
    pValue = (1 + reach) / (1 + permutations);
  }
  return { mmd2, bandwidth, rowsX: m, rowsY: n, pValue };
}

// ---------------------------------------------------------------------------------------------------------
// Linear probe

export interface LinearProbeOptions {
  /** Cross-validation folds (default 5); each row is held out once. */
  folds?: number;
  /** L2 penalty on the weights, per row (default 1e-3). */
  l2?: number;
  /** L-BFGS iterations per fold (default 200). */
  iterations?: number;
  seed?: number;
  threads?: number;
}

const LINEAR_PROBE_KEYS = {
  folds: true,
  l2: true,
  iterations: true,
  seed: true,
  threads: true,
} satisfies OptionKeys<LinearProbeOptions>;

export interface LinearProbeResult {
  /** Held-out accuracy over all folds (each row predicted by the model that did not see it). */
  accuracy: number;
  foldAccuracies: number[];
  /** The majority class's share: the accuracy of always guessing it. */
  chance: number;
  classes: number;
  rows: number;
}

/**
 * Linear-probe separability of labelled vectors: multinomial logistic regression on standardised features
 * (L2-penalised, L-BFGS), scored by held-out accuracy under stratified k-fold cross-validation. Near 1:
 * the sets are linearly separable; near `chance`: they overlap. The logits and gradients are fp32 GEMMs.
 */
export async function linearProbe(
  rows: Float32Array,
  labels: Int32Array,
  dim: number,
  optionsArg?: LinearProbeOptions,
): Promise<LinearProbeResult> {
  const options = checkOptions(optionsArg, "linearProbe options", LINEAR_PROBE_KEYS);
  checkFloat32("rows", rows);
  checkDim(dim);
  const n = rowCount("rows", rows, dim);
  if (!(labels instanceof Int32Array) || labels.length !== n)
    throw new TypeError(`labels: expected an Int32Array of ${n} class indices (one per row)`);
  const classIds = [...new Set(labels)].sort((a, b) => a - b);
  const K = classIds.length;
  if (K < 2) throw new RangeError(`labels: a probe needs at least 2 classes, got ${K}`);
  const y = Int32Array.from(labels, (l) => classIds.indexOf(l));
  const folds = checkInteger("folds", options.folds ?? 5, 2, n);
  const l2 = options.l2 ?? 1e-3;
  if (typeof l2 !== "number" || !Number.isFinite(l2) || l2 < 0)
    throw new RangeError(`l2: expected a finite number >= 0, got ${l2}`);
  // A non-finite feature would make its standardised column NaN and every line search fail, so the probe
  // would report chance accuracy as if the sets were inseparable.
  checkFiniteRows("rows", rows, dim);
  const iterations = checkInteger("iterations", options.iterations ?? 200, 1);
  const threads = analysisThreads(options.threads);
  const rng = new Rng(options.seed ?? 0);
  // Stratified folds: each class's rows shuffled and dealt round-robin.
  const fold = new Int32Array(n);
  let deal = 0;
  for (let c = 0; c < K; c++) {
    const members = rng.shuffle([...Array(n).keys()].filter((i) => y[i] === c));
    for (const i of members) fold[i] = deal++ % folds;
  }
  const counts = new Array(K).fill(0);
  for (const c of y) counts[c]++;
  const foldAccuracies: number[] = [];
  let correct = 0;
  for (let f = 0; f < folds; f++) {
    const train = [...Array(n).keys()].filter((i) => fold[i] !== f);
    const test = [...Array(n).keys()].filter((i) => fold[i] === f);
    if (test.length === 0) continue;
    const model = await fitLogistic(rows, y, dim, K, train, l2, iterations, threads);
    const pred = predictLogistic(model, rows, dim, K, test, threads);
    let ok = 0;
    test.forEach((r, i) => {
      if (pred[i] === y[r]) ok++;
    });
    correct += ok;
    foldAccuracies.push(ok / test.length);
  }
  return { accuracy: correct / n, foldAccuracies, chance: Math.max(...counts) / n, classes: K, rows: n };
}

interface LogisticModel {
  mean: Float64Array;
  scale: Float64Array;
  /** K x (dim + 1): weights then the bias per class. */
  w: Float64Array;
}

function gatherStandardised(
  rows: Float32Array,
  dim: number,
  idx: number[],
  mean: Float64Array,
  scale: Float64Array,
): Float32Array {
  const out = new Float32Array(idx.length * dim);
  idx.forEach((r, i) => {
    for (let j = 0; j < dim; j++) out[i * dim + j] = (rows[r * dim + j] - mean[j]) * scale[j];
  });
  return out;
}

async function fitLogistic(
  rows: Float32Array,
  y: Int32Array,
  dim: number,
  K: number,
  train: number[],
  l2: number,
  iterations: number,
  threads: number,
): Promise<LogisticModel> {
  const n = train.length;
  const mean = new Float64Array(dim);
  const scale = new Float64Array(dim);
  for (const r of train) for (let j = 0; j < dim; j++) mean[j] += rows[r * dim + j];
  for (let j = 0; j < dim; j++) mean[j] /= n;
  for (const r of train) for (let j = 0; j < dim; j++) scale[j] += (rows[r * dim + j] - mean[j]) ** 2;
  for (let j = 0; j < dim; j++) {
    const sd = Math.sqrt(scale[j] / Math.max(1, n - 1));
    scale[j] = sd > 0 ? 1 / sd : 0;
  }
  const X = gatherStandardised(rows, dim, train, mean, scale);
  const P = dim + 1;
  const W32 = new Float32Array(K * dim);
  const logits = new Float32Array(n * K);
  const G32 = new Float32Array(n * K);
  const gradW = new Float32Array(K * dim);
  const objective = (w: Float64Array, grad: Float64Array): number => {
    for (let c = 0; c < K; c++) for (let j = 0; j < dim; j++) W32[c * dim + j] = w[c * P + j];
    addon().gemm(false, true, n, K, dim, 1, X, dim, W32, dim, 0, logits, K, threads);
    let loss = 0;
    for (let i = 0; i < n; i++) {
      let max = -Infinity;
      for (let c = 0; c < K; c++) {
        const z = logits[i * K + c] + w[c * P + dim];
        logits[i * K + c] = z;
        if (z > max) max = z;
      }
      let sum = 0;
      for (let c = 0; c < K; c++) sum += Math.exp(logits[i * K + c] - max);
      const logZ = max + Math.log(sum);
      loss += logZ - logits[i * K + y[train[i]]];
      for (let c = 0; c < K; c++)
        G32[i * K + c] = (Math.exp(logits[i * K + c] - logZ) - (c === y[train[i]] ? 1 : 0)) / n;
    }
    addon().gemm(true, false, K, dim, n, 1, G32, K, X, dim, 0, gradW, dim, threads);
    let penalty = 0;
    grad.fill(0);
    for (let c = 0; c < K; c++) {
      let bias = 0;
      for (let i = 0; i < n; i++) bias += G32[i * K + c];
      grad[c * P + dim] = bias;
      for (let j = 0; j < dim; j++) {
        const v = w[c * P + j];
        penalty += v * v;
        grad[c * P + j] = gradW[c * dim + j] + l2 * v;
      }
    }
    return loss / n + 0.5 * l2 * penalty;
  };
  const w = lbfgs(objective, new Float64Array(K * P), iterations);
  return { mean, scale, w };
}

function predictLogistic(
  model: LogisticModel,
  rows: Float32Array,
  dim: number,
  K: number,
  test: number[],
  threads: number,
): Int32Array {
  const X = gatherStandardised(rows, dim, test, model.mean, model.scale);
  const P = dim + 1;
  const W32 = new Float32Array(K * dim);
  for (let c = 0; c < K; c++) for (let j = 0; j < dim; j++) W32[c * dim + j] = model.w[c * P + j];
  const logits = new Float32Array(test.length * K);
  addon().gemm(false, true, test.length, K, dim, 1, X, dim, W32, dim, 0, logits, K, threads);
  const out = new Int32Array(test.length);
  for (let i = 0; i < test.length; i++) {
    let best = 0;
    let bestZ = -Infinity;
    for (let c = 0; c < K; c++) {
      const z = logits[i * K + c] + model.w[c * P + dim];
      if (z > bestZ) {
        bestZ = z;
        best = c;
      }
    }
    out[i] = best;
  }
  return out;
}

/** Minimises f with L-BFGS (memory 10) and a backtracking Armijo line search (Nocedal and Wright, Alg. 7.4). */
export function lbfgs(
  f: (x: Float64Array, grad: Float64Array) => number,
  x0: Float64Array,
  iterations: number,
  tolerance = 1e-7,
): Float64Array {
  const n = x0.length;
  const memory = 10;
  const x = Float64Array.from(x0);
  const g = new Float64Array(n);
  let fx = f(x, g);
  const S: Float64Array[] = [];
  const Y: Float64Array[] = [];
  const rho: number[] = [];
  const dir = new Float64Array(n);
  const xNew = new Float64Array(n);
  const gNew = new Float64Array(n);
  const dot = (a: Float64Array, b: Float64Array) => {
    let s = 0;
    for (let i = 0; i < n; i++) s += a[i] * b[i];
    return s;
  };
  for (let it = 0; it < iterations; it++) {
    if (Math.sqrt(dot(g, g)) < tolerance) break;
    // Two-loop recursion: dir = -H g.
    for (let i = 0; i < n; i++) dir[i] = -g[i];
    const alpha: number[] = [];
    for (let k = S.length - 1; k >= 0; k--) {
      const a = rho[k] * dot(S[k], dir);
      alpha[k] = a;
      for (let i = 0; i < n; i++) dir[i] -= a * Y[k][i];
    }
    if (S.length > 0) {
      const k = S.length - 1;
      const scale = dot(S[k], Y[k]) / dot(Y[k], Y[k]);
      for (let i = 0; i < n; i++) dir[i] *= scale;
    }
    for (let k = 0; k < S.length; k++) {
      const b = rho[k] * dot(Y[k], dir);
      for (let i = 0; i < n; i++) dir[i] += S[k][i] * (alpha[k] - b);
    }
    let slope = dot(g, dir);
    if (!(slope < 0)) {
      for (let i = 0; i < n; i++) dir[i] = -g[i];
      slope = -dot(g, g);
      S.length = 0;
      Y.length = 0;
      rho.length = 0;
    }
    let step = S.length === 0 ? Math.min(1, 1 / Math.sqrt(-slope)) : 1;
    let fNew = Number.NaN;
    let accepted = false;
    for (let tries = 0; tries < 40; tries++) {
      for (let i = 0; i < n; i++) xNew[i] = x[i] + step * dir[i];
      fNew = f(xNew, gNew);
      if (fNew <= fx + 1e-4 * step * slope) {
        accepted = true;
        break;
      }
      step *= 0.5;
    }
    if (!accepted) break;
    const s = new Float64Array(n);
    const yv = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      s[i] = xNew[i] - x[i];
      yv[i] = gNew[i] - g[i];
    }
    const sy = dot(s, yv);
    if (sy > 1e-12) {
      S.push(s);
      Y.push(yv);
      rho.push(1 / sy);
      if (S.length > memory) {
        S.shift();
        Y.shift();
        rho.shift();
      }
    }
    const decrease = fx - fNew;
    x.set(xNew);
    g.set(gNew);
    fx = fNew;
    if (decrease < tolerance * Math.max(1, Math.abs(fx))) break;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------------------
// k-means

export interface KMeansOptions {
  k: number;
  /** Independent k-means++ starts; the one with the lowest inertia wins (default 4). */
  restarts?: number;
  maxIterations?: number;
  seed?: number;
  threads?: number;
}

const KMEANS_KEYS = {
  k: true,
  restarts: true,
  maxIterations: true,
  seed: true,
  threads: true,
} satisfies OptionKeys<KMeansOptions>;

export interface KMeansResult {
  /** k x dim. */
  centroids: Float32Array;
  /** The cluster of each row. */
  assignments: Int32Array;
  /** Sum of squared distances of the rows to their centroids. */
  inertia: number;
  iterations: number;
}

/**
 * k-means (Lloyd's iterations from a k-means++ start: Arthur and Vassilvitskii 2007), seeded; distances are
 * native. An empty cluster is re-seeded with the row farthest from its centroid.
 */
export async function kMeans(
  rowsArg: Float32Array,
  dim: number,
  options: KMeansOptions,
): Promise<KMeansResult> {
  checkFloat32("rows", rowsArg);
  checkDim(dim);
  const n = rowCount("rows", rowsArg, dim);
  checkRequiredOptions(options, "kMeans options", KMEANS_KEYS);
  const k = checkInteger("k", options?.k, 1, n);
  const restarts = checkInteger("restarts", options.restarts ?? 4, 1);
  const maxIterations = checkInteger("maxIterations", options.maxIterations ?? 100, 1);
  const threads = analysisThreads(options.threads);
  const rng = new Rng(options.seed ?? 0);
  // Copied once, after the checks: the restarts read the rows across awaits, and the caller may change or
  // transfer its array meanwhile.
  const rows = rowsArg.slice();
  let best: KMeansResult | null = null;
  for (let r = 0; r < restarts; r++) {
    const result = await kMeansOnce(rows, dim, n, k, maxIterations, rng, threads);
    if (!best || result.inertia < best.inertia) best = result;
  }
  return best!;
}

async function kMeansOnce(
  rows: Float32Array,
  dim: number,
  n: number,
  k: number,
  maxIterations: number,
  rng: Rng,
  threads: number,
): Promise<KMeansResult> {
  const centroids = new Float32Array(k * dim);
  const first = rng.int(n);
  centroids.set(rows.subarray(first * dim, (first + 1) * dim), 0);
  const nearest = await addon().analysisPairwiseSquaredDistances(rows, centroids.slice(0, dim), dim, threads);
  for (let c = 1; c < k; c++) {
    let total = 0;
    for (let i = 0; i < n; i++) total += nearest[i];
    let pick = 0;
    if (total > 0) {
      let u = rng.uniform() * total;
      for (pick = 0; pick < n - 1; pick++) {
        u -= nearest[pick];
        if (u < 0) break;
      }
    } else pick = rng.int(n);
    const centre = rows.slice(pick * dim, (pick + 1) * dim);
    centroids.set(centre, c * dim);
    const dist = await addon().analysisPairwiseSquaredDistances(rows, centre, dim, threads);
    for (let i = 0; i < n; i++) nearest[i] = Math.min(nearest[i], dist[i]);
  }
  const assignments = new Int32Array(n).fill(-1);
  let inertia = 0;
  let iterations = 0;
  // Assigns every row to its nearest centroid; the inertia is of these centroids. Returns the distances
  // and how many rows changed cluster.
  const assign = async () => {
    const dist = await addon().analysisPairwiseSquaredDistances(rows, centroids, dim, threads);
    let changed = 0;
    inertia = 0;
    for (let i = 0; i < n; i++) {
      let bestC = 0;
      for (let c = 1; c < k; c++) if (dist[i * k + c] < dist[i * k + bestC]) bestC = c;
      if (assignments[i] !== bestC) changed++;
      assignments[i] = bestC;
      inertia += dist[i * k + bestC];
    }
    return { dist, changed };
  };
  for (; iterations < maxIterations; iterations++) {
    const { dist, changed } = await assign();
    if (changed === 0 && iterations > 0) break;
    const sums = new Float64Array(k * dim);
    const counts = new Int32Array(k);
    for (let i = 0; i < n; i++) {
      const c = assignments[i];
      counts[c]++;
      for (let j = 0; j < dim; j++) sums[c * dim + j] += rows[i * dim + j];
    }
    for (let c = 0; c < k; c++) {
      if (counts[c] === 0) {
        let far = 0;
        for (let i = 1; i < n; i++)
          if (dist[i * k + assignments[i]] > dist[far * k + assignments[far]]) far = i;
        centroids.set(rows.subarray(far * dim, (far + 1) * dim), c * dim);
        dist[far * k + assignments[far]] = 0;
        continue;
      }
      for (let j = 0; j < dim; j++) centroids[c * dim + j] = sums[c * dim + j] / counts[c];
    }
  }
  // Stopped by maxIterations (not by the break) after moving the centroids: assignments and inertia of the
  // returned ones.
  if (iterations === maxIterations) await assign();
  return { centroids, assignments, inertia, iterations };
}

// ---------------------------------------------------------------------------------------------------------
// Tests of location and spread

/** ln I_x(a, b), the regularised incomplete beta function (Numerical Recipes, 3rd ed., section 6.4). */
function regularizedBeta(x: number, a: number, b: number): number {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const front = Math.exp(logGamma(a + b) - logGamma(a) - logGamma(b) + a * Math.log(x) + b * Math.log1p(-x));
  const cf = (xx: number, aa: number, bb: number): number => {
    const tiny = 1e-300;
    let c = 1;
    let d = 1 - ((aa + bb) * xx) / (aa + 1);
    if (Math.abs(d) < tiny) d = tiny;
    d = 1 / d;
    let h = d;
    for (let m = 1; m < 10000; m++) {
      const m2 = 2 * m;
      let num = (m * (bb - m) * xx) / ((aa + m2 - 1) * (aa + m2));
      d = 1 + num * d;
      if (Math.abs(d) < tiny) d = tiny;
      c = 1 + num / c;
      if (Math.abs(c) < tiny) c = tiny;
      d = 1 / d;
      h *= d * c;
      num = (-(aa + m) * (aa + bb + m) * xx) / ((aa + m2) * (aa + m2 + 1));
      d = 1 + num * d;
      if (Math.abs(d) < tiny) d = tiny;
      c = 1 + num / c;
      if (Math.abs(c) < tiny) c = tiny;
      d = 1 / d;
      const delta = d * c;
      h *= delta;
      if (Math.abs(delta - 1) < 1e-15) break;
    }
    return h;
  };
  if (x < (a + 1) / (a + b + 2)) return (front * cf(x, a, b)) / a;
  return 1 - (front * cf(1 - x, b, a)) / b;
}

/** Two-sided p-value of Student's t with `df` degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2). */
export function studentTwoSidedP(t: number, df: number): number {
  if (!Number.isFinite(t)) return Number.isNaN(t) ? Number.NaN : 0;
  return regularizedBeta(df / (df + t * t), df / 2, 0.5);
}

/** Two-sided p-value of a standard normal z: P(|Z| > |z|) = Q(1/2, z^2 / 2). */
export function normalTwoSidedP(z: number): number {
  if (Number.isNaN(z)) return Number.NaN;
  return Math.exp(logUpperGammaRegularized(0.5, (z * z) / 2));
}

export interface Summary {
  count: number;
  mean: number;
  /** Sample standard deviation (n - 1). */
  std: number;
  median: number;
}

export function summarize(values: ArrayLike<number>): Summary {
  const n = values.length;
  let mean = 0;
  for (let i = 0; i < n; i++) mean += values[i];
  mean /= n;
  let ss = 0;
  for (let i = 0; i < n; i++) ss += (values[i] - mean) ** 2;
  const sorted = Float64Array.from(values).sort();
  const median = n % 2 === 1 ? sorted[(n - 1) / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  return { count: n, mean, std: Math.sqrt(ss / Math.max(1, n - 1)), median };
}

export interface TestResult {
  statistic: number;
  df?: number;
  pValue: number;
}

/** Welch's unequal-variances t-test of equal means (Welch 1947). */
export function welchTTest(a: ArrayLike<number>, b: ArrayLike<number>): TestResult {
  const sa = summarize(a);
  const sb = summarize(b);
  if (sa.count < 2 || sb.count < 2) throw new RangeError("welchTTest: each sample needs at least 2 values");
  const va = (sa.std * sa.std) / sa.count;
  const vb = (sb.std * sb.std) / sb.count;
  const t = (sa.mean - sb.mean) / Math.sqrt(va + vb);
  const df = (va + vb) ** 2 / ((va * va) / (sa.count - 1) + (vb * vb) / (sb.count - 1));
  return { statistic: t, df, pValue: studentTwoSidedP(t, df) };
}

/**
 * Mann-Whitney U test (two-sided, normal approximation with the tie correction and a continuity correction).
 * `probabilityGreater` = U_a / (n_a n_b): the probability that a value of `a` exceeds one of `b` (ties half).
 */
export function mannWhitneyU(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
): TestResult & { u: number; probabilityGreater: number } {
  const na = a.length;
  const nb = b.length;
  if (na < 1 || nb < 1) throw new RangeError("mannWhitneyU: each sample needs at least 1 value");
  const N = na + nb;
  const all = new Float64Array(N);
  for (let i = 0; i < na; i++) all[i] = a[i];
  for (let i = 0; i < nb; i++) all[na + i] = b[i];
  const order = Array.from({ length: N }, (_, i) => i).sort((x, y) => all[x] - all[y]);
  const rank = new Float64Array(N);
  let tieTerm = 0;
  for (let i = 0; i < N; ) {
    let j = i;
    while (j + 1 < N && all[order[j + 1]] === all[order[i]]) j++;
    const r = (i + j) / 2 + 1;
    for (let k = i; k <= j; k++) rank[order[k]] = r;
    const t = j - i + 1;
    tieTerm += t * t * t - t;
    i = j + 1;
  }
  let ra = 0;
  for (let i = 0; i < na; i++) ra += rank[i];
  const u = ra - (na * (na + 1)) / 2;
  const mu = (na * nb) / 2;
  const sigma = Math.sqrt(((na * nb) / 12) * (N + 1 - tieTerm / (N * (N - 1))));
  const diff = u - mu;
  const z = sigma > 0 ? (diff - Math.sign(diff) * 0.5) / sigma : 0;
  return { statistic: z, u, pValue: sigma > 0 ? normalTwoSidedP(z) : 1, probabilityGreater: u / (na * nb) };
}

/**
 * Brown-Forsythe test of equal spread: Student's pooled t-test on the absolute deviations from each sample's
 * median (for two groups the Levene/Brown-Forsythe F equals t^2).
 */
export function brownForsythe(a: ArrayLike<number>, b: ArrayLike<number>): TestResult {
  const ma = summarize(a).median;
  const mb = summarize(b).median;
  const da = Float64Array.from(a, (v) => Math.abs(v - ma));
  const db = Float64Array.from(b, (v) => Math.abs(v - mb));
  const sa = summarize(da);
  const sb = summarize(db);
  const df = sa.count + sb.count - 2;
  const pooled = ((sa.count - 1) * sa.std ** 2 + (sb.count - 1) * sb.std ** 2) / df;
  const t = (sa.mean - sb.mean) / Math.sqrt(pooled * (1 / sa.count + 1 / sb.count));
  return { statistic: t, df, pValue: studentTwoSidedP(t, df) };
}

// ---------------------------------------------------------------------------------------------------------
// Trajectories

/** |h_{t+1} - h_t| for every pair of consecutive positions of every trajectory (each T x dim). */
export function stepLengths(trajectories: readonly Float32Array[], dim: number): Float64Array {
  checkDim(dim);
  const out: number[] = [];
  trajectories.forEach((t, i) => {
    checkFloat32(`trajectories[${i}]`, t);
    const T = rowCount(`trajectories[${i}]`, t, dim);
    for (let p = 0; p + 1 < T; p++) {
      let s = 0;
      for (let j = 0; j < dim; j++) {
        const v = t[(p + 1) * dim + j] - t[p * dim + j];
        s += v * v;
      }
      out.push(Math.sqrt(s));
    }
  });
  return Float64Array.from(out);
}

/**
 * Random walks over the vocabulary: `count` sequences of `length` rows drawn uniformly (with replacement) from
 * vocab (rows x dim). The baseline of the paper's first figure for token-embedding trajectories; for deeper
 * layers, capture the activations of random token sequences (captureActivations with `inputIds`).
 */
export function randomWalkTrajectories(
  vocab: Float32Array,
  dim: number,
  options: { count: number; length: number; seed?: number },
): { trajectories: Float32Array[]; tokenIds: Int32Array[] } {
  checkFloat32("vocab", vocab);
  checkRequiredOptions(options, "randomWalkTrajectories options", { count: true, length: true, seed: true });
  const V = rowCount("vocab", vocab, checkDim(dim));
  const count = checkInteger("count", options?.count, 1);
  const length = checkInteger("length", options.length, 2);
  const rng = new Rng(options.seed ?? 0);
  const trajectories: Float32Array[] = [];
  const tokenIds: Int32Array[] = [];
  for (let c = 0; c < count; c++) {
    const ids = new Int32Array(length);
    const t = new Float32Array(length * dim);
    for (let p = 0; p < length; p++) {
      ids[p] = rng.int(V);
      t.set(vocab.subarray(ids[p] * dim, (ids[p] + 1) * dim), p * dim);
    }
    trajectories.push(t);
    tokenIds.push(ids);
  }
  return { trajectories, tokenIds };
}

export interface TrajectoryStatistics {
  data: Summary;
  baseline: Summary;
  /** data.std / baseline.std: below 1 when the trajectories' steps spread less than the random walk's. */
  spreadRatio: number;
  meanRatio: number;
  /** Equal mean step length (Welch). */
  welch: TestResult;
  /** Equal step-length distributions (Mann-Whitney U). */
  mannWhitney: TestResult & { u: number; probabilityGreater: number };
  /** Equal spread of step lengths (Brown-Forsythe). */
  spread: TestResult;
}

/**
 * The paper's first figure as numbers: step lengths between consecutive token positions of sentence
 * trajectories against those of a baseline (a random walk over the vocabulary), with tests of equal mean
 * (Welch), equal distribution (Mann-Whitney) and equal spread (Brown-Forsythe).
 */
export function trajectoryStatistics(
  trajectories: readonly Float32Array[],
  baseline: readonly Float32Array[],
  dim: number,
): TrajectoryStatistics {
  const a = stepLengths(trajectories, dim);
  const b = stepLengths(baseline, dim);
  if (a.length < 2 || b.length < 2)
    throw new RangeError(
      `trajectories, baseline: need at least 2 steps each, got ${a.length} and ${b.length}`,
    );
  const data = summarize(a);
  const base = summarize(b);
  return {
    data,
    baseline: base,
    spreadRatio: data.std / base.std,
    meanRatio: data.mean / base.mean,
    welch: welchTTest(a, b),
    mannWhitney: mannWhitneyU(a, b),
    spread: brownForsythe(a, b),
  };
}

// ---------------------------------------------------------------------------------------------------------
// Runs: metrics and convergence time

export interface RunMetrics {
  steps: StepRecord[];
  evals: EvalRecord[];
}

/** Parses a run's metrics.jsonl (step and eval records; other lines and a torn last line are skipped). */
export function readMetrics(runDir: string): RunMetrics {
  const file = join(runDir, "metrics.jsonl");
  if (!existsSync(file))
    throw new Error(`${runDir}: no metrics.jsonl (is it a run directory written by tune?)`);
  const steps: StepRecord[] = [];
  const evals: EvalRecord[] = [];
  for (const line of readFileSync(file, "utf8").split("\n")) {
    if (line.trim() === "") continue;
    let rec: { type?: string };
    try {
      rec = JSON.parse(line);
    } catch {
      continue;
    }
    if (rec.type === "step") steps.push(rec as StepRecord);
    else if (rec.type === "eval") evals.push(rec as EvalRecord);
  }
  // A resumed run may repeat steps after its last checkpoint: keep the latest record per step.
  const latest = <T extends { step: number }>(xs: T[]) =>
    [...new Map(xs.map((x) => [x.step, x])).values()].sort((p, q) => p.step - q.step);
  return { steps: latest(steps), evals: latest(evals) };
}

export interface ConvergenceOptions {
  /** "validation" (eval records, default) or "train" (step losses smoothed over `window` steps). */
  source?: "validation" | "train";
  /** Steps in the trailing mean of the training loss (default 10). */
  window?: number;
}

const CONVERGENCE_KEYS = { source: true, window: true } satisfies OptionKeys<ConvergenceOptions>;

const finiteLoss = (x: unknown): x is number => typeof x === "number" && Number.isFinite(x);

/**
 * The loss curve a convergence time is read from: (step, loss) pairs in step order. Validation records
 * without a finite loss (collapse-only records, whose NaN metrics.jsonl holds as null; a diverged run) are
 * left out; a training-loss window holding a non-finite loss gives NaN (never "reached").
 */
export function lossCurve(
  metrics: RunMetrics,
  optionsArg?: ConvergenceOptions,
): { step: number; loss: number }[] {
  const options = checkOptions(optionsArg, "lossCurve options", CONVERGENCE_KEYS);
  const source = options.source ?? "validation";
  if (source !== "validation" && source !== "train")
    throw new TypeError(`source: expected "validation" or "train", got ${JSON.stringify(source)}`);
  if (source === "validation")
    return metrics.evals
      .filter((e) => finiteLoss(e.validationLoss))
      .map((e) => ({ step: e.step, loss: e.validationLoss }));
  const window = checkInteger("window", options.window ?? 10, 1);
  const out: { step: number; loss: number }[] = [];
  let sum = 0;
  let bad = 0; // non-finite losses inside the window
  metrics.steps.forEach((s, i) => {
    if (finiteLoss(s.loss)) sum += s.loss;
    else bad++;
    if (i >= window) {
      const old = metrics.steps[i - window].loss;
      if (finiteLoss(old)) sum -= old;
      else bad--;
    }
    out.push({ step: s.step, loss: bad > 0 ? Number.NaN : sum / Math.min(i + 1, window) });
  });
  return out;
}

/** The first step whose loss (see lossCurve) is at or below `level`; null when the run never gets there. */
export function convergenceStep(
  metrics: RunMetrics,
  level: number,
  options?: ConvergenceOptions,
): number | null {
  checkOptions(options, "convergenceStep options", CONVERGENCE_KEYS);
  for (const p of lossCurve(metrics, options)) if (Number.isFinite(p.loss) && p.loss <= level) return p.step;
  return null;
}

/**
 * Convergence time by run (paper, finding 3: distant priors take longer to reach the same validation loss).
 * Without a level, the level is the highest final loss among the runs: one every run reaches.
 */
export function convergenceByRun(
  runs: readonly { name: string; metrics: RunMetrics }[],
  optionsArg?: ConvergenceOptions & { level?: number },
): { level: number; steps: { name: string; step: number | null; finalLoss: number | null }[] } {
  const { level: givenLevel, ...options } = checkOptions(optionsArg, "convergenceByRun options", {
    ...CONVERGENCE_KEYS,
    level: true,
  });
  if (givenLevel !== undefined && typeof givenLevel !== "number")
    throw new TypeError(`level: expected a number, got ${typeof givenLevel} ${JSON.stringify(givenLevel)}`);
  const finals = runs.map((r) => {
    const c = lossCurve(r.metrics, options);
    return c.length && Number.isFinite(c[c.length - 1].loss) ? c[c.length - 1].loss : null;
  });
  const known = finals.filter((f): f is number => f !== null);
  const level = givenLevel ?? (known.length ? Math.max(...known) : Number.NaN);
  return {
    level,
    steps: runs.map((r, i) => ({
      name: r.name,
      step: Number.isNaN(level) ? null : convergenceStep(r.metrics, level, options),
      finalLoss: finals[i],
    })),
  };
}
