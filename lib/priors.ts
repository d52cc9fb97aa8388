// Priors: the initial distributions of prompt vectors (paper, "Priors"), and the regularisers that keep a
// posterior (the trained prompt) near a chosen region ("controllable posteriors", the paper's future work).
//
// Every prior is built from a plain JSON record by createPrior(record, context) and gives that record back
// from describe(), with every default filled in, so a run directory can rebuild it exactly. Every random
// choice goes through lib/rng.ts's Rng (sampling) or an Rng seeded from the record (which vocabulary rows a
// Gaussian is fitted to), so the same record, context and seed give the same prompt, bit for bit, whatever
// the thread count (on one kind of CPU: the fit's fp32 GEMM differs in the last bits between AVX-512 and
// AVX2). The Gaussian linear algebra is native and float64 (lib/gaussian.ts).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { gunzipSync } from "node:zlib";
import { captureActivations } from "./activations.js";
import { decodeUtf8 } from "./data/loaders.js";
import {
  checkCount,
  type Energy,
  ExclusionPrior,
  fitGaussianPrior,
  GaussianPrior,
  rowsOf,
  standardNormals,
} from "./gaussian.js";
import { checkFiniteRows, defaultThreads, VocabIndex } from "./knn.js";
import type { ForwardOptions, ForwardOutput } from "./model.js";
import { addon } from "./native.js";
import { Rng } from "./rng.js";
import { readTensors } from "./safetensors.js";
import { quantile } from "./stats.js";
import { checkRequiredOptions, type OptionKeys } from "./validate.js";

export { type Energy, ExclusionLaw, ExclusionPrior, GaussianPrior } from "./gaussian.js";

/** A prior as plain JSON: `kind` plus the kind's options (see createPrior). */
export type PriorRecord = { kind: string; [k: string]: unknown };

export interface Prior {
  readonly kind: string;
  /** Length of one prompt vector (the model's hidden size). */
  readonly dim: number;
  /** n vectors, n x dim row-major. */
  sample(n: number, rng: Rng): Float32Array;
  /** Per-row log-density where the prior has one (continuous priors). */
  logProb?(x: Float32Array): Float64Array;
  /** Plain JSON that rebuilds this prior with createPrior (and the same context). */
  describe(): PriorRecord;
  /** Figures about the prior or its sampling so far, e.g. the exclusion prior's acceptance rate. */
  stats?(): Record<string, number>;
  /**
   * Where the prior has a smooth log-density: its negative log-density up to a constant, summed over the rows
   * of x (0.5 (x - mu)^T Sigma^-1 (x - mu) for Gaussians), and its gradient. The prior-nll regulariser.
   */
  energy?(x: Float32Array, gradient: boolean): Energy;
}

/** The prior kinds createPrior builds (the `kind` of a PriorRecord). */
export const PRIOR_KINDS = [
  "gaussian",
  "xavier",
  "uniform",
  "vocab",
  "class-label",
  "fitted-gaussian",
  "exclusion",
  "interpolation",
  "knn",
  "posterior",
] as const;
export type PriorKind = (typeof PRIOR_KINDS)[number];

export interface PriorTokenizer {
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
}

/** What the priors need of a model (lib/model.ts's Model has all of it). */
export interface PriorModel {
  readonly config: { hiddenSize: number; vocabSize: number; numLayers: number; maxPositions: number };
  readonly tokenizer: PriorTokenizer | null;
  readonly threads?: number;
  tokenEmbeddings(): Float32Array;
  forward(options: ForwardOptions): Promise<Pick<ForwardOutput, "hiddenStates">>;
}

export interface PriorContext {
  /** Source of the vocabulary, the tokenizer and activations. */
  model?: PriorModel;
  /** Vector length; defaults to model.config.hiddenSize. */
  dim?: number;
  /** A vocabulary matrix (rows x dim) to use instead of model.tokenEmbeddings(). */
  vocab?: Float32Array;
  /** A tokenizer to use instead of model.tokenizer. */
  tokenizer?: PriorTokenizer;
  /** Reference rows (rows x dim) for a fitted Gaussian with `source: "context"`. */
  activations?: Float32Array;
  /** CPU threads for the native work (default: the model's, else all hardware threads). */
  threads?: number;
  /** Progress messages of slow steps (activations, fits, neighbour searches). */
  onProgress?: (message: string) => void;
}

// ---------------------------------------------------------------------------------------------------------
// Reading records

function shown(v: unknown): string {
  if (v === null) return "null";
  if (v === undefined) return "undefined";
  if (Array.isArray(v)) return `Array(${v.length})`;
  if (ArrayBuffer.isView(v)) return v.constructor.name;
  if (typeof v === "string") return `string "${v}"`;
  if (typeof v === "object") return "object";
  return `${typeof v} ${String(v)}`;
}

/** Typed access to a record's fields, with errors that name the field by its path (e.g. "prior.base.c"). */
class Fields {
  constructor(
    readonly raw: Record<string, unknown>,
    readonly path: string,
    allowed: readonly string[],
  ) {
    for (const key of Object.keys(raw)) {
      if (key !== "kind" && !allowed.includes(key))
        throw new TypeError(
          `${path}.${key}: not an option of a "${String(raw.kind)}" prior (options: ${allowed.join(", ") || "none"})`,
        );
    }
  }

  name(key: string): string {
    return `${this.path}.${key}`;
  }

  has(key: string): boolean {
    return this.raw[key] !== undefined;
  }

  number(
    key: string,
    fallback: number | undefined,
    range: { min?: number; max?: number; above?: number; integer?: boolean } = {},
  ): number {
    const v = this.raw[key] ?? fallback;
    const what = range.integer ? "an integer" : "a finite number";
    const bounds = [
      range.above !== undefined ? `> ${range.above}` : "",
      range.min !== undefined ? `>= ${range.min}` : "",
      range.max !== undefined ? `<= ${range.max}` : "",
    ]
      .filter(Boolean)
      .join(" and ");
    const expected = bounds ? `${what} ${bounds}` : what;
    if (
      typeof v !== "number" ||
      !Number.isFinite(v) ||
      (range.integer && !Number.isInteger(v)) ||
      (range.min !== undefined && v < range.min) ||
      (range.max !== undefined && v > range.max) ||
      (range.above !== undefined && !(v > range.above))
    )
      throw new (typeof v === "number" ? RangeError : TypeError)(
        `${this.name(key)}: expected ${expected}, got ${shown(v)}`,
      );
    return v;
  }

  string<T extends string>(key: string, fallback: T | undefined, choices?: readonly T[]): T {
    const v = this.raw[key] ?? fallback;
    if (typeof v !== "string" || (choices && !choices.includes(v as T)))
      throw new TypeError(
        `${this.name(key)}: expected ${choices ? choices.map((c) => `"${c}"`).join(" or ") : "a string"}, got ${shown(v)}`,
      );
    return v as T;
  }

