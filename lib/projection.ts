// 2-D (or k-D) projections for the paper's pictures (paper.md, "Analyses": PCA / t-SNE of the vocabulary with
// prior samples and trained prompts; PCA of activations per layer): PCA exact or by randomised SVD, t-SNE,
// and UMAP. Every method is deterministic for a given seed.
//
// t-SNE is written here (Barnes-Hut, van der Maaten, JMLR 2014) rather than taken from npm: the packages
// there (tsne-js, @keckelt/tsne, druidjs) compute the exact O(n^2) gradient with dense n x n matrices, which
// stops being usable at a few thousand points, and none takes precomputed neighbours. This one computes the
// input similarities on exact nearest neighbours (native pairwise distances) and the repulsion with a
// quadtree, O(n log n) per iteration. UMAP is umap-js (the PAIR-code port of McInnes et al.), fed the same
// exact neighbours and a seeded random source.
import { UMAP } from "umap-js";
import { analysisThreads } from "./analysis.js";
import { checkFloat32, checkInteger, rowCount } from "./knn.js";
import { addon } from "./native.js";
import { Rng } from "./rng.js";
import { checkOptions, type OptionKeys } from "./validate.js";

// ---------------------------------------------------------------------------------------------------------
// PCA

export interface PcaOptions {
  /** Number of principal components (default 2). */
  components?: number;
  /**
   * "exact": eigen-decomposition of the covariance (native float64, O(d^3)); "randomized": randomised SVD
   * of the centred rows (Halko, Martinsson and Tropp, SIAM Review 2011, Alg. 4.4), O(n d k); "auto" (default):
   * exact up to 512 dimensions, randomised beyond.
   */
  method?: "auto" | "exact" | "randomized";
  /** Extra random directions of the randomised method (default 10). */
  oversample?: number;
  /** Power iterations of the randomised method (default 4). */
  powerIterations?: number;
  seed?: number;
  threads?: number;
}

const PCA_KEYS = {
  components: true,
  method: true,
  oversample: true,
  powerIterations: true,
  seed: true,
  threads: true,
} satisfies OptionKeys<PcaOptions>;

/** A fitted PCA: project any set of rows (e.g. prior samples) into the axes of the set it was fitted on. */
export interface Pca {
  method: "exact" | "randomized";
  dim: number;
  components: number;
  mean: Float64Array;
  /** components x dim, row i the i-th principal axis (unit; sign: largest-magnitude entry positive). */
  axes: Float64Array;
  /** Variance along each axis (eigenvalues of the sample covariance, n - 1 normalisation). */
  explainedVariance: Float64Array;
  explainedVarianceRatio: Float64Array;
  totalVariance: number;
  /** rows x components coordinates of rows x dim vectors. */
  transform(rows: Float32Array): Float64Array;
}

function fixSign(v: Float64Array, offset: number, d: number): void {
  let big = offset;
  for (let j = offset + 1; j < offset + d; j++) if (Math.abs(v[j]) > Math.abs(v[big])) big = j;
  if (v[big] < 0) for (let j = offset; j < offset + d; j++) v[j] = -v[j];
}

function makePca(
  method: "exact" | "randomized",
  dim: number,
  mean: Float64Array,
  axes: Float64Array,
  variance: Float64Array,
  totalVariance: number,
): Pca {
  const k = variance.length;
  return {
    method,
    dim,
    components: k,
    mean,
    axes,
    explainedVariance: variance,
    explainedVarianceRatio: variance.map((v) => (totalVariance > 0 ? v / totalVariance : 0)),
    totalVariance,
    transform(rows: Float32Array): Float64Array {
      checkFloat32("rows", rows);
      const n = rowCount("rows", rows, dim);
      const out = new Float64Array(n * k);
      const centred = new Float64Array(dim);
      for (let r = 0; r < n; r++) {
        for (let j = 0; j < dim; j++) centred[j] = rows[r * dim + j] - mean[j];
        for (let c = 0; c < k; c++) {
          let s = 0;
          for (let j = 0; j < dim; j++) s += centred[j] * axes[c * dim + j];
          out[r * k + c] = s;
        }
      }
      return out;
    },
  };
}

