// Collapse metrics (Lester et al. 2021, section 7; the paper's divergence analysis): do prompt vectors drift
// onto ordinary token embeddings? collapseReport() compares vectors against a reference set: a model's token
// embeddings, any vocabulary matrix, or a set of dataset activations (the same metrics "in activation space").
//
// Everything heavy is native and asynchronous: the exact neighbour search (lib/knn.ts), the reference's own
// nearest-neighbour distribution (a self-search), the Gaussian fit (covariance + Cholesky), Mahalanobis
// distances, the divergence and the spectrum. A CollapseReference holds all of that and can be reused for
// thousands of reports over a training run; collapseReport(vectors, source) builds one and disposes it.
import {
  checkFiniteRows,
  checkFloat32,
  checkInteger,
  describeValue,
  type KnnBackendChoice,
  rowCount,
  VocabIndex,
} from "./knn.js";
import { addon } from "./native.js";
import {
  chiSquareLogSurvival,
  effectiveRank,
  percentileRank,
  quantile,
  sampleWithoutReplacement,
} from "./stats.js";
import { checkOptions, type OptionKeys } from "./validate.js";

export interface TokenDecoder {
  decode(ids: number[]): string;
  /**
   * The token of an id, undefined for an id the tokenizer does not have (a model's embedding may have more
   * rows, e.g. padded to a multiple of 64: those rows are reported without a token). Without it every id is
   * decoded.
   */
  idToToken?(id: number): string | undefined;
}

/** A loaded model, duck-typed: lib/model.ts's Model satisfies it. */
export interface ModelLike {
  tokenEmbeddings(): Float32Array;
  config: { hiddenSize: number; vocabSize: number };
  /** null or absent: no tokenizer (token strings are then null). */
  tokenizer?: TokenDecoder | null;
}

/** A matrix of reference rows: vocabulary embeddings, or dataset activations (then no tokenizer). */
export interface VectorSetSource {
  vocab: Float32Array;
  dim: number;
  tokenizer?: TokenDecoder;
}

export type CollapseSource = ModelLike | VectorSetSource | CollapseReference;

export interface CollapseReferenceOptions {
  /** Metric that defines "nearest" (default "cosine", as Lester et al.). Both cosine and L2 are reported. */
  metric?: "cosine" | "l2";
  backend?: KnnBackendChoice;
  threads?: number;
  /** Reference rows whose own nearest neighbour forms the baseline distribution (default 4096, or "all"). */
  neighborSample?: number | "all";
  /** Reference rows the Gaussian is fitted to (default "all"). */
  gaussianSample?: number | "all";
  /**
   * Ridge added to the covariance, relative to its mean variance: Sigma + jitter * (trace / d) I (default
   * 1e-3). The paper adds 1e-3 I when N < d; scaling by the mean variance makes it independent of the units.
   */
  covarianceJitter?: number;
  /** M, the number of random reference rows in the paper's divergence (default 1000). */
  divergenceRows?: number;
  /** Seed of every random sample (default 0). */
  seed?: number;
}

const REFERENCE_KEYS = {
  metric: true,
  backend: true,
  threads: true,
  neighborSample: true,
  gaussianSample: true,
  covarianceJitter: true,
  divergenceRows: true,
  seed: true,
} satisfies OptionKeys<CollapseReferenceOptions>;

export interface CollapseReportOptions {
  /** Nearest reference rows listed per vector (default 5, or every row of a smaller reference). */
  k?: number;
  /**
   * A vector counts as collapsed when its nearest-neighbour cosine similarity is at least the
   * `collapseQuantile` quantile of the reference rows' own nearest-neighbour similarities (default 0.05:
   * at least as similar to its nearest row as the 5% of rows least similar to their own nearest row are,
   * i.e. inside the range that 95% of rows occupy) ...
   */
  collapseQuantile?: number;
  /** ... or at least this absolute cosine similarity, when given (overrides the quantile). */
  collapseThreshold?: number;
  /** Energy share for the effective rank (default 0.95, as the paper's notebooks). */
  energy?: number;
  /** Include the per-dimension standard deviations (default true; a dim-long array). */
  perDimensionSpread?: boolean;
}