  boolean(key: string, fallback: boolean): boolean {
    const v = this.raw[key] ?? fallback;
    if (typeof v !== "boolean") throw new TypeError(`${this.name(key)}: expected a boolean, got ${shown(v)}`);
    return v;
  }

  strings(key: string): string[] {
    const v = this.raw[key];
    if (!Array.isArray(v) || v.length === 0 || v.some((s) => typeof s !== "string"))
      throw new TypeError(`${this.name(key)}: expected a non-empty array of strings, got ${shown(v)}`);
    return v as string[];
  }

  record(key: string, fallback?: PriorRecord): PriorRecord {
    const v = this.raw[key] ?? fallback;
    if (
      typeof v !== "object" ||
      v === null ||
      Array.isArray(v) ||
      typeof (v as PriorRecord).kind !== "string"
    )
      throw new TypeError(`${this.name(key)}: expected a prior record { kind, ... }, got ${shown(v)}`);
    return v as PriorRecord;
  }
}

/** Shared, lazily loaded inputs of one createPrior call (nested priors reuse the vocabulary). */
class Resources {
  #vocab: Float32Array | undefined;
  readonly threads: number;

  constructor(readonly context: PriorContext) {
    const t = context.threads ?? context.model?.threads;
    if (t !== undefined && (!Number.isInteger(t) || t < 1))
      throw new RangeError(`context.threads: expected a positive integer, got ${shown(t)}`);
    this.threads = t ?? defaultThreads();
  }

  dim(path: string): number {
    const fromModel = this.context.model?.config.hiddenSize;
    const d = this.context.dim ?? fromModel;
    if (d === undefined)
      throw new TypeError(`${path}: the vector length is unknown; give context.dim or context.model`);
    if (!Number.isInteger(d) || d < 1)
      throw new RangeError(`context.dim: expected a positive integer, got ${d}`);
    if (fromModel !== undefined && d !== fromModel)
      throw new RangeError(`context.dim: ${d} differs from the model's hidden size ${fromModel}`);
    return d;
  }

  vocab(path: string): Float32Array {
    if (this.#vocab) return this.#vocab;
    const d = this.dim(path);
    let v: Float32Array;
    if (this.context.vocab !== undefined) {
      if (!(this.context.vocab instanceof Float32Array))
        throw new TypeError(`context.vocab: expected a Float32Array, got ${shown(this.context.vocab)}`);
      v = this.context.vocab;
      rowsOf("context.vocab", v, d);
    } else if (this.context.model) {
      v = this.context.model.tokenEmbeddings();
      const expected = this.context.model.config.vocabSize * d;
      if (v.length !== expected)
        throw new RangeError(`model.tokenEmbeddings(): expected ${expected} elements, got ${v.length}`);
    } else {
      throw new TypeError(`${path}: needs a vocabulary; give context.model or context.vocab`);
    }
    this.#vocab = v;
    return v;
  }

  tokenizer(path: string): PriorTokenizer {
    const t = this.context.tokenizer ?? this.context.model?.tokenizer ?? undefined;
    if (!t)
      throw new TypeError(`${path}: needs a tokenizer; give context.model (with one) or context.tokenizer`);
    return t;
  }

  model(path: string): PriorModel {
    if (!this.context.model) throw new TypeError(`${path}: needs context.model (to compute activations)`);
    return this.context.model;
  }

  progress(message: string): void {
    this.context.onProgress?.(message);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Simple priors

/** A prior whose rows are i.i.d. U[-a, a] in every coordinate, a possibly depending on the row count. */
class UniformPrior implements Prior {
  constructor(
    readonly kind: "uniform" | "xavier",
    readonly dim: number,
    readonly bound: (rows: number) => number,
    readonly record: PriorRecord,
  ) {}

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const a = this.bound(n);
    const out = new Float32Array(n * this.dim);
    for (let i = 0; i < out.length; i++) out[i] = (2 * rng.uniform() - 1) * a;
    return out;
  }

  logProb(x: Float32Array): Float64Array {
    const n = rowsOf("x", x, this.dim);
    const a = this.bound(n);
    const inside = -this.dim * Math.log(2 * a);
    // Samples are float32: one drawn just inside a may round to fround(a) > a, still inside the support.
    const edge = Math.max(a, Math.fround(a));
    const out = new Float64Array(n);
    for (let r = 0; r < n; r++) {
      out[r] = inside;
      for (let j = 0; j < this.dim; j++)
        if (Math.abs(x[r * this.dim + j]) > edge) {
          out[r] = Number.NEGATIVE_INFINITY;
          break;
        }
    }
    return out;
  }

  describe(): PriorRecord {
    return structuredClone(this.record);
  }
}

/** Rows of a fixed matrix chosen at random: vocabulary-sampled priors (Lester et al. 2021). */
class RowsPrior implements Prior {
  readonly kind = "vocab";
  /** The vocabulary ids of the last sample's rows. */
  lastIds = new Int32Array(0);

  constructor(
    readonly dim: number,
    readonly rows: Float32Array,
    readonly ids: Int32Array,
    readonly replace: boolean,
    readonly record: PriorRecord,
    readonly info: Record<string, number>,
  ) {}

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const m = this.ids.length;
    if (!this.replace && n > m)
      throw new RangeError(
        `n: the vocab prior has ${m} candidate tokens and samples without replacement; asked for ${n} (set replace: true)`,
      );
    const picks = new Int32Array(n);
    if (this.replace) {
      for (let i = 0; i < n; i++) picks[i] = rng.int(m);
    } else {
      // Partial Fisher-Yates over candidate positions: n distinct tokens.
      const pool = new Int32Array(m);
      for (let i = 0; i < m; i++) pool[i] = i;
      for (let i = 0; i < n; i++) {
        const j = i + rng.int(m - i);
        const t = pool[i];
        pool[i] = pool[j];
        pool[j] = t;
        picks[i] = pool[i];
      }
    }
    const d = this.dim;
    const out = new Float32Array(n * d);
    this.lastIds = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      out.set(this.rows.subarray(picks[i] * d, (picks[i] + 1) * d), i * d);
      this.lastIds[i] = this.ids[picks[i]];
    }
    return out;
  }

  describe(): PriorRecord {
    return structuredClone(this.record);
  }

  stats(): Record<string, number> {
    return { ...this.info };
  }
}

/** Label-word embeddings first (mean over each word's sub-tokens), then rows from the fill prior. */
class ClassLabelPrior implements Prior {
  readonly kind = "class-label";
  constructor(
    readonly dim: number,
    readonly labels: Float32Array,
    readonly fill: Prior,
    readonly record: PriorRecord,
    readonly info: Record<string, number>,
  ) {}

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const k = Math.min(n, this.labels.length / this.dim);
    const out = new Float32Array(n * this.dim);
    out.set(this.labels.subarray(0, k * this.dim));
    if (n > k) out.set(this.fill.sample(n - k, rng), k * this.dim);
    return out;
  }

  describe(): PriorRecord {
    return structuredClone(this.record);
  }

  stats(): Record<string, number> {
    return { ...this.info };
  }
}

