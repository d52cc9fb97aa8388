// loadModel and Model: a frozen GPT-2 or Llama model with a soft prompt in front (the public contract).
import { existsSync, statSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join, resolve } from "node:path";
import { type Backend, type BackendChoice, defaultLogger, type Logger, resolveBackend } from "./backend.js";
import { loadPlan, type ModelConfig, nativeConfig, parameterCount, parseConfig } from "./config.js";
import { readJsonFile } from "./files.js";
import {
  addon,
  type CudaPrecision,
  type DeepPrompts,
  type DeviceMemory,
  type NativeForwardArgs,
  type NativeGradResult,
  type NativeModel,
} from "./native.js";
import { AdamW, type AdamWOptions, fromPromptTensors, promptGrads, promptTensors } from "./optim.js";
import { listModelTensors, readTensorFloat32 } from "./safetensors.js";
import { findTokenizer, type Tokenizer } from "./tokenizer.js";
import {
  checkLabels,
  checkOptions,
  checkRequiredOptions,
  checkTokenIds,
  type OptionKeys,
  requireFloat32,
  requireInt32,
  requirePositiveInt,
  requireUint8,
  threadsOr,
} from "./validate.js";

export type { ModelConfig } from "./config.js";

const LOAD_KEYS = {
  backend: true,
  threads: true,
  logger: true,
  precision: true,
  cudaGraphs: true,
  cudaProfile: true,
} satisfies OptionKeys<LoadOptions>;

export interface LoadOptions {
  /** "auto" (default): CUDA when usable, else CPU, with the reason logged. */
  backend?: BackendChoice;
  /** CPU threads; default: all available cores. */
  threads?: number;
  logger?: Logger;
  /**
   * CUDA matrix-product precision: "bf16" (default; tensor cores, weights stored in bf16 on the device),
   * "tf32", or "fp32" (CUDA cores; the verification path). Ignored on the CPU.
   */
  precision?: CudaPrecision;
  /** Replay repeated training steps as CUDA graphs (default true). Ignored on the CPU. */
  cudaGraphs?: boolean;
  /**
   * Time every device stage (GEMMs, attention, norms, ...) with CUDA events; read the sums with
   * model.deviceProfile(). Profiled calls run eagerly (no graphs) and somewhat slower. Ignored on the CPU.
   */
  cudaProfile?: boolean;
}

/** A batch for PromptTrainer.step: token ids with labels (the trainer supplies the prompts). */
export type PromptBatch = Omit<LossAndGradOptions, "prompt" | "deepPrompts">;

export interface PromptTrainerOptions extends Omit<AdamWOptions, "lrScale"> {
  /** Clip the global gradient norm (over every trainable tensor) to this before the update; 0 = none. */
  maxGradNorm?: number;
}

export const PROMPT_TRAINER_KEYS = {
  lr: true,
  beta1: true,
  beta2: true,
  eps: true,
  weightDecay: true,
  maxGradNorm: true,
} satisfies OptionKeys<PromptTrainerOptions>;

const PROMPT_BATCH_KEYS = {
  inputIds: true,
  batch: true,
  seqLen: true,
  attentionMask: true,
  labels: true,
} satisfies OptionKeys<PromptBatch>;

const TRAINER_INIT_KEYS = { prompt: true, deepPrompts: true } satisfies OptionKeys<{
  prompt?: Float32Array;
  deepPrompts?: DeepPrompts;
}>;

export interface PromptStepResult {
  loss: number;
  labelCount: number;
  /** Global L2 norm of the gradients before clipping. */
  gradNorm: number;
  /** AdamW steps taken so far. */
  step: number;
}

/** Deep copies of a prompt and deep prompts (the trainer owns its tensors; callers get copies). */
function copyPromptTensors(t: { prompt?: Float32Array; deepPrompts?: DeepPrompts }): {
  prompt?: Float32Array;
  deepPrompts?: DeepPrompts;
} {
  return fromPromptTensors(
    t,
    promptTensors(t.prompt, t.deepPrompts).map((a) => a.slice()),
  );
}

/** AdamW's state: the step count and the moments, in the order of promptTensors (prompt, then deep tensors). */
export interface OptimizerState {
  step: number;
  m: Float32Array[];
  v: Float32Array[];
}

// The trainer whose tensors a CUDA model holds on the device (one set per model; a newer trainer replaces it).
const deviceTrainer = new WeakMap<Model, PromptTrainer>();