const REPORT_KEYS = {
  k: true,
  collapseQuantile: true,
  collapseThreshold: true,
  energy: true,
  perDimensionSpread: true,
} satisfies OptionKeys<CollapseReportOptions>;

const COLLAPSE_REPORT_KEYS = { ...REFERENCE_KEYS, ...REPORT_KEYS } satisfies OptionKeys<
  CollapseReferenceOptions & CollapseReportOptions
>;

export interface NeighborEntry {
  id: number;
  /** Decoded token string (null without a tokenizer, or for a row past the tokenizer's vocabulary). */
  token: string | null;
  cosine: number;
  l2: number;
}

export interface VectorReport {
  index: number;
  norm: number;
  /** The k nearest reference rows by the reference's metric, nearest first. */
  nearest: NeighborEntry[];
  /**
   * Percentile (0..100, mid-rank) of this vector's nearest-neighbour distance (cosine distance 1 - cos, and L2)
   * among the reference rows' own nearest-neighbour distances: low means closer to a reference row than
   * reference rows typically are to each other. "Nearest" is by the reference's metric on both sides: with
   * the default cosine metric the L2 figure is the L2 distance to the cosine-nearest row (of the vector, and
   * of each reference row), not the smallest L2 distance.
   */
  nearestDistancePercentile: { cosine: number; l2: number };
  /** Mahalanobis distance under the Gaussian fitted to the reference (regularised covariance). */
  mahalanobis: number;
  /** ln P(chi2_d > mahalanobis^2): the Gaussian's tail probability, in logs (it underflows quickly). */
  chiSquareLogTail: number;
  chiSquareTail: number;
  /** The paper's divergence: mean L2 distance to M random reference rows (seeded). */
  divergence: number;
  collapsed: boolean;
}

export interface CollapseReport {
  version: 1;
  dim: number;
  count: number;
  reference: ReferenceSummary;
  vectors: VectorReport[];
  aggregate: {
    collapseRate: number;
    collapsedCount: number;
    collapseThreshold: { cosine: number; rule: "quantile" | "absolute"; quantile: number | null };
    meanNearestCosine: number;
    meanNearestL2: number;
    effectiveRank: number;
    energy: number;
    singularValues: number[];
    spread: { meanStd: number; perDimensionStd: number[] | null };
    meanPairwiseCosine: number | null;
    meanNorm: number;
    meanDivergence: number;
    meanMahalanobis: number;
    /**
     * Nearest token per vector, decoded together (the "projected prompt"); null without a tokenizer. A row
     * past the tokenizer's vocabulary shows as "[id N]".
     */
    projectedPrompt: string | null;
    projectedTokenIds: number[];
  };
}

export interface ReferenceSummary {
  rows: number;
  dim: number;
  metric: "cosine" | "l2";
  backend: "cpu" | "cuda";
  hasTokenizer: boolean;
  neighborSampleRows: number;
  /**
   * Quantiles of the reference rows' own nearest-neighbour cosine similarity and L2 distance, the
   * neighbour found by the reference's metric (with cosine, the L2 figure is to the cosine-nearest row).
   */
  nearestCosineQuantiles: { q05: number; q50: number; q95: number };
  nearestL2Quantiles: { q05: number; q50: number; q95: number };
  gaussian: { rows: number; ridge: number; meanVariance: number; logDet: number };
  divergenceRows: number;
  /**
   * The divergence of M other random reference rows against the same M rows (the paper's 1.31 baseline);
   * a reference of fewer than 2M rows uses the M rows themselves, each row's distance to itself left out.
   */
  referenceDivergence: number;
  seed: number;
}