/**
 * Points at a fixed distance r from randomly chosen vocabulary rows, in a uniformly random direction: r is a
 * percentile of the vocabulary's own distances from a row to its k-th nearest other row, so the draws sit as
 * close to a token as tokens typically sit to each other (or closer, or farther).
 */
class KnnPrior implements Prior {
  readonly kind = "knn";
  /** The vocabulary rows the last sample's points were placed around. */
  lastAnchors = new Int32Array(0);

  constructor(
    readonly dim: number,
    readonly vocab: Float32Array,
    readonly radius: number,
    readonly record: PriorRecord,
    readonly info: Record<string, number>,
  ) {}

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const d = this.dim;
    const rows = this.vocab.length / d;
    const out = new Float32Array(n * d);
    const z = new Float64Array(d);
    this.lastAnchors = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      const anchor = rng.int(rows);
      this.lastAnchors[i] = anchor;
      let norm2 = 0;
      for (let j = 0; j < d; j++) {
        z[j] = rng.normal();
        norm2 += z[j] * z[j];
      }
      const s = this.radius / Math.sqrt(norm2);
      for (let j = 0; j < d; j++) out[i * d + j] = this.vocab[anchor * d + j] + s * z[j];
    }
    return out;
  }

  describe(): PriorRecord {
    return structuredClone(this.record);
  }

  stats(): Record<string, number> {
    return { ...this.info };
  }
}

/** The prompt of an earlier run (its first n vectors), optionally with N(0, noise^2 I) added. */
class PosteriorPrior implements Prior {
  readonly kind = "posterior";
  /** The log-density and energy exist only with noise (without, the prior is a point mass). */
  logProb?: (x: Float32Array) => Float64Array;
  energy?: (x: Float32Array, gradient: boolean) => Energy;
  constructor(
    readonly dim: number,
    readonly vectors: Float32Array,
    readonly noise: number,
    readonly record: PriorRecord,
  ) {
    if (noise > 0) {
      this.logProb = (x) => this.#logProb(x);
      this.energy = (x, gradient) => this.#energy(x, gradient);
    }
  }

  #rows(n: number): number {
    const available = this.vectors.length / this.dim;
    if (n > available)
      throw new RangeError(`n: the posterior holds ${available} prompt vectors; asked for ${n}`);
    return n;
  }

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const out = this.vectors.slice(0, this.#rows(n) * this.dim);
    if (this.noise > 0) for (let i = 0; i < out.length; i++) out[i] += this.noise * rng.normal();
    return out;
  }

  #logProb(x: Float32Array): Float64Array {
    const e = this.#energy(x, false);
    const c = -this.dim * (Math.log(this.noise) + 0.5 * Math.log(2 * Math.PI));
    return e.mahalanobisSquared.map((r2) => c - 0.5 * r2);
  }

  #energy(x: Float32Array, gradient: boolean): Energy {
    const d = this.dim;
    const n = this.#rows(rowsOf("x", x, d));
    const inv = 1 / (this.noise * this.noise);
    const r2 = new Float64Array(n);
    const grad = gradient ? new Float32Array(x.length) : null;
    let value = 0;
    for (let r = 0; r < n; r++) {
      let s = 0;
      for (let j = 0; j < d; j++) {
        const t = x[r * d + j] - this.vectors[r * d + j];
        s += t * t;
        if (grad) grad[r * d + j] = t * inv;
      }
      r2[r] = s * inv;
      value += 0.5 * r2[r];
    }
    return { value, gradient: grad, mahalanobisSquared: r2 };
  }

  describe(): PriorRecord {
    return structuredClone(this.record);
  }
}

/**
 * e = alpha x + (1 - alpha) y with x ~ first, y ~ second (paper: between the activation clusters of a new
 * domain and of pre-training text) and alpha ~ U[0, 1] per row, or fixed. With a fixed alpha and two
 * Gaussians, e is Gaussian, N(alpha mu1 + (1 - alpha) mu2, alpha^2 Sigma1 + (1 - alpha)^2 Sigma2), which gives
 * logProb and energy.
 */
class InterpolationPrior implements Prior {
  readonly kind = "interpolation";
  constructor(
    readonly dim: number,
    readonly first: Prior,
    readonly second: Prior,
    readonly alpha: number | "uniform",
    readonly combined: GaussianPrior | null,
    readonly record: PriorRecord,
  ) {
    if (combined) {
      this.logProb = (x) => combined.logProb(x);
      this.energy = (x, gradient) => combined.energy(x, gradient);
    }
  }

  logProb?: (x: Float32Array) => Float64Array;
  energy?: (x: Float32Array, gradient: boolean) => Energy;

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const x = this.first.sample(n, rng);
    const y = this.second.sample(n, rng);
    const d = this.dim;
    const out = new Float32Array(n * d);
    for (let r = 0; r < n; r++) {
      const a = this.alpha === "uniform" ? rng.uniform() : this.alpha;
      for (let j = r * d; j < (r + 1) * d; j++) out[j] = a * x[j] + (1 - a) * y[j];
    }
    return out;
  }

  /**
   * The exact mean and covariance of e when both ends are Gaussian. With alpha ~ U[0, 1]:
   * E[alpha] = 1/2, E[alpha^2] = E[(1 - alpha)^2] = 1/3, Var(alpha) = 1/12, and
   * Cov(e) = E[alpha^2] S1 + E[(1 - alpha)^2] S2 + Var(alpha) (mu1 - mu2)(mu1 - mu2)^T.
   */
  moments(): { mean: Float64Array; covariance: Float64Array } {
    if (!(this.first instanceof GaussianPrior) || !(this.second instanceof GaussianPrior))
      throw new Error("interpolation prior: moments() needs two Gaussian ends");
    const [ea, ea2, eb2, va] =
      this.alpha === "uniform"
        ? [0.5, 1 / 3, 1 / 3, 1 / 12]
        : [this.alpha, this.alpha ** 2, (1 - this.alpha) ** 2, 0];
    return combineGaussians(this.first, this.second, ea, ea2, eb2, va);
  }

  describe(): PriorRecord {
    return structuredClone(this.record);
  }
}

function combineGaussians(
  a: GaussianPrior,
  b: GaussianPrior,
  meanWeight: number,
  wa: number,
  wb: number,
  meanSpread: number,
): { mean: Float64Array; covariance: Float64Array } {
  const d = a.dim;
  const mean = new Float64Array(d);
  const diff = new Float64Array(d);
  for (let j = 0; j < d; j++) {
    mean[j] = meanWeight * a.mean[j] + (1 - meanWeight) * b.mean[j];
    diff[j] = a.mean[j] - b.mean[j];
  }
  const sa = a.covariance();
  const sb = b.covariance();
  const covariance = new Float64Array(d * d);
  for (let i = 0; i < d; i++)
    for (let j = 0; j < d; j++)
      covariance[i * d + j] = wa * sa[i * d + j] + wb * sb[i * d + j] + meanSpread * diff[i] * diff[j];
  return { mean, covariance };
}

