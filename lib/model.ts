// loadModel and Model: a frozen GPT-2 or Llama model with a soft prompt in front (the public contract).
import { existsSync, readFileSync, statSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join, resolve } from "node:path";
import { type Backend, type BackendChoice, defaultLogger, type Logger, resolveBackend } from "./backend.js";
import { loadPlan, type ModelConfig, nativeConfig, parameterCount, parseConfig } from "./config.js";
import { addon, type NativeModel } from "./native.js";
import { listModelTensors } from "./safetensors.js";
import { loadTokenizer, type Tokenizer } from "./tokenizer.js";
import { requireFloat32, requireInt32, requirePositiveInt, requireUint8 } from "./validate.js";

export type { ModelConfig } from "./config.js";

export interface LoadOptions {
  /** "auto" (default): CUDA when usable, else CPU, with the reason logged. */
  backend?: BackendChoice;
  /** CPU threads; default: all available cores. */
  threads?: number;
  logger?: Logger;
}

export interface ForwardOptions {
  /** Token ids, batch x seqLen, row-major. */
  inputIds: Int32Array;
  batch: number;
  seqLen: number;
  /** 1 = token, 0 = padding (right padding); default all ones. Prompt positions are always attended. */
  attentionMask?: Uint8Array;
  /** Soft prompt, P x hiddenSize, prepended to every sequence (positions 0..P-1). */
  prompt?: Float32Array;
  /** Indices 0..numLayers in Transformers' output_hidden_states order. */
  hiddenStates?: number[];
  /** Labels, batch x seqLen aligned with inputIds, -100 = ignore: adds the causal-LM loss. */
  labels?: Int32Array;
  /** Set false to skip returning logits (e.g. when only hidden states or the loss are needed). */
  logits?: boolean;
}

export interface ForwardOutput {
  /** batch x (P + seqLen) x vocabSize (absent when `logits: false`). */
  logits?: Float32Array;
  /** One batch x (P + seqLen) x hiddenSize array per requested index, in request order. */
  hiddenStates: Float32Array[];
  /** Mean cross-entropy over labelled positions (when labels are given). */
  loss?: number;
  labelCount?: number;
  /** P + seqLen. */
  positions: number;
}

/** What a model directory holds, read from config.json and the safetensors headers (no weights loaded). */
export interface ModelInfo {
  dir: string;
  config: ModelConfig;
  parameterCount: number;
  /** Stored dtypes of the weights, e.g. ["BF16"]. */
  dtypes: string[];
  weightFiles: string[];
  tokenizer: { source: string; vocabSize: number } | null;
}

function readConfig(dir: string): ModelConfig {
  const path = join(dir, "config.json");
  if (!existsSync(path)) throw new Error(`${dir}: no config.json (expected a Hugging Face model directory)`);
  return parseConfig(JSON.parse(readFileSync(path, "utf8")));
}

function tryTokenizer(dir: string): Tokenizer | null {
  const has = ["tokenizer.json", "vocab.json"].some((f) => existsSync(join(dir, f)));
  return has ? loadTokenizer(dir) : null;
}

export function describeModel(dirArg: string): ModelInfo {
  const dir = resolve(dirArg);
  const config = readConfig(dir);
  const tensors = listModelTensors(dir);
  const { entries, dtypes } = loadPlan(config, tensors);
  const tok = tryTokenizer(dir);
  return {
    dir,
    config,
    parameterCount: parameterCount(config),
    dtypes: [...dtypes].sort(),
    weightFiles: [...new Set(entries.map((e) => e.file))].sort(),
    tokenizer: tok ? { source: tok.source, vocabSize: tok.vocabSize } : null,
  };
}

export class Model {
  readonly #native: NativeModel;
  #disposed = false;

  constructor(
    native: NativeModel,
    readonly dir: string,
    readonly config: ModelConfig,
    readonly backend: Backend,
    /** Why this backend was chosen (e.g. the CUDA probe's answer). */
    readonly backendReason: string,
    readonly tokenizer: Tokenizer | null,
    readonly threads: number,
    readonly dtypes: string[],
  ) {
    this.#native = native;
  }

