// Activation capture (paper.md, "Analyses": hidden states at chosen layers, per token and per-sample mean,
// on C4, SQuAD and MATH): the model's hidden states at several layers over a set of texts (or token-id
// sequences, e.g. random walks over the vocabulary), optionally behind a soft prompt. Kept in memory, or
// streamed to a directory of safetensors chunks with an index.json for sets larger than memory.
//
// Padding: by default only real token positions count (right padding is masked and its rows dropped).
// `padding: "include"` reproduces the paper's code, which padded every text to max_length and averaged
// over all positions: each sequence is padded to `maxLength` with `padId` (mask 0), and the pad positions'
// hidden states are kept in the token rows and in the means.
import { existsSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { atomicWrite, ensureDir } from "./files.js";
import { checkInteger } from "./knn.js";
import type { ForwardOptions, ForwardOutput } from "./model.js";

/** What activation capture needs of a model (lib/model.ts's Model has all of it). */
export interface ActivationModel {
  readonly config: {
    architecture?: string;
    hiddenSize: number;
    vocabSize: number;
    numLayers: number;
    maxPositions: number;
  };
  readonly tokenizer: {
    encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
    tokenToId?(token: string): number | undefined;
  } | null;
  readonly dir?: string;
  forward(options: ForwardOptions): Promise<Pick<ForwardOutput, "hiddenStates">>;
}

import { readTensors, type TensorToWrite, writeSafetensors } from "./safetensors.js";
import { endOfText } from "./train.js";
import { checkRequiredOptions, type OptionKeys } from "./validate.js";

export const ACTIVATIONS_FORMAT = "priortune-activations";
export const ACTIVATIONS_VERSION = 1;

export interface CaptureOptions {
  /** Hidden-state indices 0..numLayers in Transformers' output_hidden_states order (0 = the embeddings). */
  layers: number[];
  /** Which rows to keep: "token" (one per position), "mean" (one per text) or "both" (default). */
  pooling?: "token" | "mean" | "both";
  /** "exclude" (default): padding never counts; "include": pad to maxLength and count it (the paper's code). */
  padding?: "exclude" | "include";
  /** Pad token of padding "include" (default the tokenizer's end-of-text token, else 0). */
  padId?: number;
  /** Tokens per text; longer texts are cut (default min(128, the model's positions)). */
  maxLength?: number;
  /** Texts per forward pass (default 8). */
  batchSize?: number;
  /** Let the tokenizer add its special tokens (e.g. Llama's BOS), as the model sees text (default true). */
  addSpecialTokens?: boolean;
  /** A soft prompt (P x hiddenSize) in front of every text: activations of the prompted model. */
  prompt?: Float32Array;
  /** Count the prompt's own positions as rows of each text (default false: text positions only). */
  includePrompt?: boolean;
  /** Stream to this directory (index.json + chunk-NNNNNN.safetensors) instead of keeping rows in memory. */
  outDir?: string;
  /** Texts per chunk file (default 256); the texts of a chunk are batched by length. */
  chunkTexts?: number;
  onProgress?: (progress: { texts: number; total: number; tokens: number }) => void;
  signal?: AbortSignal;
}

const CAPTURE_KEYS = {
  layers: true,
  pooling: true,
  padding: true,
  padId: true,
  maxLength: true,
  batchSize: true,
  addSpecialTokens: true,
  prompt: true,
  includePrompt: true,
  outDir: true,
  chunkTexts: true,
  onProgress: true,
  signal: true,
} satisfies OptionKeys<CaptureOptions>;

export interface ActivationIndex {
  format: typeof ACTIVATIONS_FORMAT;
  version: number;
  model: string | null;
  layers: number[];
  dim: number;
  pooling: "token" | "mean" | "both";
  padding: "exclude" | "include";
  maxLength: number;
  promptLength: number;
  includePrompt: boolean;
  texts: number;
  tokens: number;
  chunks: { file: string; texts: [number, number]; tokens: [number, number] }[];
}

/** Captured activations, in memory or on disk; rows follow the input order. */
export interface ActivationSet {
  readonly index: ActivationIndex;
  /** Rows counted per text (its tokens, the pad positions with padding "include", the prompt if included). */
  lengths(): Int32Array;
  /** texts x dim per-text means at `layer`. */
  mean(layer: number): Float32Array;
  /** tokens x dim per-position rows at `layer`, texts one after another. */
  tokens(layer: number): Float32Array;
  /** Per-text token rows at `layer` (each length x dim): the sentence trajectories. At most `limit` texts. */
  trajectories(layer: number, limit?: number): Float32Array[];
}

function checkLayer(index: ActivationIndex, layer: number): void {
  if (!index.layers.includes(layer))
    throw new RangeError(`layer: ${layer} was not captured (layers ${index.layers.join(", ")})`);
}

function needPooling(index: ActivationIndex, kind: "token" | "mean"): void {
  if (index.pooling !== "both" && index.pooling !== kind)
    throw new Error(`activations: ${kind} rows were not captured (pooling "${index.pooling}")`);
}

class MemoryActivations implements ActivationSet {
  constructor(
    readonly index: ActivationIndex,
    readonly lengthsOf: Int32Array,
    readonly tokenRows: Map<number, Float32Array>,
    readonly meanRows: Map<number, Float32Array>,
  ) {}

  lengths(): Int32Array {
    return this.lengthsOf.slice();
  }

  mean(layer: number): Float32Array {
    checkLayer(this.index, layer);
    needPooling(this.index, "mean");
    return this.meanRows.get(layer)!;
  }

  tokens(layer: number): Float32Array {
    checkLayer(this.index, layer);
    needPooling(this.index, "token");
    return this.tokenRows.get(layer)!;
  }

  trajectories(layer: number, limit = Number.POSITIVE_INFINITY): Float32Array[] {
    return splitTrajectories(this.tokens(layer), this.lengthsOf, this.index.dim, limit);
  }
}

function splitTrajectories(
  rows: Float32Array,
  lengths: Int32Array,
  dim: number,
  limit: number,
): Float32Array[] {
  const out: Float32Array[] = [];
  let offset = 0;
  for (let t = 0; t < lengths.length && out.length < limit; t++) {
    out.push(rows.subarray(offset * dim, (offset + lengths[t]) * dim));
    offset += lengths[t];
  }
  return out;
}

class DiskActivations implements ActivationSet {
  constructor(
    readonly dir: string,
    readonly index: ActivationIndex,
  ) {}

  #read(layer: number, kind: "token" | "mean"): Float32Array {
    checkLayer(this.index, layer);
    needPooling(this.index, kind);
    const total = kind === "mean" ? this.index.texts : this.index.tokens;
    const out = new Float32Array(total * this.index.dim);
    let offset = 0;
    for (const chunk of this.index.chunks) {
      const t = readTensors(join(this.dir, chunk.file)).tensors.get(`${kind}.${layer}`);
      if (!t) throw new Error(`${this.dir}/${chunk.file}: no tensor ${kind}.${layer}`);
      out.set(t.data as Float32Array, offset);
      offset += t.data.length;
    }
    return out;
  }

  lengths(): Int32Array {
    const parts = this.index.chunks.map(
      (c) => readTensors(join(this.dir, c.file)).tensors.get("lengths")!.data as Int32Array,
    );
    const out = new Int32Array(this.index.texts);
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }

  mean(layer: number): Float32Array {
    return this.#read(layer, "mean");
  }

  tokens(layer: number): Float32Array {
    return this.#read(layer, "token");
  }

  trajectories(layer: number, limit = Number.POSITIVE_INFINITY): Float32Array[] {
    return splitTrajectories(this.tokens(layer), this.lengths(), this.index.dim, limit);
  }
}

