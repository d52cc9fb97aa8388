// Exact nearest-neighbour search of vectors against a vocabulary (or any reference set of rows), on the CPU
// or CUDA, usable without loading a model. "Exact" means: the same top-k as a float64 brute force, ties
// broken by the lower row index (kernels/include/priortune/knn.h explains how fp32 screening is certified,
// and why values closer than float64 rounding are ordered as our float64 sums come out).
//
// Metrics (values computed in float64, returned as fp32):
//   "cosine": q.v / (|q| |v|), larger is nearer; a cosine involving a zero vector is 0 (torch's convention)
//   "l2":     |q - v|, the Euclidean distance (not squared), smaller is nearer
//   "dot":    q.v, larger is nearer
// Inputs must be finite: NaN or Infinity in a row is an error naming the row and column. k must be an integer
// from 1 to min(1024, rows) (rows - 1 for a self-search): a non-integer is a TypeError, one out of range a
// RangeError, never a clamp.
import { addon } from "./native.js";
import { checkOptions, type OptionKeys, threadsOr } from "./validate.js";

export type KnnMetric = "cosine" | "l2" | "dot";
export type KnnBackendChoice = "auto" | "cpu" | "cuda";

/** The largest k a search accepts. */
export const MAX_K = 1024;

export interface VocabIndexOptions {
  /** Row length (the embedding or hidden size). */
  dim: number;
  /** Default "cosine". */
  metric?: KnnMetric;
  /** "auto" (default): CUDA when a usable device is present, else the CPU. */
  backend?: KnnBackendChoice;
  /** CPU threads for building, searching and host-side work; default: all hardware threads. */
  threads?: number;
}

const VOCAB_INDEX_KEYS = {
  dim: true,
  metric: true,
  backend: true,
  threads: true,
} satisfies OptionKeys<VocabIndexOptions>;

export interface SearchOptions {
  /** Neighbours per query, 1..min(1024, rows). */
  k: number;
  threads?: number;
}

const SEARCH_KEYS = { k: true, threads: true } satisfies OptionKeys<SearchOptions>;
const NEAREST_KEYS = { ...VOCAB_INDEX_KEYS, ...SEARCH_KEYS } satisfies OptionKeys<
  VocabIndexOptions & SearchOptions
>;

export interface NeighborResult {
  /** [count, k] row indices, best first. */
  indices: Int32Array;
  /** [count, k] metric values (see the header), best first. */
  scores: Float32Array;
  k: number;
  /** Number of queries. */
  count: number;
  /** Queries whose fp32 screening could not be certified at first and were searched again (diagnostic). */
  recoveredQueries: number;
  /**
   * CUDA: milliseconds the device spent in this search's kernels (CUDA events; the device's query preparation
   * included, the host's float64 query norms and the transfers excluded), summed over screening rounds and
   * chunks. 0 on the CPU.
   */
  deviceMs: number;
  /**
   * CUDA: the query preparation and screening part of deviceMs (the rest merges and re-scores the
   * candidates). 0 on the CPU.
   */
  deviceScreenMs: number;
}

export interface SelfSearchOptions {
  k: number;
  /** Which rows to search for (default: all rows); each row's own index is never returned. */
  rows?: Int32Array | readonly number[];
  /** Rows per native call (default 4096): bounds memory and lets onProgress report. */
  chunkRows?: number;
  onProgress?: (done: number, total: number) => void;
  threads?: number;
}

const SELF_SEARCH_KEYS = {
  k: true,
  rows: true,
  chunkRows: true,
  onProgress: true,
  threads: true,
} satisfies OptionKeys<SelfSearchOptions>;

/** A required options argument (undefined too is refused, saying what it must hold), then its keys checked. */
function optionsHolding<T extends object>(
  options: T,
  what: string,
  name: string,
  known: OptionKeys<T> | Readonly<Record<string, true>>,
): void {
  if (typeof options !== "object" || options === null)
    throw new TypeError(`options: expected an object with ${what}, got ${describeValue(options)}`);
  checkOptions(options, name, known);
}

type NativeIndex = InstanceType<ReturnType<typeof addon>["NativeKnnIndex"]>;

/** "Float32Array", "Array", "number", ... for error messages. */
export function describeValue(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return `Array(${value.length})`;
  if (ArrayBuffer.isView(value)) return value.constructor.name;
  if (typeof value === "number") return `number ${value}`;
  if (typeof value === "string") return `string "${value}"`;
  return typeof value;
}

export function checkFloat32(name: string, value: unknown): Float32Array {
  if (!(value instanceof Float32Array))
    throw new TypeError(`${name}: expected a Float32Array, got ${describeValue(value)}`);
  return value;
}

/** Every value of a rows x dim Float32Array finite, else a RangeError naming the row and column. */
export function checkFiniteRows(name: string, data: Float32Array, dim: number): void {
  for (let i = 0; i < data.length; i++)
    if (!Number.isFinite(data[i]!))
      throw new RangeError(
        `${name}: row ${Math.floor(i / dim)}, column ${i % dim} is ${data[i]} (values must be finite)`,
      );
}