/** Fits a PCA to rows x dim vectors (see PcaOptions). */
export async function fitPca(rows: Float32Array, dim: number, optionsArg?: PcaOptions): Promise<Pca> {
  const options = checkOptions(optionsArg, "fitPca options", PCA_KEYS);
  checkFloat32("rows", rows);
  checkInteger("dim", dim, 1);
  const n = rowCount("rows", rows, dim);
  if (n < 2) throw new RangeError(`rows: PCA needs at least 2 rows, got ${n}`);
  const k = checkInteger("components", options.components ?? 2, 1, Math.min(dim, n));
  const threads = analysisThreads(options.threads);
  const method = options.method ?? "auto";
  if (method !== "auto" && method !== "exact" && method !== "randomized")
    throw new TypeError(`method: expected "auto", "exact" or "randomized", got ${String(method)}`);
  if (method === "exact" || (method === "auto" && dim <= 512)) {
    const { mean, covariance } = await addon().analysisCovariance(rows, dim, threads);
    const eig = await addon().analysisSymmetricEigen(covariance, dim, true, threads);
    let total = 0;
    for (let i = 0; i < dim; i++) total += covariance[i * dim + i];
    const variance = eig.values.slice(0, k).map((v) => Math.max(0, v));
    return makePca("exact", dim, mean, eig.vectors!.slice(0, k * dim), variance, total);
  }
  return randomizedPca(rows, dim, n, k, options, threads);
}

/** Orthonormalises the columns of a (rows x cols, row-major) in place: modified Gram-Schmidt, twice. */
function orthonormalizeColumns(a: Float32Array, rows: number, cols: number): void {
  const col = new Float64Array(rows);
  const basis: Float64Array[] = [];
  for (let c = 0; c < cols; c++) {
    for (let r = 0; r < rows; r++) col[r] = a[r * cols + c];
    for (let pass = 0; pass < 2; pass++)
      for (const q of basis) {
        let s = 0;
        for (let r = 0; r < rows; r++) s += q[r] * col[r];
        for (let r = 0; r < rows; r++) col[r] -= s * q[r];
      }
    let norm = 0;
    for (let r = 0; r < rows; r++) norm += col[r] * col[r];
    norm = Math.sqrt(norm);
    const q = new Float64Array(rows);
    if (norm > 1e-30) for (let r = 0; r < rows; r++) q[r] = col[r] / norm;
    basis.push(q);
    for (let r = 0; r < rows; r++) a[r * cols + c] = q[r];
  }
}

async function randomizedPca(
  rows: Float32Array,
  dim: number,
  n: number,
  k: number,
  options: PcaOptions,
  threads: number,
): Promise<Pca> {
  const gemm = addon().gemm;
  const l = Math.min(k + checkInteger("oversample", options.oversample ?? 10, 0), dim, n);
  const powerIterations = checkInteger("powerIterations", options.powerIterations ?? 4, 0);
  const rng = new Rng(options.seed ?? 0);
  const mean = new Float64Array(dim);
  for (let r = 0; r < n; r++) for (let j = 0; j < dim; j++) mean[j] += rows[r * dim + j];
  for (let j = 0; j < dim; j++) mean[j] /= n;
  const X = new Float32Array(n * dim);
  let total = 0;
  for (let r = 0; r < n; r++)
    for (let j = 0; j < dim; j++) {
      const v = rows[r * dim + j] - mean[j];
      X[r * dim + j] = v;
      total += v * v;
    }
  total /= n - 1;
  const omega = new Float32Array(dim * l);
  for (let i = 0; i < omega.length; i++) omega[i] = rng.normal();
  const Q = new Float32Array(n * l);
  gemm(false, false, n, l, dim, 1, X, dim, omega, l, 0, Q, l, threads);
  orthonormalizeColumns(Q, n, l);
  const Z = new Float32Array(dim * l);
  for (let it = 0; it < powerIterations; it++) {
    gemm(true, false, dim, l, n, 1, X, dim, Q, l, 0, Z, l, threads);
    orthonormalizeColumns(Z, dim, l);
    gemm(false, false, n, l, dim, 1, X, dim, Z, l, 0, Q, l, threads);
    orthonormalizeColumns(Q, n, l);
  }
  const B = new Float32Array(l * dim);
  gemm(true, false, l, dim, n, 1, Q, l, X, dim, 0, B, dim, threads);
  const BBt = new Float64Array(l * l);
  for (let i = 0; i < l; i++)
    for (let j = 0; j <= i; j++) {
      let s = 0;
      for (let c = 0; c < dim; c++) s += B[i * dim + c] * B[j * dim + c];
      BBt[i * l + j] = s;
      BBt[j * l + i] = s;
    }
  const eig = await addon().analysisSymmetricEigen(BBt, l, true, threads);
  const axes = new Float64Array(k * dim);
  const variance = new Float64Array(k);
  for (let c = 0; c < k; c++) {
    const s2 = Math.max(0, eig.values[c]);
    variance[c] = s2 / (n - 1);
    const s = Math.sqrt(s2);
    for (let r = 0; r < l; r++) {
      const u = eig.vectors![c * l + r];
      for (let j = 0; j < dim; j++) axes[c * dim + j] += u * B[r * dim + j];
    }
    if (s > 0) for (let j = 0; j < dim; j++) axes[c * dim + j] /= s;
    fixSign(axes, c * dim, dim);
  }
  return makePca("randomized", dim, mean, axes, variance, total);
}