// ---------------------------------------------------------------------------------------------------------
// Data for the fitted priors

/**
 * Texts from a file: `.jsonl` / `.json` (C4 style, one JSON object per line with a "text" field; a JSON array
 * of strings or of such objects also works), optionally gzipped (`.gz`); any other file holds one text per
 * line. Empty texts are skipped.
 */
export function readTexts(file: string): string[] {
  let raw = readFileSync(file);
  let name = file;
  if (name.endsWith(".gz")) {
    raw = gunzipSync(raw);
    name = name.slice(0, -3);
  }
  const text = decodeUtf8(raw, file);
  const fromItem = (item: unknown, where: string): string => {
    if (typeof item === "string") return item;
    if (typeof item === "object" && item !== null && typeof (item as { text?: unknown }).text === "string")
      return (item as { text: string }).text;
    throw new Error(`${file}: ${where} is neither a string nor an object with a "text" string`);
  };
  if (name.endsWith(".json") && text.trimStart().startsWith("[")) {
    const items = JSON.parse(text) as unknown[];
    return items.map((it, i) => fromItem(it, `item ${i}`)).filter((t) => t.length > 0);
  }
  const lines = text.split(/\r?\n/);
  if (name.endsWith(".jsonl") || name.endsWith(".json")) {
    const out: string[] = [];
    lines.forEach((line, i) => {
      if (line.trim() === "") return;
      let item: unknown;
      try {
        item = JSON.parse(line);
      } catch (e) {
        throw new Error(`${file}: line ${i + 1} is not valid JSON (${(e as Error).message})`);
      }
      const t = fromItem(item, `line ${i + 1}`);
      if (t.length > 0) out.push(t);
    });
    return out;
  }
  return lines.filter((l) => l.length > 0);
}

export interface ActivationOptions {
  /** Hidden-state index 0..numLayers in Transformers' output_hidden_states order (0 = the embeddings). */
  layer: number;
  /** "mean": one row per text, the mean over its tokens; "token": one row per token. Padding never counts. */
  pooling?: "mean" | "token";
  /** Tokens per text, longer texts are truncated (default min(128, the model's positions)). */
  maxLength?: number;
  /** Texts per forward pass (default 8); texts are grouped by length so padding stays small. */
  batchSize?: number;
  /** Let the tokenizer add its special tokens (e.g. Llama's BOS), as the model sees text (default true). */
  addSpecialTokens?: boolean;
  onProgress?: (done: number, total: number) => void;
}

const ACTIVATION_KEYS = {
  layer: true,
  pooling: true,
  maxLength: true,
  batchSize: true,
  addSpecialTokens: true,
  onProgress: true,
} satisfies OptionKeys<ActivationOptions>;

/**
 * Hidden states of `model` at one layer over a dataset of texts: rows x hiddenSize, one row per text (mean
 * pooling) or per token (token pooling), in the texts' order. Right padding is masked out. A thin view of
 * lib/activations.ts's captureActivations (one layer, in memory).
 */
export async function datasetActivations(
  model: PriorModel,
  texts: readonly string[],
  options: ActivationOptions,
): Promise<{ rows: Float32Array; count: number; tokens: number }> {
  checkRequiredOptions(options, "datasetActivations options", ACTIVATION_KEYS);
  const c = model.config;
  const layer = options.layer;
  if (!Number.isInteger(layer) || layer < 0 || layer > c.numLayers)
    throw new RangeError(`layer: expected an integer from 0 to ${c.numLayers}, got ${shown(layer)}`);
  const pooling = options.pooling ?? "mean";
  const maxLength = options.maxLength ?? Math.min(128, c.maxPositions);
  if (!Number.isInteger(maxLength) || maxLength < 1 || maxLength > c.maxPositions)
    throw new RangeError(
      `maxLength: expected an integer from 1 to ${c.maxPositions}, got ${shown(maxLength)}`,
    );
  const batchSize = options.batchSize ?? 8;
  if (!Number.isInteger(batchSize) || batchSize < 1)
    throw new RangeError(`batchSize: expected a positive integer, got ${shown(batchSize)}`);
  if (!model.tokenizer) throw new TypeError("model: has no tokenizer (needed to compute activations)");
  if (texts.length === 0) throw new RangeError("texts: expected at least one text");
  texts.forEach((t, i) => {
    if (typeof t !== "string") throw new TypeError(`texts[${i}]: expected a string, got ${shown(t)}`);
  });
  const set = await captureActivations(model, texts, {
    layers: [layer],
    pooling,
    maxLength,
    batchSize,
    chunkTexts: texts.length,
    addSpecialTokens: options.addSpecialTokens ?? true,
    onProgress: options.onProgress ? (p) => options.onProgress!(p.texts, p.total) : undefined,
  });
  const rows = pooling === "token" ? set.tokens(layer) : set.mean(layer);
  return { rows, count: rows.length / c.hiddenSize, tokens: set.index.tokens };
}

/** m distinct indices of [0, n) chosen with `rng`, ascending. */
function chooseRows(n: number, m: number, rng: Rng): Int32Array {
  const pool = new Int32Array(n);
  for (let i = 0; i < n; i++) pool[i] = i;
  for (let i = 0; i < m; i++) {
    const j = i + rng.int(n - i);
    const t = pool[i];
    pool[i] = pool[j];
    pool[j] = t;
  }
  return pool.slice(0, m).sort();
}

function gather(data: Float32Array, dim: number, ids: Int32Array): Float32Array {
  const out = new Float32Array(ids.length * dim);
  for (let i = 0; i < ids.length; i++) out.set(data.subarray(ids[i] * dim, (ids[i] + 1) * dim), i * dim);
  return out;
}

/**
 * The sha256 of a file a prior reads. A record from describe() carries it, and rebuilding the record from a
 * changed file is an error rather than a silently different prior.
 */
function fileDigest(f: Fields, key: string, path: string): string {
  const digest = createHash("sha256").update(readFileSync(path)).digest("hex");
  if (f.has(key) && f.raw[key] !== digest)
    throw new Error(
      `${f.name(key)}: the file ${path} changed since this record was made (sha256 now ${digest})`,
    );
  return digest;
}