function isModelLike(s: unknown): s is ModelLike {
  return (
    typeof s === "object" &&
    s !== null &&
    typeof (s as ModelLike).tokenEmbeddings === "function" &&
    typeof (s as ModelLike).config === "object"
  );
}

function cosineAndL2(
  a: Float32Array,
  ai: number,
  b: Float32Array,
  bi: number,
  dim: number,
): [number, number] {
  let dot = 0;
  let aa = 0;
  let bb = 0;
  let d2 = 0;
  const ao = ai * dim;
  const bo = bi * dim;
  for (let t = 0; t < dim; t++) {
    const x = a[ao + t];
    const y = b[bo + t];
    dot += x * y;
    aa += x * x;
    bb += y * y;
    d2 += (x - y) * (x - y);
  }
  const cos = aa === 0 || bb === 0 ? 0 : dot / Math.sqrt(aa * bb);
  return [cos, Math.sqrt(d2)];
}

function sampleSize(name: string, value: number | "all" | undefined, fallback: number | "all", rows: number) {
  const v = value ?? fallback;
  if (v === "all") return rows;
  return Math.min(rows, checkInteger(name, v, 1));
}

function optionalNumber(name: string, value: unknown, fallback: number, min: number, max: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < min || value > max)
    throw new RangeError(`${name}: expected a number from ${min} to ${max}, got ${describeValue(value)}`);
  return value;
}

/**
 * Decoding for reports: ids past the tokenizer's vocabulary (rows a model's embedding has beyond it) have no
 * token, and in the projected prompt they show as "[id N]" between the decoded runs of the others (a
 * tokenizer decodes them to nothing, which hid that a vector's nearest row is such a row).
 */
function projectedText(tokenizer: TokenDecoder) {
  const known = (id: number) => !tokenizer.idToToken || tokenizer.idToToken(id) !== undefined;
  return {
    token: (id: number) => (known(id) ? tokenizer.decode([id]) : null),
    text(ids: number[]): string {
      let out = "";
      let run: number[] = [];
      for (const id of ids) {
        if (known(id)) run.push(id);
        else {
          out += `${run.length > 0 ? tokenizer.decode(run) : ""}[id ${id}]`;
          run = [];
        }
      }
      return out + (run.length > 0 ? tokenizer.decode(run) : "");
    },
  };
}

// Rows of the index gathered per call of rowsAt() when the reference's own nearest-neighbour pairs are scored:
// bounds the copies (64 MB at dim 2048) when neighborSample is "all".
const PAIR_CHUNK_ROWS = 4096;

/** A reference's settings, checked against the source's row count before the index is built. */
function referenceSettings(options: CollapseReferenceOptions, rows: number) {
  const metric = options.metric ?? "cosine";
  if (metric !== "cosine" && metric !== "l2")
    throw new TypeError(`metric: expected "cosine" or "l2", got ${describeValue(metric)}`);
  return {
    metric,
    seed: options.seed === undefined ? 0 : checkInteger("seed", options.seed, 0, 2 ** 32 - 1),
    jitter: optionalNumber("covarianceJitter", options.covarianceJitter, 1e-3, 0, 1e6),
    neighborRows: sampleSize("neighborSample", options.neighborSample, 4096, rows),
    gaussianRows: sampleSize("gaussianSample", options.gaussianSample, "all", rows),
    divergenceCount: sampleSize("divergenceRows", options.divergenceRows, 1000, rows),
  };
}

/**
 * The checked source, its settings and the index over its rows. A model's tokenEmbeddings() copy is
 * unreachable once this returns: the index holds the rows from then on.
 */