/** PCA of rows and their coordinates: rows x components. */
export async function pca(
  rows: Float32Array,
  dim: number,
  options?: PcaOptions,
): Promise<{ pca: Pca; projection: Float64Array }> {
  checkOptions(options, "pca options", PCA_KEYS);
  const fitted = await fitPca(rows, dim, options);
  return { pca: fitted, projection: fitted.transform(rows) };
}

// ---------------------------------------------------------------------------------------------------------
// Exact nearest neighbours (for t-SNE and UMAP)

/**
 * The k nearest other rows of each row (Euclidean, exact: native pairwise distances in blocks of rows),
 * nearest first, ties to the lower index.
 */
export async function exactNeighbors(
  rows: Float32Array,
  dim: number,
  k: number,
  threads?: number,
): Promise<{ indices: Int32Array; distances: Float64Array }> {
  const n = rowCount("rows", rows, dim);
  checkInteger("k", k, 1, n - 1);
  const t = analysisThreads(threads);
  const indices = new Int32Array(n * k);
  const distances = new Float64Array(n * k);
  const block = Math.max(1, Math.min(n, Math.floor(4_000_000 / n)));
  const heapIdx = new Int32Array(k);
  const heapDist = new Float64Array(k);
  // Max-heap on (distance, index) of the k best so far.
  const worse = (d1: number, i1: number, d2: number, i2: number) => d1 > d2 || (d1 === d2 && i1 > i2);
  for (let r0 = 0; r0 < n; r0 += block) {
    const rowsHere = Math.min(block, n - r0);
    const sq = await addon().analysisPairwiseSquaredDistances(
      rows.subarray(r0 * dim, (r0 + rowsHere) * dim),
      rows,
      dim,
      t,
    );
    for (let b = 0; b < rowsHere; b++) {
      const i = r0 + b;
      let size = 0;
      for (let j = 0; j < n; j++) {
        if (j === i) continue;
        const dj = sq[b * n + j];
        if (size < k) {
          let p = size++;
          while (p > 0) {
            const parent = (p - 1) >> 1;
            if (!worse(dj, j, heapDist[parent], heapIdx[parent])) break;
            heapDist[p] = heapDist[parent];
            heapIdx[p] = heapIdx[parent];
            p = parent;
          }
          heapDist[p] = dj;
          heapIdx[p] = j;
        } else if (worse(heapDist[0], heapIdx[0], dj, j)) {
          let p = 0;
          for (;;) {
            const l = 2 * p + 1;
            if (l >= k) break;
            let c = l;
            if (l + 1 < k && worse(heapDist[l + 1], heapIdx[l + 1], heapDist[l], heapIdx[l])) c = l + 1;
            if (!worse(heapDist[c], heapIdx[c], dj, j)) break;
            heapDist[p] = heapDist[c];
            heapIdx[p] = heapIdx[c];
            p = c;
          }
          heapDist[p] = dj;
          heapIdx[p] = j;
        }
      }
      const order = Array.from({ length: k }, (_, q) => q).sort(
        (x, y) => heapDist[x] - heapDist[y] || heapIdx[x] - heapIdx[y],
      );
      order.forEach((q, o) => {
        indices[i * k + o] = heapIdx[q];
        distances[i * k + o] = Math.sqrt(heapDist[q]);
      });
    }
  }
  return { indices, distances };
}