function floatTensor(
  path: string,
  wanted: string | undefined,
  label: string,
): { name: string; data: Float32Array; shape: number[] } {
  const { tensors } = readTensors(path);
  let name = wanted;
  if (name === undefined) {
    if (tensors.has("prompt")) name = "prompt";
    else if (tensors.size === 1) name = [...tensors.keys()][0];
    else
      throw new TypeError(
        `${label}.tensor: ${path} holds ${tensors.size} tensors (${[...tensors.keys()].join(", ")}); name one`,
      );
  }
  const t = tensors.get(name);
  if (!t)
    throw new TypeError(
      `${label}.tensor: ${path} has no tensor "${name}" (it has ${[...tensors.keys()].join(", ")})`,
    );
  if (!(t.data instanceof Float32Array || t.data instanceof Float64Array))
    throw new TypeError(`${label}.tensor: "${name}" in ${path} is not a floating-point tensor`);
  return { name, data: t.data instanceof Float32Array ? t.data : Float32Array.from(t.data), shape: t.shape };
}

// ---------------------------------------------------------------------------------------------------------
// Builders

type Builder = (f: Fields, res: Resources) => Promise<Prior>;

async function buildGaussian(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  // Bounded so that draws, their squares and 1 / sigma^2 stay finite in float32 and float64.
  const sigma = f.number("sigma", 0.02, { min: 1e-30, max: 1e30 });
  const m = f.number("mean", 0, { min: -1e30, max: 1e30 });
  return new GaussianPrior({
    kind: "gaussian",
    dim,
    mean: new Float64Array(dim).fill(m),
    sigma,
    cholesky: null,
    covariance: null,
    logDet: 2 * dim * Math.log(sigma),
    record: { kind: "gaussian", sigma, mean: m },
    threads: res.threads,
  });
}

async function buildUniform(f: Fields, res: Resources): Promise<Prior> {
  const range = f.number("range", 0.5, { min: 1e-30, max: 1e30 });
  return new UniformPrior("uniform", res.dim(f.path), () => range, { kind: "uniform", range });
}

async function buildXavier(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  const gain = f.number("gain", 1, { min: 1e-30, max: 1e30 });
  // torch.nn.init.xavier_uniform_ on the P x d prompt tensor: fan_out = P, fan_in = d.
  return new UniformPrior("xavier", dim, (rows) => gain * Math.sqrt(6 / (rows + dim)), {
    kind: "xavier",
    gain,
  });
}

async function buildVocab(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  const vocab = res.vocab(f.path);
  const vocabRows = vocab.length / dim;
  const select = f.string("select", f.has("corpus") || f.has("corpusText") ? "frequent" : "uniform", [
    "frequent",
    "uniform",
  ] as const);
  const replace = f.boolean("replace", false);
  if (select === "uniform") {
    if (f.has("top") || f.has("corpus") || f.has("corpusText"))
      throw new TypeError(`${f.path}: top, corpus and corpusText apply to select "frequent" only`);
    const ids = new Int32Array(vocabRows).map((_, i) => i);
    return new RowsPrior(
      dim,
      vocab,
      ids,
      replace,
      { kind: "vocab", select, replace },
      { candidates: vocabRows },
    );
  }
  const top = f.number("top", 5000, { min: 1, integer: true });
  if (f.has("corpus") === f.has("corpusText"))
    throw new TypeError(`${f.path}: select "frequent" needs exactly one of corpus (a file) or corpusText`);
  const corpus = f.has("corpus") ? resolve(f.string("corpus", undefined)) : undefined;
  const corpusSha256 = corpus ? fileDigest(f, "corpusSha256", corpus) : undefined;
  const texts = corpus ? readTexts(corpus) : [f.string("corpusText", undefined)];
  const tokenizer = res.tokenizer(f.path);
  const counts = new Float64Array(vocabRows);
  let corpusTokens = 0;
  let outside = 0;
  for (const t of texts)
    for (const id of tokenizer.encode(t, { addSpecialTokens: false })) {
      corpusTokens++;
      if (id >= 0 && id < vocabRows) counts[id]++;
      else outside++;
    }
  // Most frequent first; equal counts by the lower id, so the candidate set is exactly reproducible.
  const seen: number[] = [];
  for (let i = 0; i < vocabRows; i++) if (counts[i] > 0) seen.push(i);
  seen.sort((a, b) => counts[b] - counts[a] || a - b);
  const ids = Int32Array.from(seen.slice(0, top));
  if (ids.length === 0) throw new RangeError(`${f.name(corpus ? "corpus" : "corpusText")}: no tokens`);
  const record: PriorRecord = { kind: "vocab", select, top, replace };
  if (corpus) {
    record.corpus = corpus;
    record.corpusSha256 = corpusSha256;
  } else record.corpusText = texts[0];
  return new RowsPrior(dim, gather(vocab, dim, ids), ids, replace, record, {
    candidates: ids.length,
    corpusTokens,
    tokensOutsideVocabulary: outside,
  });
}

async function buildClassLabel(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  const words = f.strings("words");
  const tokenizer = res.tokenizer(f.path);
  const vocab = res.vocab(f.path);
  const vocabRows = vocab.length / dim;
  const labels = new Float32Array(words.length * dim);
  const acc = new Float64Array(dim);
  let subTokens = 0;
  words.forEach((w, i) => {
    const ids = tokenizer.encode(w, { addSpecialTokens: false });
    if (ids.length === 0) throw new RangeError(`${f.name("words")}[${i}]: "${w}" gives no tokens`);
    acc.fill(0);
    for (const id of ids) {
      if (id < 0 || id >= vocabRows)
        throw new RangeError(`${f.name("words")}[${i}]: token ${id} of "${w}" is outside the vocabulary`);
      for (let j = 0; j < dim; j++) acc[j] += vocab[id * dim + j];
    }
    for (let j = 0; j < dim; j++) labels[i * dim + j] = acc[j] / ids.length;
    subTokens += ids.length;
  });
  const fill = await build(f.record("fill", { kind: "vocab", select: "uniform" }), f.name("fill"), res);
  return new ClassLabelPrior(
    dim,
    labels,
    fill,
    { kind: "class-label", words, fill: fill.describe() },
    { labels: words.length, subTokens },
  );
}

const FIT_OPTIONS = ["jitter", "jitterMode", "shrinkage", "rows", "seed"];