export function checkInteger(
  name: string,
  value: unknown,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number {
  if (typeof value !== "number" || !Number.isInteger(value))
    throw new TypeError(`${name}: expected an integer, got ${describeValue(value)}`);
  if (value < min || value > max)
    throw new RangeError(`${name}: expected an integer from ${min} to ${max}, got ${value}`);
  return value;
}

/** Rows of a Float32Array of rows x dim, or a RangeError naming the argument. */
export function rowCount(name: string, data: Float32Array, dim: number): number {
  if (data.length === 0 || data.length % dim !== 0)
    throw new RangeError(
      `${name}: expected a non-empty length that is a multiple of dim (${dim}), got ${data.length} elements`,
    );
  return data.length / dim;
}

function checkMetric(value: unknown): KnnMetric {
  if (value === "cosine" || value === "l2" || value === "dot") return value;
  throw new TypeError(`metric: expected "cosine", "l2" or "dot", got ${describeValue(value)}`);
}

export function defaultThreads(): number {
  return Math.max(1, addon().cpuInfo().hardwareThreads);
}

/** Resolves "auto" | "cpu" | "cuda" against the build and the machine; "cuda" without a device is an error. */
export function resolveKnnBackend(choice: unknown = "auto"): "cpu" | "cuda" {
  if (choice !== "auto" && choice !== "cpu" && choice !== "cuda")
    throw new TypeError(`backend: expected "auto", "cpu" or "cuda", got ${describeValue(choice)}`);
  if (choice === "cpu") return "cpu";
  const info = addon().cudaInfo();
  if (choice === "cuda" && !info.usable) throw new Error(`backend: "cuda" was requested but ${info.reason}`);
  return info.usable ? "cuda" : "cpu";
}

/**
 * An exact nearest-neighbour index over a copy of `vocab` (rows x dim). The CPU index keeps the original rows
 * and a copy packed for the GEMM micro-kernel (about 2x the vocabulary in host memory); the CUDA index keeps
 * the rows resident on the device (plus a normalised copy for cosine) and the original rows on the host.
 */
export class VocabIndex {
  #native: NativeIndex | undefined;
  readonly rows: number;
  readonly dim: number;
  readonly metric: KnnMetric;
  readonly backend: "cpu" | "cuda";
  readonly threads: number;

  private constructor(
    native: NativeIndex,
    rows: number,
    dim: number,
    metric: KnnMetric,
    backend: "cpu" | "cuda",
    threads: number,
  ) {
    this.#native = native;
    this.rows = rows;
    this.dim = dim;
    this.metric = metric;
    this.backend = backend;
    this.threads = threads;
  }

  /** Builds the index (copies, normalises and packs or uploads the rows) off the JS thread. */
  static async create(vocab: Float32Array, options: VocabIndexOptions): Promise<VocabIndex> {
    checkFloat32("vocab", vocab);
    optionsHolding(options, "dim", "VocabIndex.create options", VOCAB_INDEX_KEYS);
    const dim = checkInteger("dim", options.dim, 1);
    const rows = rowCount("vocab", vocab, dim);
    const metric = checkMetric(options.metric ?? "cosine");
    const backend = resolveKnnBackend(options.backend ?? "auto");
    const threads = threadsOr(options.threads, defaultThreads());
    const native = new (addon().NativeKnnIndex)();
    await native.build(vocab, dim, metric, backend, threads);
    return new VocabIndex(native, rows, dim, metric, backend, threads);
  }

  get disposed(): boolean {
    return this.#native === undefined;
  }

  #live(): NativeIndex {
    if (!this.#native) throw new Error("Index is disposed");
    return this.#native;
  }

  #k(value: unknown, selfSearch: boolean): number {
    const available = this.rows - (selfSearch ? 1 : 0);
    if (available < 1) throw new RangeError("k: a self-search needs an index with at least 2 rows");
    return checkInteger("k", value, 1, Math.min(MAX_K, available));
  }

  /** The k nearest rows of each query (queries: count x dim), best first. */
  async search(queries: Float32Array, options: SearchOptions): Promise<NeighborResult> {
    const native = this.#live();
    checkFloat32("queries", queries);
    const count = rowCount("queries", queries, this.dim);
    optionsHolding(options, "k", "search options", SEARCH_KEYS);
    const k = this.#k(options?.k, false);
    const threads = threadsOr(options.threads, this.threads);
    const r = await native.search(queries, k, threads);
    return { ...r, k, count };
  }

  /**
   * Each listed row's (default: every row's) k nearest *other* rows: the vocabulary's own neighbour structure,
   * the baseline against which prompt distances are judged. Runs in chunks of `chunkRows` queries.
   */
  async selfSearch(options: SelfSearchOptions): Promise<NeighborResult> {
    this.#live();
    optionsHolding(options, "k", "selfSearch options", SELF_SEARCH_KEYS);
    const k = this.#k(options?.k, true);
    let rows: Int32Array;
    if (options.rows === undefined) {
      rows = new Int32Array(this.rows);
      for (let i = 0; i < this.rows; i++) rows[i] = i;
    } else rows = this.#rowIds("rows", options.rows);
    const chunk = options.chunkRows === undefined ? 4096 : checkInteger("chunkRows", options.chunkRows, 1);
    const threads = threadsOr(options.threads, this.threads);
    const indices = new Int32Array(rows.length * k);
    const scores = new Float32Array(rows.length * k);
    let recovered = 0;
    let deviceMs = 0;
    let deviceScreenMs = 0;
    for (let start = 0; start < rows.length; start += chunk) {
      const part = rows.subarray(start, Math.min(rows.length, start + chunk));
      const r = await this.#live().searchRows(part, k, threads, true);
      indices.set(r.indices, start * k);
      scores.set(r.scores, start * k);
      recovered += r.recoveredQueries;
      deviceMs += r.deviceMs;
      deviceScreenMs += r.deviceScreenMs;
      options.onProgress?.(start + part.length, rows.length);
    }
    return { indices, scores, k, count: rows.length, recoveredQueries: recovered, deviceMs, deviceScreenMs };
  }

  /**
   * Copies of the listed rows (ids.length x dim), as the index keeps them: the original fp32 values. So a
   * caller needs no copy of the vocabulary of its own beside the index.
   */
  rowsAt(ids: Int32Array | readonly number[]): Float32Array {
    const native = this.#live();
    return native.rowsAt(this.#rowIds("ids", ids));
  }

  /**
   * The full-covariance Gaussian fitted to all the index's rows (the native fit of lib/gaussian.ts, same
   * options), read in place: no copy of the vocabulary.
   */
  fitGaussian(
    regularisation: { shrinkage?: number; ridgeAbsolute?: number; ridgeRelative?: number },
    threads?: number,
  ): ReturnType<ReturnType<typeof addon>["priorGaussianFit"]> {
    const native = this.#live();
    return addon().priorGaussianFit(native, this.dim, regularisation, threadsOr(threads, this.threads));
  }

  // Row ids checked before the Int32Array conversion, which would wrap 2^32 + 1 to row 1.
  #rowIds(name: string, ids: Int32Array | readonly number[]): Int32Array {
    if (!(ids instanceof Int32Array) && !Array.isArray(ids))
      throw new TypeError(
        `${name}: expected an Int32Array or an array of row indices, got ${describeValue(ids)}`,
      );
    for (const [i, r] of Array.from(ids).entries())
      if (!Number.isInteger(r) || r < 0 || r >= this.rows)
        throw new RangeError(`${name}: element ${i} is ${r}, outside the index's rows [0, ${this.rows})`);
    return Int32Array.from(ids);
  }

  /** Bytes the index holds in host and device memory. */
  memory(): { hostBytes: number; deviceBytes: number } {
    const info = this.#live().info();
    return { hostBytes: info.hostBytes, deviceBytes: info.deviceBytes };
  }

  /** Frees the index's memory now; later calls throw "Index is disposed". A search in flight still finishes. */
  dispose(): void {
    this.#native?.dispose();
    this.#native = undefined;
  }
}