  get parameterCount(): number {
    return parameterCount(this.config);
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  #live(): NativeModel {
    if (this.#disposed) throw new Error("Model is disposed");
    return this.#native;
  }

  /** A copy of the token embedding matrix, vocabSize x hiddenSize, row-major. */
  tokenEmbeddings(): Float32Array {
    return this.#live().tokenEmbeddings();
  }

  /** Bytes of fp32 weights held by the model. */
  weightBytes(): number {
    return this.#live().weightBytes();
  }

  async forward(options: ForwardOptions): Promise<ForwardOutput> {
    const native = this.#live();
    const c = this.config;
    if (typeof options !== "object" || options === null)
      throw new TypeError("forward: expected an options object");
    const batch = requirePositiveInt(options.batch, "batch");
    const seqLen = requirePositiveInt(options.seqLen, "seqLen");
    const inputIds = requireInt32(options.inputIds, "inputIds", batch * seqLen);
    for (let i = 0; i < inputIds.length; i++) {
      const id = inputIds[i]!;
      if (id < 0 || id >= c.vocabSize) {
        throw new RangeError(`inputIds[${i}] = ${id} is outside the vocabulary [0, ${c.vocabSize})`);
      }
    }
    const attentionMask =
      options.attentionMask === undefined
        ? undefined
        : requireUint8(options.attentionMask, "attentionMask", batch * seqLen);
    const labels =
      options.labels === undefined ? undefined : requireInt32(options.labels, "labels", batch * seqLen);
    let promptLength = 0;
    if (options.prompt !== undefined) {
      const prompt = requireFloat32(options.prompt, "prompt");
      if (prompt.length === 0 || prompt.length % c.hiddenSize !== 0) {
        throw new RangeError(
          `prompt: expected P x hiddenSize (${c.hiddenSize}) elements, got ${prompt.length}`,
        );
      }
      for (let i = 0; i < prompt.length; i++) {
        if (!Number.isFinite(prompt[i]!))
          throw new RangeError(`prompt[${i}] is ${prompt[i]} (prompt vectors must be finite)`);
      }
      promptLength = prompt.length / c.hiddenSize;
    }
    const positions = promptLength + seqLen;
    if (c.architecture === "gpt2" && positions > c.maxPositions) {
      throw new RangeError(
        `prompt length ${promptLength} + seqLen ${seqLen} = ${positions} exceeds the model's ${c.maxPositions} positions`,
      );
    }
    if (c.slidingWindow !== undefined && positions > c.slidingWindow) {
      throw new RangeError(
        `prompt length + seqLen = ${positions} exceeds the sliding window (${c.slidingWindow}), which priortune does not implement`,
      );
    }
    let hiddenStates: number[] | undefined;
    if (options.hiddenStates !== undefined) {
      if (!Array.isArray(options.hiddenStates))
        throw new TypeError("hiddenStates: expected an array of layer indices");
      const seen = new Set<number>();
      for (const [i, v] of options.hiddenStates.entries()) {
        if (!Number.isInteger(v) || v < 0 || v > c.numLayers) {
          throw new RangeError(`hiddenStates[${i}] = ${v}: expected an integer in 0..${c.numLayers}`);
        }
        if (seen.has(v)) throw new RangeError(`hiddenStates: index ${v} is repeated`);
        seen.add(v);
      }
      hiddenStates = options.hiddenStates;
    }
    const out = await native.forward({
      inputIds,
      batch,
      seqLen,
      attentionMask,
      labels,
      prompt: options.prompt,
      hiddenStates,
      logits: options.logits ?? true,
    });
    return { ...out, positions };
  }

  /** Frees the native memory now (otherwise it goes with the garbage collector). Safe to call twice. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#native.dispose();
  }
}

export async function loadModel(dirArg: string, options: LoadOptions = {}): Promise<Model> {
  if (typeof dirArg !== "string")
    throw new TypeError(`dir: expected a model directory path, got ${typeof dirArg}`);
  const dir = resolve(dirArg);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new Error(`${dir}: not a directory`);
  const logger = options.logger ?? defaultLogger;
  const threads =
    options.threads === undefined ? availableParallelism() : requirePositiveInt(options.threads, "threads");
  const config = readConfig(dir);
  const { backend, reason } = resolveBackend(options.backend, logger);
  const { entries, dtypes } = loadPlan(config, listModelTensors(dir));
  const tokenizer = tryTokenizer(dir);
  const native = new (addon().NativeModel)(nativeConfig(config, threads));
  try {
    await native.loadTensors(entries);
    native.checkComplete();
  } catch (e) {
    native.dispose();
    throw e;
  }
  return new Model(native, dir, config, backend, reason, tokenizer, threads, [...dtypes].sort());
}