async function buildFittedGaussian(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  const source = f.string("source", "vocab", ["vocab", "activations", "tensor", "context"] as const);
  const record: PriorRecord = { kind: "fitted-gaussian", source };
  const allowed: Record<typeof source, string[]> = {
    vocab: [],
    activations: [
      "layer",
      "texts",
      "textsFile",
      "textsSha256",
      "pooling",
      "maxLength",
      "batchSize",
      "addSpecialTokens",
    ],
    tensor: ["path", "tensor", "sha256"],
    context: [],
  };
  for (const key of Object.keys(f.raw))
    if (key !== "kind" && key !== "source" && !FIT_OPTIONS.includes(key) && !allowed[source].includes(key))
      throw new TypeError(`${f.name(key)}: not an option of a fitted Gaussian with source "${source}"`);
  let data: Float32Array;
  if (source === "vocab") {
    data = res.vocab(f.path);
  } else if (source === "context") {
    if (!(res.context.activations instanceof Float32Array))
      throw new TypeError(`${f.path}: source "context" needs context.activations (a Float32Array)`);
    data = res.context.activations;
    rowsOf("context.activations", data, dim);
  } else if (source === "tensor") {
    const path = resolve(f.string("path", undefined));
    const sha256 = fileDigest(f, "sha256", path);
    const t = floatTensor(path, f.has("tensor") ? f.string("tensor", undefined) : undefined, f.path);
    if (t.shape[t.shape.length - 1] !== dim)
      throw new RangeError(
        `${f.name("path")}: tensor "${t.name}" has shape [${t.shape}], expected rows x ${dim}`,
      );
    data = t.data;
    Object.assign(record, { path, tensor: t.name, sha256 });
  } else {
    const model = res.model(f.path);
    const layer = f.number("layer", undefined, { min: 0, max: model.config.numLayers, integer: true });
    if (f.has("texts") === f.has("textsFile"))
      throw new TypeError(`${f.path}: source "activations" needs exactly one of texts or textsFile`);
    const textsFile = f.has("textsFile") ? resolve(f.string("textsFile", undefined)) : undefined;
    const textsSha256 = textsFile ? fileDigest(f, "textsSha256", textsFile) : undefined;
    const texts = textsFile ? readTexts(textsFile) : f.strings("texts");
    const pooling = f.string("pooling", "mean", ["mean", "token"] as const);
    const maxLength = f.number("maxLength", Math.min(128, model.config.maxPositions), {
      min: 1,
      max: model.config.maxPositions,
      integer: true,
    });
    const batchSize = f.number("batchSize", 8, { min: 1, integer: true });
    const addSpecialTokens = f.boolean("addSpecialTokens", true);
    const acts = await datasetActivations(model, texts, {
      layer,
      pooling,
      maxLength,
      batchSize,
      addSpecialTokens,
      onProgress: (done, total) => res.progress(`activations at layer ${layer}: ${done}/${total} texts`),
    });
    data = acts.rows;
    Object.assign(record, { layer, pooling, maxLength, batchSize, addSpecialTokens });
    if (textsFile) Object.assign(record, { textsFile, textsSha256 });
    else record.texts = texts;
  }
  const available = data.length / dim;
  // The paper fitted the vocabulary Gaussian to 20,000 random rows.
  const rowsWanted = f.has("rows")
    ? f.number("rows", undefined, { min: 2, integer: true })
    : source === "vocab"
      ? 20000
      : available;
  const seed = f.number("seed", 0, { min: 0, max: 2 ** 32 - 1, integer: true });
  const rows = Math.min(rowsWanted, available);
  if (rows < 2)
    throw new RangeError(`${f.path}: a Gaussian fit needs at least 2 rows, the source has ${available}`);
  const fitRows = rows === available ? data : gather(data, dim, chooseRows(available, rows, new Rng(seed)));
  // Paper: Sigma + 1e-3 I when N < d. Default: relative to the mean variance (scale-free, as lib/collapse.ts).
  const jitter = f.number("jitter", 1e-3, { min: 0 });
  const jitterMode = f.string("jitterMode", "relative", ["relative", "absolute"] as const);
  const shrinkage = f.number("shrinkage", 0, { min: 0, max: 1 });
  res.progress(`fitting a ${dim}-dimensional Gaussian to ${rows} rows`);
  Object.assign(record, { rows: rowsWanted, seed, jitter, jitterMode, shrinkage });
  return fitGaussianPrior(
    fitRows,
    dim,
    {
      shrinkage,
      ridgeAbsolute: jitterMode === "absolute" ? jitter : 0,
      ridgeRelative: jitterMode === "relative" ? jitter : 0,
    },
    res.threads,
    record,
    (fit) => ({
      fittedRows: rows,
      ridge: fit.ridge,
      meanVariance: fit.meanVariance,
      covarianceSeconds: fit.covarianceSeconds,
      choleskySeconds: fit.choleskySeconds,
    }),
  );
}

async function gaussianPart(f: Fields, key: string, fallback: PriorRecord | undefined, res: Resources) {
  const p = await build(f.record(key, fallback), f.name(key), res);
  if (!(p instanceof GaussianPrior))
    throw new TypeError(`${f.name(key)}: expected a "gaussian" or "fitted-gaussian" prior, got "${p.kind}"`);
  return p;
}

async function buildExclusion(f: Fields, res: Resources): Promise<Prior> {
  const base = await gaussianPart(f, "base", { kind: "fitted-gaussian", source: "vocab" }, res);
  const c = f.number("c", 5, { above: 1 });
  const maxTries = f.number("maxTries", 10000, { min: 1, integer: true });
  return new ExclusionPrior(base, {
    c,
    maxTries,
    record: { kind: "exclusion", c, maxTries, base: base.describe() },
  });
}

async function buildInterpolation(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  const first = await build(f.record("first"), f.name("first"), res);
  const second = await build(f.record("second"), f.name("second"), res);
  const a = f.raw.alpha;
  if (a !== undefined && a !== "uniform" && !(typeof a === "number" && a >= 0 && a <= 1))
    throw new TypeError(`${f.name("alpha")}: expected "uniform" or a number from 0 to 1, got ${shown(a)}`);
  const alpha: number | "uniform" = a === undefined ? "uniform" : (a as number | "uniform");
  let combined: GaussianPrior | null = null;
  if (alpha !== "uniform" && first instanceof GaussianPrior && second instanceof GaussianPrior) {
    const { mean, covariance } = combineGaussians(first, second, alpha, alpha ** 2, (1 - alpha) ** 2, 0);
    const chol = await addon().priorCholesky(covariance, dim, res.threads);
    combined = new GaussianPrior({
      kind: "fitted-gaussian",
      dim,
      mean,
      sigma: null,
      cholesky: chol.cholesky,
      covariance,
      logDet: chol.logDet,
      record: { kind: "interpolation" },
      threads: res.threads,
    });
  }
  return new InterpolationPrior(dim, first, second, alpha, combined, {
    kind: "interpolation",
    alpha,
    first: first.describe(),
    second: second.describe(),
  });
}