/** Opens activations written by captureActivations({ outDir }). */
export function loadActivations(dir: string): ActivationSet {
  const file = join(dir, "index.json");
  if (!existsSync(file)) throw new Error(`${dir}: no index.json (not an activations directory)`);
  const index = JSON.parse(readFileSync(file, "utf8")) as ActivationIndex;
  if (index.format !== ACTIVATIONS_FORMAT || index.version !== ACTIVATIONS_VERSION)
    throw new Error(`${dir}: index.json is not ${ACTIVATIONS_FORMAT} version ${ACTIVATIONS_VERSION}`);
  return new DiskActivations(dir, index);
}

/**
 * Hidden states of `model` at `options.layers` over `inputs` (texts, or token-id sequences used as given).
 * Returns the rows in input order, in memory or (with outDir) on disk; see CaptureOptions.
 */
export async function captureActivations(
  model: ActivationModel,
  inputs: readonly (string | ArrayLike<number>)[],
  options: CaptureOptions,
): Promise<ActivationSet> {
  const c = model.config;
  const d = c.hiddenSize;
  checkRequiredOptions(options, "captureActivations options", CAPTURE_KEYS);
  if (!Array.isArray(options?.layers) || options.layers.length === 0)
    throw new TypeError("layers: expected a non-empty array of hidden-state indices");
  const layers = [...options.layers];
  layers.forEach((l, i) => {
    checkInteger(`layers[${i}]`, l, 0, c.numLayers);
  });
  if (new Set(layers).size !== layers.length) throw new RangeError("layers: an index is repeated");
  const pooling = options.pooling ?? "both";
  if (!["token", "mean", "both"].includes(pooling))
    throw new TypeError(`pooling: expected "token", "mean" or "both", got ${String(pooling)}`);
  const padding = options.padding ?? "exclude";
  if (padding !== "exclude" && padding !== "include")
    throw new TypeError(`padding: expected "exclude" or "include", got ${String(padding)}`);
  const batchSize = checkInteger("batchSize", options.batchSize ?? 8, 1);
  const chunkTexts = checkInteger("chunkTexts", options.chunkTexts ?? 256, 1);
  const padId = checkInteger("padId", options.padId ?? endOfText(model) ?? 0, 0, c.vocabSize - 1);
  const prompt = options.prompt;
  let promptLength = 0;
  if (prompt !== undefined) {
    if (!(prompt instanceof Float32Array) || prompt.length === 0 || prompt.length % d !== 0)
      throw new TypeError(`prompt: expected a Float32Array of P x ${d} values`);
    promptLength = prompt.length / d;
  }
  // GPT-2's positions hold the prompt too: checked here, before any chunk is written (it failed mid-way).
  const room = c.architecture === "gpt2" ? c.maxPositions - promptLength : c.maxPositions;
  if (room < 1)
    throw new RangeError(
      `prompt: ${promptLength} rows leave no room in the model's ${c.maxPositions} positions`,
    );
  const maxLength = checkInteger("maxLength", options.maxLength ?? Math.min(128, room), 1, room);
  const includePrompt = (options.includePrompt ?? false) && promptLength > 0;
  if (!Array.isArray(inputs) || inputs.length === 0)
    throw new RangeError("inputs: expected at least one text");
  const ids: Int32Array[] = inputs.map((t, i) => {
    let e: ArrayLike<number>;
    if (typeof t === "string") {
      if (!model.tokenizer) throw new TypeError("model: has no tokenizer (needed to encode texts)");
      e = model.tokenizer.encode(t, { addSpecialTokens: options.addSpecialTokens ?? true });
    } else e = t;
    if (e.length === 0) throw new RangeError(`inputs[${i}]: no tokens`);
    const out = Int32Array.from(Array.from(e).slice(0, maxLength));
    for (const id of out)
      if (!Number.isInteger(id) || id < 0 || id >= c.vocabSize)
        throw new RangeError(
          `inputs[${i}]: token id ${id} is outside the vocabulary (0..${c.vocabSize - 1})`,
        );
    return out;
  });
  const rowsOf = (len: number) =>
    (padding === "include" ? maxLength : len) + (includePrompt ? promptLength : 0);
  const lengths = Int32Array.from(ids, (e) => rowsOf(e.length));
  const index: ActivationIndex = {
    format: ACTIVATIONS_FORMAT,
    version: ACTIVATIONS_VERSION,
    model: model.dir ?? null,
    layers,
    dim: d,
    pooling,
    padding,
    maxLength,
    promptLength,
    includePrompt,
    texts: ids.length,
    tokens: lengths.reduce((a, b) => a + b, 0),
    chunks: [],
  };
  const wantTokens = pooling !== "mean";
  const wantMean = pooling !== "token";
  const memoryTokens = new Map<number, Float32Array>();
  const memoryMeans = new Map<number, Float32Array>();
  if (!options.outDir) {
    for (const l of layers) {
      if (wantTokens) memoryTokens.set(l, new Float32Array(index.tokens * d));
      if (wantMean) memoryMeans.set(l, new Float32Array(ids.length * d));
    }
  } else {
    ensureDir(options.outDir);
    const stale = readdirSync(options.outDir).filter(
      (f) => f === "index.json" || /^chunk-\d+\.safetensors$/.test(f),
    );
    if (stale.length > 0)
      throw new Error(
        stale.includes("index.json")
          ? `outDir: ${options.outDir} already holds activations (index.json); choose an empty directory`
          : `outDir: ${options.outDir} holds the chunks of a capture that did not finish (${stale[0]}, no index.json); delete them or choose an empty directory`,
      );
  }
  // A capture that fails (a full disk, an abort) removes the files it wrote: the directory is as it was.
  const written: string[] = [];
  try {
    const tokenOffsets = new Int32Array(ids.length + 1);
    for (let i = 0; i < ids.length; i++) tokenOffsets[i + 1] = tokenOffsets[i] + lengths[i];
    let done = 0;
    let tokensDone = 0;
    for (let c0 = 0; c0 < ids.length; c0 += chunkTexts) {
      const c1 = Math.min(ids.length, c0 + chunkTexts);
      const chunkTokenBase = tokenOffsets[c0];
      const chunkTokens = tokenOffsets[c1] - chunkTokenBase;
      const tokenBuf = new Map<number, Float32Array>();
      const meanBuf = new Map<number, Float32Array>();
      for (const l of layers) {
        if (wantTokens)
          tokenBuf.set(
            l,
            options.outDir
              ? new Float32Array(chunkTokens * d)
              : memoryTokens.get(l)!.subarray(chunkTokenBase * d, tokenOffsets[c1] * d),
          );
        if (wantMean)
          meanBuf.set(
            l,
            options.outDir ? new Float32Array((c1 - c0) * d) : memoryMeans.get(l)!.subarray(c0 * d, c1 * d),
          );
      }
      // Batch the chunk's texts by length (less padding), then write each row at its text's place.
      const order = Array.from({ length: c1 - c0 }, (_, i) => c0 + i).sort(
        (a, b) => ids[a].length - ids[b].length || a - b,
      );
      for (let b0 = 0; b0 < order.length; b0 += batchSize) {
        options.signal?.throwIfAborted();
        const batch = order.slice(b0, b0 + batchSize);
        const seqLen = padding === "include" ? maxLength : Math.max(...batch.map((t) => ids[t].length));
        const inputIds = new Int32Array(batch.length * seqLen).fill(padId);
        const attentionMask = new Uint8Array(batch.length * seqLen);
        batch.forEach((t, b) => {
          inputIds.set(ids[t], b * seqLen);
          attentionMask.fill(1, b * seqLen, b * seqLen + ids[t].length);
        });
        const out = await model.forward({
          inputIds,
          batch: batch.length,
          seqLen,
          attentionMask,
          prompt,
          hiddenStates: layers,
          logits: false,
        });
        const positions = out.hiddenStates[0]!.length / (batch.length * d); // prompt + sequence rows
        layers.forEach((l, li) => {
          const h = out.hiddenStates[li];
          batch.forEach((t, b) => {
            const first = includePrompt ? 0 : promptLength;
            const count = lengths[t];
            const base = (b * positions + first) * d;
            const rows = h.subarray(base, base + count * d);
            if (wantTokens) tokenBuf.get(l)!.set(rows, (tokenOffsets[t] - chunkTokenBase) * d);
            if (wantMean) {
              const m = meanBuf.get(l)!;
              const at = (t - c0) * d;
              const sum = new Float64Array(d);
              for (let p = 0; p < count; p++) for (let j = 0; j < d; j++) sum[j] += rows[p * d + j];
              for (let j = 0; j < d; j++) m[at + j] = sum[j] / count;
            }
          });
        });
        done += batch.length;
        for (const t of batch) tokensDone += lengths[t];
        options.onProgress?.({ texts: done, total: ids.length, tokens: tokensDone });
      }
      if (options.outDir) {
        const file = `chunk-${String(index.chunks.length).padStart(6, "0")}.safetensors`;
        const tensors: TensorToWrite[] = [
          { name: "lengths", dtype: "I32", shape: [c1 - c0], data: lengths.slice(c0, c1) },
        ];
        for (const l of layers) {
          if (wantTokens)
            tensors.push({
              name: `token.${l}`,
              dtype: "F32",
              shape: [chunkTokens, d],
              data: tokenBuf.get(l)!,
            });
          if (wantMean)
            tensors.push({ name: `mean.${l}`, dtype: "F32", shape: [c1 - c0, d], data: meanBuf.get(l)! });
        }
        written.push(join(options.outDir, file));
        writeSafetensors(join(options.outDir, file), tensors, {
          format: ACTIVATIONS_FORMAT,
          texts: `${c0}-${c1}`,
        });
        index.chunks.push({ file, texts: [c0, c1], tokens: [chunkTokenBase, tokenOffsets[c1]] });
      }
    }
    if (options.outDir) {
      // The index is written last and atomically: a directory with an index.json is complete.
      atomicWrite(join(options.outDir, "index.json"), `${JSON.stringify(index, null, 2)}\n`);
      return new DiskActivations(options.outDir, index);
    }
    return new MemoryActivations(index, lengths, memoryTokens, memoryMeans);
  } catch (e) {
    for (const f of written) rmSync(f, { force: true });
    throw e;
  }
}