async function sourceIndex(source: ModelLike | VectorSetSource, options: CollapseReferenceOptions) {
  let vocab: Float32Array;
  let dim: number;
  let tokenizer: TokenDecoder | undefined;
  if (isModelLike(source)) {
    dim = checkInteger("source.config.hiddenSize", source.config.hiddenSize, 1);
    vocab = checkFloat32("source.tokenEmbeddings()", source.tokenEmbeddings());
    const expected = source.config.vocabSize * dim;
    if (vocab.length !== expected)
      throw new RangeError(
        `source.tokenEmbeddings(): expected vocabSize x hiddenSize = ${expected} elements, got ${vocab.length}`,
      );
    tokenizer = source.tokenizer ?? undefined;
  } else if (typeof source === "object" && source !== null && "vocab" in source) {
    vocab = checkFloat32("source.vocab", source.vocab);
    dim = checkInteger("source.dim", source.dim, 1);
    tokenizer = source.tokenizer;
  } else {
    throw new TypeError(
      `source: expected a loaded model, a { vocab, dim } object or a CollapseReference, got ${describeValue(source)}`,
    );
  }
  if (tokenizer !== undefined && typeof tokenizer.decode !== "function")
    throw new TypeError(
      `source.tokenizer: expected an object with decode(ids), got ${describeValue(tokenizer)}`,
    );
  const rows = rowCount("source.vocab", vocab, dim);
  if (rows < 2) throw new RangeError("source.vocab: the reference needs at least 2 rows");
  const settings = referenceSettings(options, rows);
  const index = await VocabIndex.create(vocab, {
    dim,
    metric: settings.metric,
    backend: options.backend ?? "auto",
    threads: options.threads,
  });
  return { index, tokenizer, settings };
}

/**
 * The reference side of the collapse metrics, computed once: index, neighbour baseline, Gaussian, divergence
 * rows. The reference keeps no JS copy of the source's rows: reported cosine and L2 values are computed from
 * the index's own copy, so a { vocab, dim } source's array may change once create() has resolved.
 */
export class CollapseReference {
  readonly summary: ReferenceSummary;
  readonly dim: number;
  readonly tokenizer: TokenDecoder | undefined;
  #index: VocabIndex | undefined;
  #reportsInFlight = 0;
  readonly #nearestCos: Float64Array; // ascending
  readonly #nearestCosDistance: Float64Array; // ascending 1 - cos
  readonly #nearestL2: Float64Array; // ascending
  readonly #mean: Float64Array;
  readonly #cholesky: Float64Array;
  readonly #divergenceRows: Float32Array;
  readonly #threads: number;

  private constructor(init: {
    summary: ReferenceSummary;
    tokenizer: TokenDecoder | undefined;
    index: VocabIndex;
    nearestCos: Float64Array;
    nearestL2: Float64Array;
    mean: Float64Array;
    cholesky: Float64Array;
    divergenceRows: Float32Array;
    threads: number;
  }) {
    this.summary = init.summary;
    this.dim = init.summary.dim;
    this.tokenizer = init.tokenizer;
    this.#index = init.index;
    this.#nearestCos = init.nearestCos;
    this.#nearestCosDistance = Float64Array.from(init.nearestCos, (c) => 1 - c).sort();
    this.#nearestL2 = init.nearestL2;
    this.#mean = init.mean;
    this.#cholesky = init.cholesky;
    this.#divergenceRows = init.divergenceRows;
    this.#threads = init.threads;
  }