// ---------------------------------------------------------------------------------------------------------
// t-SNE

export interface TsneOptions {
  /** Effective number of neighbours (default 30, lowered to (n - 1) / 3 for small sets). */
  perplexity?: number;
  /** Gradient-descent iterations (default 1000; the first 250 with early exaggeration). */
  iterations?: number;
  /** Default "auto": max(n / earlyExaggeration / 4, 50), as scikit-learn and openTSNE. */
  learningRate?: number | "auto";
  earlyExaggeration?: number;
  /** Barnes-Hut opening angle (default 0.5; 0 = exact repulsion). */
  theta?: number;
  /** "pca" (default: the first two principal components scaled to std 1e-4) or "random" (N(0, 1e-4^2)). */
  init?: "pca" | "random";
  seed?: number;
  threads?: number;
  onIteration?: (iteration: number, total: number) => void;
}

const TSNE_KEYS = {
  perplexity: true,
  iterations: true,
  learningRate: true,
  earlyExaggeration: true,
  theta: true,
  init: true,
  seed: true,
  threads: true,
  onIteration: true,
} satisfies OptionKeys<TsneOptions>;

/** Input similarities p_ij on the k nearest neighbours: per-row bandwidth by bisection on the perplexity. */
function tsneAffinities(
  indices: Int32Array,
  distances: Float64Array,
  n: number,
  k: number,
  perplexity: number,
): { rowStart: Int32Array; cols: Int32Array; vals: Float64Array } {
  const cond = new Float64Array(n * k);
  const target = Math.log(perplexity);
  const p = new Float64Array(k);
  for (let i = 0; i < n; i++) {
    const d2 = distances.subarray(i * k, (i + 1) * k).map((d) => d * d);
    let beta = 1;
    let lo = 0;
    let hi = Number.POSITIVE_INFINITY;
    // Distances shifted by the nearest one keep exp() away from underflow without changing p.
    const shift = d2[0];
    for (let it = 0; it < 200; it++) {
      let sum = 0;
      let weighted = 0;
      for (let j = 0; j < k; j++) {
        p[j] = Math.exp(-beta * (d2[j] - shift));
        sum += p[j];
        weighted += (d2[j] - shift) * p[j];
      }
      const entropy = Math.log(sum) + (beta * weighted) / sum;
      if (Math.abs(entropy - target) < 1e-5) break;
      if (entropy > target) {
        lo = beta;
        beta = hi === Number.POSITIVE_INFINITY ? beta * 2 : (beta + hi) / 2;
      } else {
        hi = beta;
        beta = (beta + lo) / 2;
      }
    }
    let sum = 0;
    for (let j = 0; j < k; j++) sum += p[j];
    for (let j = 0; j < k; j++) cond[i * k + j] = p[j] / sum;
  }
  // Symmetrise: p_ij = (p_j|i + p_i|j) / 2n, kept sparse.
  const maps: Map<number, number>[] = Array.from({ length: n }, () => new Map());
  for (let i = 0; i < n; i++)
    for (let q = 0; q < k; q++) {
      const j = indices[i * k + q];
      const v = cond[i * k + q] / (2 * n);
      maps[i].set(j, (maps[i].get(j) ?? 0) + v);
      maps[j].set(i, (maps[j].get(i) ?? 0) + v);
    }
  const rowStart = new Int32Array(n + 1);
  for (let i = 0; i < n; i++) rowStart[i + 1] = rowStart[i] + maps[i].size;
  const cols = new Int32Array(rowStart[n]);
  const vals = new Float64Array(rowStart[n]);
  for (let i = 0; i < n; i++) {
    let o = rowStart[i];
    for (const [j, v] of [...maps[i]].sort((a, b) => a[0] - b[0])) {
      cols[o] = j;
      vals[o++] = v;
    }
  }
  return { rowStart, cols, vals };
}

/** A quadtree over 2-D points for the Barnes-Hut repulsion (node arrays; leaves hold one point). */
class QuadTree {
  sumX: number[] = [];
  sumY: number[] = [];
  count: number[] = [];
  x0: number[] = [];
  y0: number[] = [];
  width: number[] = [];
  child: number[] = [];
  point: number[] = [];