/**
 * One-shot search. On the CPU it searches a copy of `vocab` taken when the call starts (so the caller may
 * change, transfer or resize its buffer meanwhile) and packs panels as it goes; on CUDA it builds an index,
 * searches and disposes it. Prefer VocabIndex for repeated searches against one vocabulary.
 */
export async function nearestNeighbors(
  queries: Float32Array,
  vocab: Float32Array,
  options: VocabIndexOptions & SearchOptions,
): Promise<NeighborResult> {
  checkFloat32("queries", queries);
  checkFloat32("vocab", vocab);
  optionsHolding(options, "dim and k", "nearestNeighbors options", NEAREST_KEYS);
  const dim = checkInteger("dim", options?.dim, 1);
  const count = rowCount("queries", queries, dim);
  const rows = rowCount("vocab", vocab, dim);
  const k = checkInteger("k", options.k, 1, Math.min(MAX_K, rows));
  const metric = checkMetric(options.metric ?? "cosine");
  if (resolveKnnBackend(options.backend ?? "auto") === "cpu") {
    const threads = threadsOr(options.threads, defaultThreads());
    const r = await addon().knnSearchOnce(queries, vocab, dim, metric, k, threads);
    return { ...r, k, count };
  }
  const { dim: _, metric: __, backend, ...search } = options;
  const index = await VocabIndex.create(vocab, { dim, metric, backend, threads: options.threads });
  try {
    return await index.search(queries, search);
  } finally {
    index.dispose();
  }
}