  static async create(
    source: ModelLike | VectorSetSource,
    optionsArg?: CollapseReferenceOptions,
  ): Promise<CollapseReference> {
    const options = checkOptions(optionsArg, "CollapseReference options", REFERENCE_KEYS);
    const { index, tokenizer, settings } = await sourceIndex(source, options);
    try {
      const { metric, seed, jitter, neighborRows, gaussianRows, divergenceCount } = settings;
      const { rows, dim, threads } = index;
      // The reference's own nearest-neighbour distribution (each sampled row's nearest *other* row), scored
      // from rows of the index, chunk by chunk.
      const sampled =
        neighborRows === rows ? undefined : sampleWithoutReplacement(rows, neighborRows, seed).sort();
      const self = await index.selfSearch({ k: 1, rows: sampled });
      const nearestCos = new Float64Array(self.count);
      const nearestL2 = new Float64Array(self.count);
      for (let start = 0; start < self.count; start += PAIR_CHUNK_ROWS) {
        const end = Math.min(self.count, start + PAIR_CHUNK_ROWS);
        const own = new Int32Array(end - start);
        for (let i = start; i < end; i++) own[i - start] = sampled ? sampled[i] : i;
        const a = index.rowsAt(own);
        const b = index.rowsAt(self.indices.subarray(start, end));
        for (let i = start; i < end; i++)
          [nearestCos[i], nearestL2[i]] = cosineAndL2(a, i - start, b, i - start, dim);
      }
      nearestCos.sort();
      nearestL2.sort();
      // Gaussian fit: all rows are read in place from the index (no copy of the vocabulary).
      const fit =
        gaussianRows === rows
          ? await index.fitGaussian({ ridgeRelative: jitter }, threads)
          : await addon().priorGaussianFit(
              index.rowsAt(sampleWithoutReplacement(rows, gaussianRows, seed + 1)),
              dim,
              { ridgeRelative: jitter },
              threads,
            );
      // Divergence rows, and the reference's own divergence against them: from M other rows where the
      // reference has 2M (one draw, split), else from the divergence rows themselves with each row's zero
      // distance to itself left out of its mean (a prompt vector has no such zero term).
      const drawn = sampleWithoutReplacement(rows, Math.min(rows, 2 * divergenceCount), seed + 2);
      const divergenceRows = index.rowsAt(drawn.subarray(0, divergenceCount));
      const disjoint = drawn.length >= 2 * divergenceCount;
      const others = disjoint ? index.rowsAt(drawn.subarray(divergenceCount)) : divergenceRows;
      const own = await addon().meanDistances(others, divergenceRows, dim, threads);
      if (!disjoint) for (let i = 0; i < own.length; i++) own[i] *= divergenceCount / (divergenceCount - 1);
      const q = (a: Float64Array) => ({
        q05: quantile(a, 0.05),
        q50: quantile(a, 0.5),
        q95: quantile(a, 0.95),
      });
      return new CollapseReference({
        summary: {
          rows,
          dim,
          metric,
          backend: index.backend,
          hasTokenizer: tokenizer !== undefined,
          neighborSampleRows: self.count,
          nearestCosineQuantiles: q(nearestCos),
          nearestL2Quantiles: q(nearestL2),
          gaussian: {
            rows: gaussianRows,
            ridge: fit.ridge,
            meanVariance: fit.meanVariance,
            logDet: fit.logDet,
          },
          divergenceRows: divergenceCount,
          referenceDivergence: own.reduce((s, v) => s + v, 0) / own.length,
          seed,
        },
        tokenizer,
        index,
        nearestCos,
        nearestL2,
        mean: fit.mean,
        cholesky: fit.cholesky,
        divergenceRows,
        threads,
      });
    } catch (e) {
      index.dispose();
      throw e;
    }
  }