  constructor(y: Float64Array, n: number) {
    let minX = Number.POSITIVE_INFINITY;
    let minY = Number.POSITIVE_INFINITY;
    let maxX = Number.NEGATIVE_INFINITY;
    let maxY = Number.NEGATIVE_INFINITY;
    for (let i = 0; i < n; i++) {
      minX = Math.min(minX, y[2 * i]);
      maxX = Math.max(maxX, y[2 * i]);
      minY = Math.min(minY, y[2 * i + 1]);
      maxY = Math.max(maxY, y[2 * i + 1]);
    }
    const w = Math.max(maxX - minX, maxY - minY, 1e-12) * (1 + 1e-9);
    this.node(minX, minY, w);
    for (let i = 0; i < n; i++) this.insert(i, y[2 * i], y[2 * i + 1]);
  }

  node(x0: number, y0: number, w: number): number {
    this.sumX.push(0);
    this.sumY.push(0);
    this.count.push(0);
    this.x0.push(x0);
    this.y0.push(y0);
    this.width.push(w);
    this.child.push(-1);
    this.point.push(-1);
    return this.count.length - 1;
  }

  quadrant(node: number, px: number, py: number): number {
    const h = this.width[node] / 2;
    return this.child[node] + (px >= this.x0[node] + h ? 1 : 0) + (py >= this.y0[node] + h ? 2 : 0);
  }

  insert(i: number, px: number, py: number): void {
    let node = 0;
    for (let depth = 0; ; depth++) {
      this.sumX[node] += px;
      this.sumY[node] += py;
      this.count[node]++;
      if (this.child[node] < 0) {
        if (this.count[node] === 1) {
          this.point[node] = i;
          return;
        }
        // Coinciding points stop splitting at depth 48: the leaf then aggregates them.
        if (depth >= 48) return;
        const h = this.width[node] / 2;
        const first = this.node(this.x0[node], this.y0[node], h);
        this.node(this.x0[node] + h, this.y0[node], h);
        this.node(this.x0[node], this.y0[node] + h, h);
        this.node(this.x0[node] + h, this.y0[node] + h, h);
        this.child[node] = first;
        const old = this.point[node];
        this.point[node] = -1;
        const ox = (this.sumX[node] - px) / (this.count[node] - 1);
        const oy = (this.sumY[node] - py) / (this.count[node] - 1);
        const c = this.quadrant(node, ox, oy);
        this.sumX[c] += ox;
        this.sumY[c] += oy;
        this.count[c] += this.count[node] - 1;
        this.point[c] = old;
      }
      node = this.quadrant(node, px, py);
    }
  }

  /** Adds the repulsion on point i: sum over j of w_ij^2 (y_i - y_j) into f; returns sum over j of w_ij. */
  repulsion(i: number, px: number, py: number, theta2: number, f: Float64Array): number {
    let z = 0;
    let fx = 0;
    let fy = 0;
    const stack = [0];
    while (stack.length > 0) {
      const node = stack.pop()!;
      const cnt = this.count[node];
      if (cnt === 0) continue;
      const leaf = this.child[node] < 0;
      if (leaf && this.point[node] === i && cnt === 1) continue;
      const dx = px - this.sumX[node] / cnt;
      const dy = py - this.sumY[node] / cnt;
      const d2 = dx * dx + dy * dy;
      const w = this.width[node];
      if (leaf || w * w < theta2 * d2) {
        const others = leaf && this.point[node] === i ? cnt - 1 : cnt;
        const q = 1 / (1 + d2);
        z += others * q;
        fx += others * q * q * dx;
        fy += others * q * q * dy;
      } else {
        const c = this.child[node];
        stack.push(c, c + 1, c + 2, c + 3);
      }
    }
    f[0] = fx;
    f[1] = fy;
    return z;
  }
}

/** A finite number > 0, else a RangeError naming the option. */
function positive(name: string, v: number): number {
  if (typeof v !== "number" || !Number.isFinite(v) || v <= 0)
    throw new RangeError(`${name}: expected a finite number > 0, got ${v}`);
  return v;
}