/** Runs async work one call at a time, in call order (a failed call does not stop the ones after it). */
export class CallQueue {
  #tail: Promise<void> = Promise.resolve();
  run<T>(work: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(work);
    this.#tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}

/**
 * One loss + gradient + AdamW step per call on prompt tensors the trainer owns. On CUDA the tensors, their
 * gradients and AdamW's moments stay on the device and a repeated step shape replays a CUDA graph; on the
 * CPU the same update runs through lossAndGrad and the native AdamW (the reference).
 */
export class PromptTrainer {
  readonly #model: Model;
  readonly #native: NativeModel | null;
  readonly #tensors: { prompt?: Float32Array; deepPrompts?: DeepPrompts };
  readonly #adamw: AdamW | null;
  readonly #options: Required<Omit<PromptTrainerOptions, "lr">> & { lr: number };
  #steps = 0;
  // Steps and state calls run one at a time in call order: two steps in flight at once would both take
  // their gradient at the same prompt (each call copies the tensors when it starts).
  readonly #queue = new CallQueue();

  /** Use Model.promptTrainer. */
  constructor(
    model: Model,
    native: NativeModel | null,
    tensors: { prompt?: Float32Array; deepPrompts?: DeepPrompts },
    options: PromptTrainerOptions,
  ) {
    this.#model = model;
    this.#native = native;
    const { lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0.01, maxGradNorm = 0 } = options;
    if (typeof maxGradNorm !== "number" || !Number.isFinite(maxGradNorm) || maxGradNorm < 0)
      throw new RangeError(`maxGradNorm: expected a finite number >= 0, got ${maxGradNorm}`);
    this.#options = { lr, beta1, beta2, eps, weightDecay, maxGradNorm };
    this.#tensors = tensors;
    // The CPU path owns copies of the tensors; on CUDA they live on the device (AdamW validates the settings).
    const adamw = new AdamW(promptTensors(tensors.prompt, tensors.deepPrompts), {
      lr,
      beta1,
      beta2,
      eps,
      weightDecay,
    });
    this.#adamw = native ? null : adamw;
  }

  get steps(): number {
    return this.#steps;
  }

  /**
   * One step on `batch`; `lr` overrides the learning rate for this step (schedules). Calls made before the
   * previous one settled wait for it (each step starts from the previous step's tensors).
   */
  async step(batch: PromptBatch, lr = this.#options.lr): Promise<PromptStepResult> {
    if (typeof lr !== "number" || !Number.isFinite(lr) || lr < 0)
      throw new RangeError(`lr: expected a finite number >= 0, got ${lr}`);
    checkOptions(batch, "PromptTrainer.step batch", PROMPT_BATCH_KEYS);
    const args = checkCallArgs(this.#model.config, batch);
    if (args.labels === undefined)
      throw new TypeError("labels: expected an Int32Array (required for a step)");
    // The batch's arrays as they are now: a queued step runs later, and the caller may refill them meanwhile.
    const arrays = {
      inputIds: args.inputIds.slice(),
      labels: args.labels.slice(),
      attentionMask: args.attentionMask?.slice(),
    };
    if (this.#native) return this.#queue.run(() => this.#deviceStep({ ...args, ...arrays }, lr));
    return this.#queue.run(() => this.#hostStep({ ...batch, ...arrays }, lr));
  }

  async #deviceStep(
    args: ReturnType<typeof checkCallArgs> & { labels: Int32Array },
    lr: number,
  ): Promise<PromptStepResult> {
    const o = this.#options;
    this.#checkCurrent();
    const r = await modelCall(this.#model, () =>
      this.#native!.promptStep(args, {
        lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weightDecay: o.weightDecay,
        maxGradNorm: o.maxGradNorm,
      }),
    );
    this.#steps = r.step;
    return r;
  }

  async #hostStep(batch: PromptBatch, lr: number): Promise<PromptStepResult> {
    const o = this.#options;
    const g = await this.#model.lossAndGrad({ ...batch, ...this.#tensors } as LossAndGradOptions);
    const grads = promptGrads(g);
    let sq = 0;
    for (const t of grads) for (let i = 0; i < t.length; i++) sq += t[i]! * t[i]!;
    const gradNorm = Math.sqrt(sq);
    if (!Number.isFinite(gradNorm))
      throw new Error(`prompt step: the gradient is not finite (loss ${g.loss})`);
    if (o.maxGradNorm > 0) {
      const coef = o.maxGradNorm / (gradNorm + 1e-6);
      if (coef < 1)
        for (const t of grads) for (let i = 0; i < t.length; i++) t[i] = Math.fround(t[i]! * coef);
    }
    this.#adamw!.step(grads, lr);
    this.#steps = this.#adamw!.stepCount;
    return { loss: g.loss, labelCount: g.labelCount, gradNorm, step: this.#steps };
  }

  // A CUDA model's device holds one trainer's tensors: an older trainer must not read or step the newer one's.
  #checkCurrent(): void {
    if (deviceTrainer.get(this.#model) !== this)
      throw new Error(
        "PromptTrainer: a newer promptTrainer() on this CUDA model replaced this trainer's device tensors " +
          "(a model trains one set at a time; use another loaded model for a second trainer)",
      );
  }

  /** Copies of the current tensors (after the steps called before). */
  tensors(): Promise<{ prompt?: Float32Array; deepPrompts?: DeepPrompts }> {
    return this.#queue.run(() => this.#tensorsNow());
  }

  async #tensorsNow(): Promise<{ prompt?: Float32Array; deepPrompts?: DeepPrompts }> {
    if (this.#native) {
      this.#checkCurrent();
      const { step: _, ...t } = await modelCall(this.#model, () => this.#native!.trainables());
      return t;
    }
    return copyPromptTensors(this.#tensors);
  }

  /** Copies of AdamW's state (checkpoints), after the steps called before. */
  optimizerState(): Promise<OptimizerState> {
    return this.#queue.run(() => this.#optimizerStateNow());
  }

  async #optimizerStateNow(): Promise<OptimizerState> {
    if (this.#native) {
      this.#checkCurrent();
      const m = await modelCall(this.#model, () => this.#native!.trainables("m"));
      const v = await modelCall(this.#model, () => this.#native!.trainables("v"));
      return {
        step: m.step,
        m: promptTensors(m.prompt, m.deepPrompts),
        v: promptTensors(v.prompt, v.deepPrompts),
      };
    }
    const a = this.#adamw!;
    return { step: a.stepCount, m: a.m.map((t) => t.slice()), v: a.v.map((t) => t.slice()) };
  }

  /** Restores AdamW's state as optimizerState returns it (a resumed run); the tensors are not changed. */
  async setOptimizerState(state: OptimizerState): Promise<void> {
    const shapes = promptTensors(this.#tensors.prompt, this.#tensors.deepPrompts);
    if (!Number.isInteger(state.step) || state.step < 0)
      throw new RangeError(`step: expected an integer >= 0, got ${state.step}`);
    for (const [name, list] of [
      ["m", state.m],
      ["v", state.v],
    ] as const) {
      if (list.length !== shapes.length || list.some((t, i) => t.length !== shapes[i]!.length))
        throw new RangeError(`${name}: expected ${shapes.length} tensors shaped as the trainer's`);
    }
    // The caller's arrays are copied now: they may change before the queued call runs.
    const m = state.m.map((t) => Float32Array.from(t));
    const v = state.v.map((t) => Float32Array.from(t));
    return this.#queue.run(async () => {
      if (this.#native) {
        this.#checkCurrent();
        const native = this.#native;
        await modelCall(this.#model, () =>
          native.setOptimizerState(
            fromPromptTensors(this.#tensors, m),
            fromPromptTensors(this.#tensors, v),
            state.step,
          ),
        );
      } else {
        const a = this.#adamw!;
        for (const [i, t] of m.entries()) a.m[i]!.set(t);
        for (const [i, t] of v.entries()) a.v[i]!.set(t);
        a.stepCount = state.step;
      }
      this.#steps = state.step;
    });
  }
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
  /**
   * Deep prompts. "hidden" (the paper's variant): per listed layer, P_l x hiddenSize vectors prepended to
   * the layer input, the first P_l output rows cut. "prefix" (prefix-tuning, as PEFT): per listed layer,
   * key and value prefixes of Pp x numKvHeads x headDim attended by every position; token positions
   * then start at Pp.
   */
  deepPrompts?: DeepPrompts;
  /** Indices 0..numLayers in Transformers' output_hidden_states order. */
  hiddenStates?: number[];
  /** Labels, batch x seqLen aligned with inputIds, -100 = ignore: adds the causal-LM loss. */
  labels?: Int32Array;
  /** Set false to skip returning logits (e.g. when only hidden states or the loss are needed). */
  logits?: boolean;
}

const FORWARD_KEYS = {
  inputIds: true,
  batch: true,
  seqLen: true,
  attentionMask: true,
  prompt: true,
  deepPrompts: true,
  hiddenStates: true,
  labels: true,
  logits: true,
} satisfies OptionKeys<ForwardOptions>;

export interface LossAndGradOptions extends Omit<ForwardOptions, "hiddenStates" | "logits" | "labels"> {
  /** Labels, batch x seqLen aligned with inputIds, -100 = ignore. */
  labels: Int32Array;
}

export interface GenerateOptions extends Omit<ForwardOptions, "hiddenStates" | "logits" | "labels"> {
  maxNewTokens: number;
  /** Stop a sequence after this token (default: none). */
  eosId?: number;
  labels?: never;
}

const LOSS_AND_GRAD_KEYS = {
  inputIds: true,
  batch: true,
  seqLen: true,
  attentionMask: true,
  prompt: true,
  deepPrompts: true,
  labels: true,
} satisfies OptionKeys<LossAndGradOptions>;

const GENERATE_KEYS = {
  inputIds: true,
  batch: true,
  seqLen: true,
  attentionMask: true,
  prompt: true,
  deepPrompts: true,
  maxNewTokens: true,
  eosId: true,
  labels: true,
} satisfies OptionKeys<GenerateOptions>;

// Each model's native calls run one at a time in JS: a native job waits on the model's lock, so calls queued
// at once would each hold a libuv pool thread while they wait (starving file reads and other models).
const modelQueues = new WeakMap<Model, CallQueue>();

/** Runs `work` (one native call on `model`) after the model's calls before it have settled. */
export function modelCall<T>(model: Model, work: () => Promise<T>): Promise<T> {
  let queue = modelQueues.get(model);
  if (!queue) {
    queue = new CallQueue();
    modelQueues.set(model, queue);
  }
  return queue.run(work);
}

/** The caller's arrays of a call, copied: a queued call runs later, and they may change or be transferred. */
function copyCallArrays<T extends ReturnType<typeof checkCallArgs>>(args: T): T {
  return {
    ...args,
    ...copyPromptTensors(args),
    inputIds: args.inputIds.slice(),
    attentionMask: args.attentionMask?.slice(),
    labels: args.labels?.slice(),
  };
}

/** Loss and the gradients of the prompt tensors (the native result as it is). */
export type LossAndGrad = NativeGradResult;

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
  return parseConfig(readJsonFile(path) as Record<string, unknown>);
}

/**
 * The token-embedding matrix (vocabSize x hiddenSize) of a model directory, without loading the model: the
 * loader's own plan finds the tensor (names per architecture, prefixes, tied heads, dtype and shape checked
 * against config.json) and only its bytes are read, converted to fp32 as the loader converts them: the
 * values `loadModel(dir).tokenEmbeddings()` gives.
 */
export function readTokenEmbeddings(dirArg: string): {
  dir: string;
  config: ModelConfig;
  vocab: Float32Array;
} {
  const dir = resolve(dirArg);
  const config = readConfig(dir);
  const tensors = listModelTensors(dir);
  const entry = loadPlan(config, tensors).entries.find((e) => e.target === "tok_emb")!;
  return { dir, config, vocab: readTensorFloat32(tensors.get(entry.name!)!) };
}

export function describeModel(dirArg: string): ModelInfo {
  const dir = resolve(dirArg);
  const config = readConfig(dir);
  const tensors = listModelTensors(dir);
  const { entries, dtypes } = loadPlan(config, tensors);
  const tok = findTokenizer(dir, (m) => defaultLogger("warn", m));
  return {
    dir,
    config,
    parameterCount: parameterCount(config),
    dtypes: [...dtypes].sort(),
    weightFiles: [...new Set(entries.map((e) => e.file))].sort(),
    tokenizer: tok ? { source: tok.source, vocabSize: tok.vocabSize } : null,
  };
}

/**
 * A loaded model (loadModel): forward passes, losses and prompt gradients, generation and device-resident
 * prompt training on the CPU or CUDA backend; frozen weights. dispose() frees its native memory.
 */
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
    checkRequiredOptions(options, "forward options", FORWARD_KEYS);
    const args = copyCallArrays(checkCallArgs(this.config, options));
    const hiddenStates = checkHiddenStates(this.config, options.hiddenStates);
    const logits = options.logits ?? true;
    const out = await modelCall(this, () =>
      native.forward({ ...args, hiddenStates: hiddenStates && [...hiddenStates], logits }),
    );
    return { ...out, positions: args.positions };
  }

  /**
   * Loss (mean cross-entropy over labelled positions, causal shift over the concatenated sequence) and its
   * gradient with respect to the soft prompt and the deep prompts. Weights get no gradient.
   */
  async lossAndGrad(options: LossAndGradOptions): Promise<LossAndGrad> {
    const native = this.#live();
    checkRequiredOptions(options, "lossAndGrad options", LOSS_AND_GRAD_KEYS);
    if (options?.labels === undefined)
      throw new TypeError("labels: expected an Int32Array (required by lossAndGrad)");
    if (options.prompt === undefined && options.deepPrompts === undefined) {
      throw new TypeError(
        "lossAndGrad: give a prompt and/or deepPrompts (there is nothing else to differentiate)",
      );
    }
    const args = copyCallArrays(checkCallArgs(this.config, options));
    const out = await modelCall(this, () => native.lossAndGrad({ ...args, labels: args.labels! }));
    if (out.labelCount === 0) throw new RangeError("labels: no labelled position");
    return out;
  }

  /**
   * Greedy decoding from a key/value cache (native; on a CUDA model on the device): every sequence of the
   * right-padded batch continues after its last token for up to `maxNewTokens` tokens, with the soft and
   * deep prompts in place. A sequence stops after `eosId`; the rest of its row is -1. Returns batch x
   * maxNewTokens ids.
   */
  async generate(options: GenerateOptions): Promise<Int32Array> {
    const native = this.#live();
    checkRequiredOptions(options, "generate options", GENERATE_KEYS);
    if (options?.labels !== undefined) throw new TypeError("generate: labels are not used; leave them out");
    const maxNew = requirePositiveInt(options?.maxNewTokens, "maxNewTokens");
    const args = copyCallArrays(checkCallArgs(this.config, options, maxNew - 1));
    const eos = options.eosId ?? -1;
    if (!Number.isInteger(eos) || eos < -1 || eos >= this.config.vocabSize) {
      throw new RangeError(`eosId: expected a token id in the vocabulary (or -1 for none), got ${eos}`);
    }
    return modelCall(this, () => native.generate(args, maxNew, eos));
  }

  /** Milliseconds per device stage since the last call (loadModel with cudaProfile; null on the CPU). */
  deviceProfile(): Record<string, number> | null {
    const native = this.#live();
    return this.backend === "cuda" ? native.deviceProfile() : null;
  }

  /** Device memory held by this model on CUDA (null on the CPU backend). */
  deviceMemory(): DeviceMemory | null {
    const native = this.#live();
    return this.backend === "cuda" ? native.deviceMemory() : null;
  }

  /**
   * A trainer for the given prompt tensors (copied: the caller's arrays are not modified). See PromptTrainer.
   */
  async promptTrainer(
    init: { prompt?: Float32Array; deepPrompts?: DeepPrompts },
    options: PromptTrainerOptions,
  ): Promise<PromptTrainer> {
    const native = this.#live();
    checkRequiredOptions(init, "promptTrainer init", TRAINER_INIT_KEYS);
    checkRequiredOptions(options, "promptTrainer options", PROMPT_TRAINER_KEYS);
    if (init?.prompt === undefined && init?.deepPrompts === undefined)
      throw new TypeError("promptTrainer: give a prompt and/or deepPrompts to train");
    // Validates the tensors' shapes against the config (a one-token dummy batch).
    checkCallArgs(this.config, { inputIds: new Int32Array(1), batch: 1, seqLen: 1, ...init });
    const tensors = copyPromptTensors(init);
    if (this.backend === "cuda") {
      // A CUDA model holds one device-resident set of trainables: this trainer replaces the previous one.
      const trainer = new PromptTrainer(this, native, tensors, options);
      await modelCall(this, () => native.setTrainables(tensors));
      deviceTrainer.set(this, trainer);
      return trainer;
    }
    return new PromptTrainer(this, null, tensors, options);
  }

  /**
   * Frees the native memory (otherwise it goes with the garbage collector) once the calls already made have
   * finished (they complete; calls made after this throw "Model is disposed"). Safe to call twice.
   */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    const native = this.#native;
    void modelCall(this, async () => native.dispose());
  }
}

/**
 * Loads a Hugging Face model directory (config.json, safetensors weights, tokenizer) on the backend asked
 * for ("auto": CUDA when usable). Weights are converted to fp32 as they are read; see LoadOptions.
 */
export async function loadModel(dirArg: string, optionsArg?: LoadOptions): Promise<Model> {
  if (typeof dirArg !== "string")
    throw new TypeError(`dir: expected a model directory path, got ${typeof dirArg}`);
  const options = checkOptions(optionsArg, "loadModel options", LOAD_KEYS);
  const dir = resolve(dirArg);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new Error(`${dir}: not a directory`);
  const logger = options.logger ?? defaultLogger;
  const threads = threadsOr(options.threads, availableParallelism());
  const config = readConfig(dir);
  const { backend, reason } = resolveBackend(options.backend, logger);
  const { entries, dtypes } = loadPlan(config, listModelTensors(dir));
  const tokenizer = findTokenizer(dir, (m) => logger("warn", m));
  const native = new (addon().NativeModel)(nativeConfig(config, threads));
  try {
    await native.loadTensors(entries);
    native.checkComplete();
    if (backend === "cuda") {
      const precision = options.precision ?? "bf16";
      if (precision !== "bf16" && precision !== "tf32" && precision !== "fp32")
        throw new TypeError(`precision: expected "bf16", "tf32" or "fp32", got ${JSON.stringify(precision)}`);
      const mem = await native.attachCuda({
        precision,
        graphs: options.cudaGraphs ?? true,
        profile: options.cudaProfile ?? false,
      });
      logger(
        "info",
        `CUDA: ${mem.device}, ${precision} weights ${(mem.weightBytes / 2 ** 20).toFixed(1)} MiB on the device`,
      );
    }
  } catch (e) {
    native.dispose();
    throw e;
  }
  return new Model(native, dir, config, backend, reason, tokenizer, threads, [...dtypes].sort());
}

function checkFiniteFloat32(v: unknown, name: string, multipleOf: number, what: string): Float32Array {
  const a = requireFloat32(v, name);
  if (a.length === 0 || a.length % multipleOf !== 0) {
    throw new RangeError(
      `${name}: expected ${what} (a non-zero multiple of ${multipleOf} elements), got ${a.length}`,
    );
  }
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i]!)) throw new RangeError(`${name}[${i}] is ${a[i]} (values must be finite)`);
  }
  return a;
}