async function buildKnn(f: Fields, res: Resources): Promise<Prior> {
  const dim = res.dim(f.path);
  const vocab = res.vocab(f.path);
  const vocabRows = vocab.length / dim;
  const percentile = f.number("percentile", 50, { min: 0, max: 100 });
  const neighbor = f.number("neighbor", 1, { min: 1, max: Math.min(1024, vocabRows - 1), integer: true });
  const sampleRows =
    f.raw.sampleRows === "all" ? vocabRows : f.number("sampleRows", 4096, { min: 1, integer: true });
  const seed = f.number("seed", 0, { min: 0, max: 2 ** 32 - 1, integer: true });
  const m = Math.min(sampleRows, vocabRows);
  res.progress(`nearest-neighbour distances of ${m} vocabulary rows`);
  const index = await VocabIndex.create(vocab, { dim, metric: "l2", backend: "auto", threads: res.threads });
  let distances: Float64Array;
  try {
    const rows = m === vocabRows ? undefined : chooseRows(vocabRows, m, new Rng(seed));
    const found = await index.selfSearch({ k: neighbor, rows });
    distances = new Float64Array(found.count);
    for (let i = 0; i < found.count; i++) distances[i] = found.scores[i * neighbor + neighbor - 1];
  } finally {
    index.dispose();
  }
  distances.sort();
  const radius = quantile(distances, percentile / 100);
  return new KnnPrior(
    dim,
    vocab,
    radius,
    { kind: "knn", percentile, neighbor, sampleRows: f.raw.sampleRows === "all" ? "all" : sampleRows, seed },
    { radius, sampleRows: m, medianDistance: quantile(distances, 0.5) },
  );
}

async function buildPosterior(f: Fields, res: Resources): Promise<Prior> {
  const path = resolve(f.string("path", undefined));
  const sha256 = fileDigest(f, "sha256", path);
  const t = floatTensor(path, f.has("tensor") ? f.string("tensor", undefined) : undefined, f.path);
  const known = res.context.dim ?? res.context.model?.config.hiddenSize;
  const dim = known ?? t.shape[t.shape.length - 1];
  if (t.shape[t.shape.length - 1] !== dim)
    throw new RangeError(`${f.name("path")}: tensor "${t.name}" has shape [${t.shape}], expected P x ${dim}`);
  // A NaN or infinite vector would be copied into every sample and fail only once the prompt is used.
  checkFiniteRows(`${f.name("path")}: tensor "${t.name}"`, t.data, dim);
  const noise = f.number("noise", 0, { min: 0, max: 1e30 });
  if (noise > 0 && noise < 1e-30)
    throw new RangeError(`${f.name("noise")}: expected 0 or a number from 1e-30 to 1e+30, got ${noise}`);
  return new PosteriorPrior(dim, t.data, noise, {
    kind: "posterior",
    path,
    tensor: t.name,
    noise,
    sha256,
  });
}

const BUILDERS: Record<PriorKind, { options: string[]; build: Builder }> = {
  gaussian: { options: ["sigma", "mean"], build: buildGaussian },
  xavier: { options: ["gain"], build: buildXavier },
  uniform: { options: ["range"], build: buildUniform },
  vocab: { options: ["select", "top", "corpus", "corpusText", "replace", "corpusSha256"], build: buildVocab },
  "class-label": { options: ["words", "fill"], build: buildClassLabel },
  "fitted-gaussian": {
    options: [
      "source",
      ...FIT_OPTIONS,
      "layer",
      "texts",
      "textsFile",
      "textsSha256",
      "pooling",
      "maxLength",
      "batchSize",
      "addSpecialTokens",
      "path",
      "tensor",
      "sha256",
    ],
    build: buildFittedGaussian,
  },
  exclusion: { options: ["base", "c", "maxTries"], build: buildExclusion },
  interpolation: { options: ["first", "second", "alpha"], build: buildInterpolation },
  knn: { options: ["percentile", "neighbor", "sampleRows", "seed"], build: buildKnn },
  posterior: { options: ["path", "tensor", "noise", "sha256"], build: buildPosterior },
};

async function build(spec: PriorRecord, path: string, res: Resources): Promise<Prior> {
  if (typeof spec !== "object" || spec === null || Array.isArray(spec))
    throw new TypeError(`${path}: expected a prior record { kind, ... }, got ${shown(spec)}`);
  const entry = BUILDERS[spec.kind as PriorKind];
  if (!entry || !Object.hasOwn(BUILDERS, spec.kind))
    throw new TypeError(
      `${path}.kind: expected one of ${PRIOR_KINDS.map((k) => `"${k}"`).join(", ")}, got ${shown(spec.kind)}`,
    );
  const f = new Fields(spec, path, entry.options);
  return entry.build(f, res);
}

/**
 * Builds a prior from its record. Kinds and options (defaults in brackets; paper, "Priors"):
 * - gaussian: sigma [0.02], mean [0]: N(mean, sigma^2 I).
 * - xavier: gain [1]: U[-a, a], a = gain sqrt(6 / (P + d)) for a P x d prompt (torch's xavier_uniform_).
 * - uniform: range [0.5]: U[-range, range] (Lester et al.'s baseline).
 * - vocab: select ["frequent" with a corpus, else "uniform"], top [5000], corpus (a text file, see readTexts)
 *   or corpusText, replace [false]: rows of the embedding matrix, uniformly from the `top` tokens most
 *   frequent in the corpus (through the model's tokenizer; ties to the lower id) or from the whole vocabulary.
 * - class-label: words, fill [{ kind: "vocab" }]: row i = mean embedding of words[i]'s sub-tokens (the word as
 *   given: include a leading space where the tokenizer marks word starts), remaining rows from `fill`.
 * - fitted-gaussian: N(mu, Sigma), full covariance of reference rows. source ["vocab"]: `rows` [20000] random
 *   vocabulary rows (seed [0]); "activations": hidden states at `layer` over `texts` or `textsFile`, pooling
 *   ["mean": per text | "token"], maxLength [128], batchSize [8], addSpecialTokens [true], padding excluded;
 *   "tensor": rows of a safetensors tensor (path, tensor); "context": context.activations. Regularisation:
 *   Sigma = (1 - shrinkage) S + shrinkage (tr S / d) I + jitter I, jitter [1e-3] "relative" (times tr S / d)
 *   [default] or "absolute" (jitterMode), shrinkage [0].
 * - exclusion: base [fitted-gaussian on the vocabulary], c [5], maxTries [10000 per sample]: see ExclusionLaw.
 * - interpolation: first, second (priors), alpha ["uniform" | a number in [0, 1]]: alpha x + (1 - alpha) y.
 * - knn: percentile [50], neighbor [1], sampleRows [4096 | "all"], seed [0]: a random vocabulary row plus a
 *   random direction times the percentile of the rows' distances to their neighbor-th nearest other row (L2).
 * - posterior: path (safetensors), tensor ["prompt", or the only one], noise [0]: an earlier run's prompt.
 */
export async function createPrior(spec: PriorRecord, context: PriorContext = {}): Promise<Prior> {
  if (typeof context !== "object" || context === null)
    throw new TypeError(`context: expected an object, got ${shown(context)}`);
  return build(spec, "prior", new Resources(context));
}

// ---------------------------------------------------------------------------------------------------------
// Regularisers for controllable posteriors

export type RegularizerKind = "prior-nll" | "l2-init" | "nearest-vocab";
/** The regulariser kinds createRegularizer builds. */
export const REGULARIZER_KINDS: readonly RegularizerKind[] = ["prior-nll", "l2-init", "nearest-vocab"];