/**
 * t-SNE to 2-D (van der Maaten and Hinton 2008; Barnes-Hut, van der Maaten 2014): rows x 2 coordinates.
 * Optimisation as the reference implementation: momentum 0.5 then 0.8, early exaggeration for 250
 * iterations, per-parameter gains. Deterministic for a seed (the PCA start needs none).
 */
export async function tsne(rows: Float32Array, dim: number, optionsArg?: TsneOptions): Promise<Float64Array> {
  const options = checkOptions(optionsArg, "tsne options", TSNE_KEYS);
  checkFloat32("rows", rows);
  checkInteger("dim", dim, 1);
  const n = rowCount("rows", rows, dim);
  if (n < 4) throw new RangeError(`rows: t-SNE needs at least 4 rows, got ${n}`);
  // Below 1 the neighbour count (3 x perplexity) rounds to 0.
  if (options.perplexity !== undefined && !(options.perplexity >= 1))
    throw new RangeError(`perplexity: expected a number >= 1, got ${options.perplexity}`);
  const perplexity = Math.min(options.perplexity ?? 30, (n - 1) / 3);
  const iterations = checkInteger("iterations", options.iterations ?? 1000, 1);
  const exaggeration = positive("earlyExaggeration", options.earlyExaggeration ?? 12);
  const theta = options.theta ?? 0.5;
  if (typeof theta !== "number" || !(theta >= 0 && theta <= 1))
    throw new RangeError(`theta: expected a number from 0 to 1, got ${theta}`);
  const lr =
    options.learningRate === undefined || options.learningRate === "auto"
      ? Math.max(n / exaggeration / 4, 50)
      : positive("learningRate", options.learningRate);
  const init = options.init ?? "pca";
  if (init !== "pca" && init !== "random")
    throw new TypeError(`init: expected "pca" or "random", got ${JSON.stringify(init)}`);
  const threads = analysisThreads(options.threads);
  const k = Math.min(n - 1, Math.floor(3 * perplexity));
  const nn = await exactNeighbors(rows, dim, k, threads);
  const P = tsneAffinities(nn.indices, nn.distances, n, k, perplexity);
  const Y = new Float64Array(2 * n);
  if (init === "pca") {
    // One-dimensional rows have one component: the second coordinate starts as "random" would.
    const c = Math.min(2, dim);
    const { projection } = await pca(rows, dim, { components: c, seed: options.seed, threads });
    let m = 0;
    for (let i = 0; i < n; i++) m += projection[c * i];
    m /= n;
    let sd = 0;
    for (let i = 0; i < n; i++) sd += (projection[c * i] - m) ** 2;
    sd = Math.sqrt(sd / n);
    const scale = sd > 0 ? 1e-4 / sd : 1;
    const rng = new Rng(options.seed ?? 0);
    for (let i = 0; i < n; i++) {
      Y[2 * i] = projection[c * i] * scale;
      Y[2 * i + 1] = c === 2 ? projection[2 * i + 1] * scale : 1e-4 * rng.normal();
    }
  } else {
    const rng = new Rng(options.seed ?? 0);
    for (let i = 0; i < 2 * n; i++) Y[i] = 1e-4 * rng.normal();
  }
  const update = new Float64Array(2 * n);
  const gains = new Float64Array(2 * n).fill(1);
  const grad = new Float64Array(2 * n);
  const rep = new Float64Array(2 * n);
  const f = new Float64Array(2);
  const stopExaggeration = Math.min(250, iterations);
  for (let it = 0; it < iterations; it++) {
    const exag = it < stopExaggeration ? exaggeration : 1;
    const momentum = it < stopExaggeration ? 0.5 : 0.8;
    const tree = new QuadTree(Y, n);
    let Z = 0;
    for (let i = 0; i < n; i++) {
      Z += tree.repulsion(i, Y[2 * i], Y[2 * i + 1], theta * theta, f);
      rep[2 * i] = f[0];
      rep[2 * i + 1] = f[1];
    }
    for (let i = 0; i < n; i++) {
      let ax = 0;
      let ay = 0;
      for (let o = P.rowStart[i]; o < P.rowStart[i + 1]; o++) {
        const j = P.cols[o];
        const dx = Y[2 * i] - Y[2 * j];
        const dy = Y[2 * i + 1] - Y[2 * j + 1];
        const q = P.vals[o] / (1 + dx * dx + dy * dy);
        ax += q * dx;
        ay += q * dy;
      }
      grad[2 * i] = 4 * (exag * ax - rep[2 * i] / Z);
      grad[2 * i + 1] = 4 * (exag * ay - rep[2 * i + 1] / Z);
    }
    for (let c = 0; c < 2 * n; c++) {
      gains[c] =
        Math.sign(grad[c]) !== Math.sign(update[c]) ? gains[c] + 0.2 : Math.max(0.01, gains[c] * 0.8);
      update[c] = momentum * update[c] - lr * gains[c] * grad[c];
      Y[c] += update[c];
    }
    let mx = 0;
    let my = 0;
    for (let i = 0; i < n; i++) {
      mx += Y[2 * i];
      my += Y[2 * i + 1];
    }
    for (let i = 0; i < n; i++) {
      Y[2 * i] -= mx / n;
      Y[2 * i + 1] -= my / n;
    }
    options.onIteration?.(it + 1, iterations);
  }
  return Y;
}