function checkLayerList(c: ModelConfig, v: unknown, name: string): number[] {
  if (!Array.isArray(v) || v.length === 0)
    throw new TypeError(`${name}: expected a non-empty array of layer indices`);
  const seen = new Set<number>();
  for (const [i, l] of v.entries()) {
    if (!Number.isInteger(l) || l < 0 || l >= c.numLayers) {
      throw new RangeError(`${name}[${i}] = ${l}: expected an integer in 0..${c.numLayers - 1}`);
    }
    if (seen.has(l)) throw new RangeError(`${name}: layer ${l} is repeated`);
    seen.add(l);
  }
  return v;
}

function checkDeepPrompts(c: ModelConfig, d: DeepPrompts): void {
  if (typeof d !== "object" || d === null) throw new TypeError("deepPrompts: expected an object");
  const layers = checkLayerList(c, d.layers, "deepPrompts.layers");
  const perLayer = (v: unknown, key: string): unknown[] => {
    if (!Array.isArray(v) || v.length !== layers.length) {
      throw new TypeError(
        `deepPrompts.${key}: expected an array of ${layers.length} Float32Array (one per layer)`,
      );
    }
    return v;
  };
  if (d.kind === "hidden") {
    perLayer(d.vectors, "vectors").forEach((t, i) => {
      checkFiniteFloat32(t, `deepPrompts.vectors[${i}]`, c.hiddenSize, "P_l x hiddenSize");
    });
  } else if (d.kind === "prefix") {
    const per = c.numKvHeads * c.headDim;
    const keys = perLayer(d.keys, "keys");
    const values = perLayer(d.values, "values");
    const first = requireFloat32(keys[0], "deepPrompts.keys[0]").length;
    keys.forEach((t, i) => {
      const k = checkFiniteFloat32(t, `deepPrompts.keys[${i}]`, per, "Pp x numKvHeads x headDim");
      if (k.length !== first)
        throw new RangeError(`deepPrompts.keys[${i}]: every layer needs the same prefix length`);
      checkFiniteFloat32(values[i], `deepPrompts.values[${i}]`, per, "Pp x numKvHeads x headDim");
      if ((values[i] as Float32Array).length !== k.length) {
        throw new RangeError(
          `deepPrompts.values[${i}]: expected ${k.length} elements like keys[${i}], got ${(values[i] as Float32Array).length}`,
        );
      }
    });
  } else {
    throw new TypeError(
      `deepPrompts.kind: expected "hidden" or "prefix", got ${JSON.stringify((d as { kind: unknown }).kind)}`,
    );
  }
}