  /**
   * The collapse report of `vectors` (count x dim: prompt vectors, or activations) against this reference.
   * A report under way when dispose() is called still completes (the index is freed after it).
   */
  async report(vectorsArg: Float32Array, optionsArg?: CollapseReportOptions): Promise<CollapseReport> {
    const index = this.#index;
    if (!index) throw new Error("CollapseReference is disposed");
    this.#reportsInFlight++;
    try {
      return await this.#report(index, vectorsArg, optionsArg);
    } finally {
      if (--this.#reportsInFlight === 0 && this.#index === undefined) index.dispose();
    }
  }

  async #report(
    index: VocabIndex,
    vectorsArg: Float32Array,
    optionsArg: CollapseReportOptions | undefined,
  ): Promise<CollapseReport> {
    const options = checkOptions(optionsArg, "report options", REPORT_KEYS);
    checkFloat32("promptVectors", vectorsArg);
    const dim = this.dim;
    const count = rowCount("promptVectors", vectorsArg, dim);
    const k =
      options.k === undefined
        ? Math.min(5, this.summary.rows)
        : checkInteger("k", options.k, 1, Math.min(1024, this.summary.rows));
    // Non-finite values are refused here, naming the row and column, before the searches below start
    // together (any of which would otherwise fail first, with its own message).
    checkFiniteRows("promptVectors", vectorsArg, dim);
    // Copied once, after the checks: the caller may change or transfer its array while the searches run.
    const vectors = vectorsArg.slice();
    const energy = optionalNumber("energy", options.energy, 0.95, 0, 1);
    const quantileRule = options.collapseThreshold === undefined;
    const collapseQuantile = optionalNumber("collapseQuantile", options.collapseQuantile, 0.05, 0, 1);
    const threshold = quantileRule
      ? quantile(this.#nearestCos, collapseQuantile)
      : optionalNumber("collapseThreshold", options.collapseThreshold, 0, -1, 1);

    const [found, mahalanobis2, divergence, spectrum] = await Promise.all([
      index.search(vectors, { k }),
      addon().mahalanobisSquared(vectors, dim, this.#mean, this.#cholesky, this.#threads),
      addon().meanDistances(vectors, this.#divergenceRows, dim, this.#threads),
      addon().gramEigenvalues(vectors, dim, this.#threads),
    ]);
    const decode = this.tokenizer ? projectedText(this.tokenizer) : undefined;
    const neighbors = index.rowsAt(found.indices); // row i * k + j: vector i's j-th nearest
    const reports: VectorReport[] = [];
    const norms = new Float64Array(count);
    let collapsedCount = 0;
    let sumCos = 0;
    let sumL2 = 0;
    for (let i = 0; i < count; i++) {
      let n2 = 0;
      for (let t = 0; t < dim; t++) n2 += vectors[i * dim + t] * vectors[i * dim + t];
      norms[i] = Math.sqrt(n2);
      const nearest: NeighborEntry[] = [];
      for (let j = 0; j < k; j++) {
        const id = found.indices[i * k + j];
        const [cosine, l2] = cosineAndL2(vectors, i, neighbors, i * k + j, dim);
        nearest.push({ id, token: decode?.token(id) ?? null, cosine, l2 });
      }
      const m2 = mahalanobis2[i];
      const logTail = chiSquareLogSurvival(m2, dim);
      const collapsed = nearest[0].cosine >= threshold;
      if (collapsed) collapsedCount++;
      sumCos += nearest[0].cosine;
      sumL2 += nearest[0].l2;
      reports.push({
        index: i,
        norm: norms[i],
        nearest,
        nearestDistancePercentile: {
          cosine: percentileRank(this.#nearestCosDistance, 1 - nearest[0].cosine),
          l2: percentileRank(this.#nearestL2, nearest[0].l2),
        },
        mahalanobis: Math.sqrt(m2),
        chiSquareLogTail: logTail,
        chiSquareTail: Math.exp(logTail),
        divergence: divergence[i],
        collapsed,
      });
    }
    // Spread: per-dimension sample standard deviation across the vectors.
    const perDim = new Array<number>(dim).fill(0);
    if (count > 1) {
      for (let t = 0; t < dim; t++) {
        let s = 0;
        for (let i = 0; i < count; i++) s += vectors[i * dim + t];
        const mean = s / count;
        let v = 0;
        for (let i = 0; i < count; i++) v += (vectors[i * dim + t] - mean) ** 2;
        perDim[t] = Math.sqrt(v / (count - 1));
      }
    }
    // Mean pairwise cosine over i < j from the sum of unit vectors: (|sum u|^2 - sum |u|^2) / (n (n - 1)),
    // with zero vectors as zero (their cosine is 0).
    let meanPairwiseCosine: number | null = null;
    if (count > 1) {
      const sum = new Float64Array(dim);
      let self = 0;
      for (let i = 0; i < count; i++) {
        if (norms[i] === 0) continue;
        self += 1;
        for (let t = 0; t < dim; t++) sum[t] += vectors[i * dim + t] / norms[i];
      }
      let s2 = 0;
      for (let t = 0; t < dim; t++) s2 += sum[t] * sum[t];
      meanPairwiseCosine = (s2 - self) / (count * (count - 1));
    }
    const projectedTokenIds = reports.map((r) => r.nearest[0].id);
    const mean = (xs: ArrayLike<number>) => Array.from(xs).reduce((s, v) => s + v, 0) / xs.length;
    return {
      version: 1,
      dim,
      count,
      reference: this.summary,
      vectors: reports,
      aggregate: {
        collapseRate: collapsedCount / count,
        collapsedCount,
        collapseThreshold: {
          cosine: threshold,
          rule: quantileRule ? "quantile" : "absolute",
          quantile: quantileRule ? collapseQuantile : null,
        },
        meanNearestCosine: sumCos / count,
        meanNearestL2: sumL2 / count,
        effectiveRank: effectiveRank(spectrum, energy),
        energy,
        singularValues: Array.from(spectrum, (v) => Math.sqrt(Math.max(0, v))),
        spread: {
          meanStd: mean(perDim),
          perDimensionStd: options.perDimensionSpread === false ? null : perDim,
        },
        meanPairwiseCosine,
        meanNorm: mean(norms),
        meanDivergence: mean(divergence),
        meanMahalanobis: mean(reports.map((r) => r.mahalanobis)),
        projectedPrompt: decode ? decode.text(projectedTokenIds) : null,
        projectedTokenIds,
      },
    };
  }

  /** Frees the index (after the reports under way); later reports throw "CollapseReference is disposed". */
  dispose(): void {
    const index = this.#index;
    this.#index = undefined;
    if (this.#reportsInFlight === 0) index?.dispose();
  }
}

/**
 * Builds a CollapseReference from a source (a model or a vocabulary matrix): the vocabulary's kNN index,
 * neighbour-distance distribution and Gaussian, ready for any number of `report()` calls. See
 * CollapseReport for the fields a report holds.
 */
export async function createCollapseReference(
  source: ModelLike | VectorSetSource,
  options?: CollapseReferenceOptions,
): Promise<CollapseReference> {
  return CollapseReference.create(source, options);
}

/**
 * The full collapse metric suite of `promptVectors` (count x dim) against `source`: a loaded model (its token
 * embeddings and tokenizer), `{ vocab, dim, tokenizer? }` (any vocabulary, or dataset activations), or a
 * CollapseReference (reused: the fast path over a training run). Returns plain JSON.
 */
export async function collapseReport(
  promptVectors: Float32Array,
  source: CollapseSource,
  optionsArg?: CollapseReferenceOptions & CollapseReportOptions,
): Promise<CollapseReport> {
  const options = checkOptions(optionsArg, "collapseReport options", COLLAPSE_REPORT_KEYS);
  const referenceOptions: CollapseReferenceOptions = {};
  const reportOptions: CollapseReportOptions = {};
  for (const [key, value] of Object.entries(options)) {
    if (value === undefined) continue;
    if (Object.hasOwn(REPORT_KEYS, key)) (reportOptions as Record<string, unknown>)[key] = value;
    else (referenceOptions as Record<string, unknown>)[key] = value;
  }
  if (source instanceof CollapseReference) {
    const given = Object.keys(referenceOptions);
    if (given.length > 0)
      throw new TypeError(
        `collapseReport options: ${given.join(", ")} configure a new reference, and the source is a CollapseReference ` +
          "built with its own (pass them to createCollapseReference, or a model or { vocab, dim } as the source)",
      );
    return source.report(promptVectors, reportOptions);
  }
  checkFloat32("promptVectors", promptVectors);
  // Copied now: the reference is built first, and the caller may change its array meanwhile.
  const vectors = promptVectors.slice();
  const reference = await CollapseReference.create(source, referenceOptions);
  try {
    return await reference.report(vectors, reportOptions);
  } finally {
    reference.dispose();
  }
}