// ---------------------------------------------------------------------------------------------------------
// UMAP

export interface UmapOptions {
  /** Neighbours of the fuzzy graph, the point itself included (default 15, at most n - 1). */
  neighbors?: number;
  minDist?: number;
  spread?: number;
  /** Optimisation epochs (default umap-js's: 500 below 10,000 points, 200 above). */
  epochs?: number;
  seed?: number;
  threads?: number;
}

const UMAP_KEYS = {
  neighbors: true,
  minDist: true,
  spread: true,
  epochs: true,
  seed: true,
  threads: true,
} satisfies OptionKeys<UmapOptions>;

/** UMAP to 2-D with umap-js on exact neighbours; deterministic for a seed. rows x 2 coordinates. */
export async function umap(rows: Float32Array, dim: number, optionsArg?: UmapOptions): Promise<Float64Array> {
  const options = checkOptions(optionsArg, "umap options", UMAP_KEYS);
  checkFloat32("rows", rows);
  checkInteger("dim", dim, 1);
  const n = rowCount("rows", rows, dim);
  if (n < 3) throw new RangeError(`rows: UMAP needs at least 3 rows, got ${n}`);
  const neighbors = Math.min(checkInteger("neighbors", options.neighbors ?? 15, 2), n - 1);
  const nn = await exactNeighbors(rows, dim, neighbors - 1, options.threads);
  // umap-js expects each point's own index first, at distance 0 (as umap-learn's kNN graph).
  const knnIndices: number[][] = [];
  const knnDistances: number[][] = [];
  for (let i = 0; i < n; i++) {
    knnIndices.push([i, ...nn.indices.subarray(i * (neighbors - 1), (i + 1) * (neighbors - 1))]);
    knnDistances.push([0, ...nn.distances.subarray(i * (neighbors - 1), (i + 1) * (neighbors - 1))]);
  }
  // umap-js loops until its epoch counter equals nEpochs (2.5 or Infinity: forever, on the main thread),
  // takes 0 or a negative count as its default, and fits a degenerate curve for spread <= 0 or
  // minDist > spread: all refused here.
  const spread = positive("spread", options.spread ?? 1);
  const minDist = options.minDist ?? 0.1;
  if (typeof minDist !== "number" || !(minDist >= 0 && minDist <= spread))
    throw new RangeError(`minDist: expected a number from 0 to spread (${spread}), got ${minDist}`);
  const epochs = options.epochs === undefined ? undefined : checkInteger("epochs", options.epochs, 1, 1e6);
  const rng = new Rng(options.seed ?? 0);
  const model = new UMAP({
    nComponents: 2,
    nNeighbors: neighbors,
    minDist,
    spread,
    nEpochs: epochs,
    random: () => rng.uniform(),
  });
  model.setPrecomputedKNN(knnIndices, knnDistances);
  const data: number[][] = [];
  for (let i = 0; i < n; i++) data.push(Array.from(rows.subarray(i * dim, (i + 1) * dim)));
  const embedding = model.fit(data);
  const out = new Float64Array(2 * n);
  embedding.forEach((p, i) => {
    out[2 * i] = p[0];
    out[2 * i + 1] = p[1];
  });
  return out;
}