function checkHiddenStates(c: ModelConfig, v: number[] | undefined): number[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw new TypeError("hiddenStates: expected an array of layer indices");
  const seen = new Set<number>();
  for (const [i, l] of v.entries()) {
    if (!Number.isInteger(l) || l < 0 || l > c.numLayers) {
      throw new RangeError(`hiddenStates[${i}] = ${l}: expected an integer in 0..${c.numLayers}`);
    }
    if (seen.has(l)) throw new RangeError(`hiddenStates: index ${l} is repeated`);
    seen.add(l);
  }
  return v;
}

/** The checks forward and lossAndGrad share; returns the native arguments and the sequence length. */
/** `generated`: tokens generate() will feed back after the sequence (maxNewTokens - 1; the last is not). */
function checkCallArgs(
  c: ModelConfig,
  options: ForwardOptions | LossAndGradOptions,
  generated = 0,
): Omit<NativeForwardArgs, "hiddenStates" | "logits"> & { positions: number } {
  if (typeof options !== "object" || options === null) throw new TypeError("expected an options object");
  const batch = requirePositiveInt(options.batch, "batch");
  const seqLen = requirePositiveInt(options.seqLen, "seqLen");
  const inputIds = requireInt32(options.inputIds, "inputIds", batch * seqLen);
  checkTokenIds(inputIds, c.vocabSize, "inputIds");
  const attentionMask =
    options.attentionMask === undefined
      ? undefined
      : requireUint8(options.attentionMask, "attentionMask", batch * seqLen);
  let labels: Int32Array | undefined;
  if (options.labels !== undefined) {
    labels = requireInt32(options.labels, "labels", batch * seqLen);
    checkLabels(labels, c.vocabSize, "labels");
  }
  let promptLength = 0;
  if (options.prompt !== undefined) {
    promptLength =
      checkFiniteFloat32(options.prompt, "prompt", c.hiddenSize, `P x hiddenSize (${c.hiddenSize})`).length /
      c.hiddenSize;
  }
  if (options.deepPrompts !== undefined) checkDeepPrompts(c, options.deepPrompts);
  const positions = promptLength + seqLen;
  const prefix =
    options.deepPrompts?.kind === "prefix"
      ? options.deepPrompts.keys[0]!.length / (c.numKvHeads * c.headDim)
      : 0;
  const more = generated ? ` + ${generated} generated` : "";
  if (c.architecture === "gpt2" && positions + prefix + generated > c.maxPositions) {
    throw new RangeError(
      `prompt length ${promptLength} + seqLen ${seqLen}${prefix ? ` + prefix ${prefix}` : ""}${more} exceeds the model's ${c.maxPositions} positions`,
    );
  }
  // The longest row set a layer attends over: hidden deep prompts add their rows to their layer's.
  const deep = options.deepPrompts;
  const deepRows =
    deep?.kind === "hidden" ? Math.max(0, ...deep.vectors.map((v) => v.length / c.hiddenSize)) : 0;
  const attended = positions + prefix + deepRows + generated;
  if (c.slidingWindow !== undefined && attended > c.slidingWindow) {
    throw new RangeError(
      `sequence of ${attended} positions (prompt, tokens${prefix ? ", prefix" : ""}${deepRows ? ", deep prompt rows" : ""}${more ? ", generated tokens" : ""}) exceeds the sliding window (${c.slidingWindow}), which priortune does not implement`,
    );
  }
  return {
    inputIds,
    batch,
    seqLen,
    attentionMask,
    labels,
    prompt: options.prompt,
    deepPrompts: options.deepPrompts,
    positions,
  };
}