export interface RegularizerSpec {
  kind: RegularizerKind;
  [k: string]: unknown;
}

export interface RegularizerContext {
  /** prior-nll: the prior whose negative log-density is the penalty (it must have energy()). */
  prior?: Prior;
  /** l2-init: the initial prompt x0, rows x dim. */
  init?: Float32Array;
  /** nearest-vocab: the vocabulary, rows x dim (copied into the regulariser's index, not kept). */
  vocab?: Float32Array;
  dim: number;
  threads?: number;
}

/**
 * A penalty R(x) on the prompt x (rows x dim), added to the task loss with a weight (the training loop's):
 * - "prior-nll": 0.5 sum_i (x_i - mu)^T Sigma^-1 (x_i - mu), the prior's negative log-density up to its
 *   constant (Gaussian priors, interpolation with a fixed alpha, a posterior with noise); gradient
 *   Sigma^-1 (x_i - mu) by two native triangular solves.
 * - "l2-init": 0.5 |x - x0|^2; gradient x - x0.
 * - "nearest-vocab": 0.5 sum_i |x_i - v(x_i)|^2 with v(x_i) the nearest vocabulary row by exact native L2
 *   search; gradient x_i - v(x_i) (the nearest row is piecewise constant in x).
 * value() and gradient() of the same x share one computation.
 */
export interface Regularizer {
  readonly kind: RegularizerKind;
  value(x: Float32Array): number;
  gradient(x: Float32Array): Float32Array;
  valueAndGradient(x: Float32Array): { value: number; gradient: Float32Array };
  describe(): Record<string, unknown>;
  /** Frees native memory (the nearest-vocab index); later calls throw. Safe to call twice. */
  dispose(): void;
}

class CachedRegularizer implements Regularizer {
  #lastX: Float32Array | null = null;
  #last: { value: number; gradient: Float32Array } | null = null;
  #disposed = false;

  constructor(
    readonly kind: RegularizerKind,
    readonly dim: number,
    readonly compute: (x: Float32Array) => { value: number; gradient: Float32Array },
    readonly record: Record<string, unknown>,
    readonly release: () => void = () => {},
  ) {}

  valueAndGradient(x: Float32Array): { value: number; gradient: Float32Array } {
    if (this.#disposed) throw new Error("Regularizer is disposed");
    rowsOf("x", x, this.dim);
    const last = this.#lastX;
    if (last && this.#last && last.length === x.length && last.every((v, i) => Object.is(v, x[i])))
      return { value: this.#last.value, gradient: this.#last.gradient.slice() };
    const out = this.compute(x);
    this.#lastX = x.slice();
    this.#last = out;
    return { value: out.value, gradient: out.gradient.slice() };
  }

  value(x: Float32Array): number {
    return this.valueAndGradient(x).value;
  }

  gradient(x: Float32Array): Float32Array {
    return this.valueAndGradient(x).gradient;
  }

  describe(): Record<string, unknown> {
    return structuredClone(this.record);
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.release();
  }
}

/**
 * A regulariser of the soft prompt (value and gradient, native): the prior's negative log-density, the L2
 * distance to the initial prompt, or the distance to the nearest vocabulary row. dispose() frees it.
 */
export function createRegularizer(spec: RegularizerSpec, context: RegularizerContext): Regularizer {
  if (typeof spec !== "object" || spec === null)
    throw new TypeError(`regularizer: expected { kind, ... }, got ${shown(spec)}`);
  if (!REGULARIZER_KINDS.includes(spec.kind))
    throw new TypeError(
      `regularizer.kind: expected ${REGULARIZER_KINDS.map((k) => `"${k}"`).join(", ")}, got ${shown(spec.kind)}`,
    );
  for (const key of Object.keys(spec))
    if (key !== "kind")
      throw new TypeError(`regularizer.${key}: not an option of a "${spec.kind}" regularizer`);
  const dim = context?.dim;
  if (!Number.isInteger(dim) || dim < 1)
    throw new RangeError(`context.dim: expected a positive integer, got ${shown(dim)}`);
  const threads = context.threads ?? defaultThreads();

  if (spec.kind === "prior-nll") {
    const prior = context.prior;
    if (!prior || typeof prior.describe !== "function")
      throw new TypeError(`context.prior: expected a Prior (prior-nll needs one), got ${shown(prior)}`);
    if (prior.dim !== dim) throw new RangeError(`context.prior: has dim ${prior.dim}, expected ${dim}`);
    const energy = prior.energy?.bind(prior);
    if (!energy)
      throw new TypeError(
        `context.prior: a "${prior.kind}" prior has no smooth log-density; prior-nll takes a gaussian or fitted-gaussian prior, an interpolation with a fixed alpha, or a posterior with noise`,
      );
    return new CachedRegularizer(
      "prior-nll",
      dim,
      (x) => {
        const e = energy(x, true);
        return { value: e.value, gradient: e.gradient! };
      },
      { kind: "prior-nll", prior: prior.describe() },
    );
  }

  if (spec.kind === "l2-init") {
    const init = context.init;
    if (!(init instanceof Float32Array))
      throw new TypeError(`context.init: expected a Float32Array, got ${shown(init)}`);
    const x0 = init.slice();
    rowsOf("context.init", x0, dim);
    return new CachedRegularizer(
      "l2-init",
      dim,
      (x) => {
        if (x.length !== x0.length)
          throw new RangeError(`x: expected ${x0.length} elements (the initial prompt's), got ${x.length}`);
        const gradient = new Float32Array(x.length);
        let value = 0;
        for (let i = 0; i < x.length; i++) {
          const t = x[i] - x0[i];
          gradient[i] = t;
          value += t * t;
        }
        return { value: 0.5 * value, gradient };
      },
      { kind: "l2-init" },
    );
  }

  const vocab = context.vocab;
  if (!(vocab instanceof Float32Array))
    throw new TypeError(`context.vocab: expected a Float32Array, got ${shown(vocab)}`);
  const vocabRows = rowsOf("context.vocab", vocab, dim);
  // The index copies the rows (synchronously) and serves the nearest ones: context.vocab is not kept.
  const index = new (addon().NativeNearestRows)(vocab, dim, threads);
  return new CachedRegularizer(
    "nearest-vocab",
    dim,
    (x) => {
      const nearest = index.rowsAt(index.nearest(x, threads)); // row r: x's row r's nearest
      const gradient = new Float32Array(x.length);
      let value = 0;
      for (let r = 0; r < nearest.length / dim; r++) {
        for (let j = 0; j < dim; j++) {
          const t = x[r * dim + j] - nearest[r * dim + j];
          gradient[r * dim + j] = t;
          value += t * t;
        }
      }
      return { value: 0.5 * value, gradient };
    },
    { kind: "nearest-vocab", vocabRows },
    () => index.dispose(),
  );
}

export { standardNormals };
