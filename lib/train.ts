// The prompt-tuning loop: a prior initialises the prompt, AdamW trains it on a task, evaluation and
// collapse metrics are recorded along the way, and a run directory keeps everything needed to reproduce
// or resume it. The heavy work (loss, gradients, AdamW, generation, collapse search) is native.
import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  statSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { type CollapseReference, createCollapseReference } from "./collapse.js";
import { appendToFile, atomicWrite, ensureDir, lockDirectory, readJsonFile } from "./files.js";
import { arithmeticCorrect, exactMatch, f1Score } from "./metrics.js";
import type { LossAndGrad, Model } from "./model.js";
import type { DeepPrompts } from "./native.js";
import { AdamW, promptGrads, promptTensors } from "./optim.js";
import { createRegularizer, type Prior, type Regularizer, type RegularizerSpec } from "./priors.js";
import { Rng, type RngState } from "./rng.js";
import { readTensors, type TensorToWrite, writeSafetensorsAtomic } from "./safetensors.js";
import { type Example, encodeExample, type Task, withRecordedSplit } from "./tasks.js";
import { endOfTextId } from "./tokenizer.js";
import { checkOptions, checkRequiredOptions, definedOnly, type OptionKeys } from "./validate.js";

export type TuneMode = "soft" | "deep-hidden" | "deep-prefix";
export type Schedule = "constant" | "linear" | "cosine";

export interface OptimizerOptions {
  lr?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** Learning-rate schedule after the warm-up (default constant). */
  schedule?: Schedule;
  warmupSteps?: number;
  /** Clip the global gradient norm to this value, as torch's clip_grad_norm_ (default: no clipping). */
  clipNorm?: number;
  /**
   * Micro-batches combined into one update (default 1): loss and gradient are the mean over all their
   * labelled tokens, as one batch holding them all would give.
   */
  accumulate?: number;
  /**
   * Learning rate of the deep prompts (deep-hidden vectors, deep-prefix keys and values; default lr): the
   * paper trains activation-space vectors at 1e-3 beside token-space ones at 5e-3. The schedule scales
   * both alike.
   */
  deepLr?: number;
}

const OPTIMIZER_KEYS = {
  lr: true,
  beta1: true,
  beta2: true,
  eps: true,
  weightDecay: true,
  schedule: true,
  warmupSteps: true,
  clipNorm: true,
  accumulate: true,
  deepLr: true,
} satisfies OptionKeys<OptimizerOptions>;

export interface RegularizerOptions {
  /**
   * The penalty on the soft prompt: a Regularizer, or its spec ({ kind: "prior-nll" | "l2-init" |
   * "nearest-vocab" }), which tune builds with the run's prior, initial prompt and vocabulary.
   */
  regularizer: Regularizer | RegularizerSpec;
  /** Weight λ of the regulariser in the loss. */
  lambda: number;
  /** λ over training: constant, or ramped linearly from 0 to λ over the run (default constant). */
  schedule?: "constant" | "linear";
}

const REGULARIZER_KEYS = {
  regularizer: true,
  lambda: true,
  schedule: true,
} satisfies OptionKeys<RegularizerOptions>;

export interface TuneOptions {
  model: Model;
  task: Task;
  prior: Prior;
  mode?: TuneMode;
  /** Soft-prompt length P (default 20). */
  promptLength?: number;
  /** Layers of the deep prompts (deep modes; default the last three, as the paper). */
  deepLayers?: number[];
  /** Deep-prompt length per layer (default promptLength). */
  deepLength?: number;
  /** Standard deviation of the initial prefix keys and values (deep-prefix; default 0.02). */
  prefixInitStd?: number;
  /**
   * Prior of the deep-hidden vectors (default `prior`): one for every layer, or one per layer in
   * `deepLayers` order, e.g. Gaussians fitted to each layer's input activations (the vectors are
   * prepended to that input, whose scale differs from the token embeddings' by orders of magnitude).
   */
  deepPrior?: Prior | Prior[];
  optimizer?: OptimizerOptions;
  regularizer?: RegularizerOptions;
  steps: number;
  batchSize?: number;
  /** Evaluate every N steps (and at the end); 0 = only at the end (default 0). */
  evalEvery?: number;
  /**
   * A convergence criterion: stop before `steps` once the validation loss has not improved for `patience`
   * evaluations in a row (improved: below the best so far by more than `minDelta` of it, default 0). Needs
   * evalEvery. The run then ends as a finished one at that step (prompt.safetensors, `stoppedEarly`), and
   * rerunning its directory does not train further.
   */
  earlyStopping?: { patience: number; minDelta?: number };
  /** Validation examples used per evaluation (default all). */
  evalExamples?: number;
  /** Tokens generated per validation example for task metrics (default 16). */
  maxNewTokens?: number;
  /**
   * Validation examples decoded together for the task metrics (default 16; the loss pass runs at
   * batchSize). Decoding is weight-bound, so larger groups are cheaper per example: on the CPU up to 32 rows
   * share each pass over the weights.
   */
  generationBatchSize?: number;
  /** Collapse metrics of the soft prompt every N steps (default: at evaluations only). */
  collapseEvery?: number;
  /** Prompt snapshots (the trajectory) every N steps (default 10). */
  snapshotEvery?: number;
  /** Resumable checkpoints every N steps (default 10). */
  checkpointEvery?: number;
  /** Longest encoded example; longer prompts are cut from the left (default 256 positions with the prompt). */
  maxLength?: number;
  /**
   * Put the tokenizer's special tokens (Llama 3's BOS) before each text, as Transformers' `tokenizer(text)`
   * and the activation priors do (default true; tokenizers without such tokens, GPT-2's, are unaffected).
   * A run directory recorded before this option existed resumes without them, as it was trained.
   */
  addSpecialTokens?: boolean;
  seed?: number;
  /** Where the run is written (and resumed from). Without it nothing is written. */
  runDir?: string;
  onStep?: (record: StepRecord) => void;
  onEval?: (record: EvalRecord) => void;
  /** Progress of an evaluation: batches done of the total (loss batches, then generation batches). */
  onEvalProgress?: (done: number, total: number) => void;
  /** A long phase starting that no other callback shows (building the collapse reference: minutes at 128k x 2048). */
  onStatus?: (message: string) => void;
  /**
   * Stops the run at the next step boundary: with runDir, the steps done since the last checkpoint are
   * checkpointed first (the same call resumes from there); the promise then rejects ("tune: aborted at step N").
   */
  signal?: AbortSignal;
}

const TUNE_KEYS = {
  model: true,
  task: true,
  prior: true,
  mode: true,
  promptLength: true,
  deepLayers: true,
  deepLength: true,
  prefixInitStd: true,
  deepPrior: true,
  optimizer: true,
  regularizer: true,
  steps: true,
  batchSize: true,
  evalEvery: true,
  earlyStopping: true,
  evalExamples: true,
  maxNewTokens: true,
  generationBatchSize: true,
  collapseEvery: true,
  snapshotEvery: true,
  checkpointEvery: true,
  maxLength: true,
  addSpecialTokens: true,
  seed: true,
  runDir: true,
  onStep: true,
  onEval: true,
  onEvalProgress: true,
  onStatus: true,
  signal: true,
} satisfies OptionKeys<TuneOptions>;

const EARLY_STOPPING_KEYS = { patience: true, minDelta: true } satisfies OptionKeys<
  NonNullable<TuneOptions["earlyStopping"]>
>;

export interface StepRecord {
  type: "step";
  step: number;
  loss: number;
  taskLoss: number;
  regularizer: number | null;
  lr: number;
  gradNorm: number;
  tokens: number;
  ms: number;
}

export interface EvalRecord {
  type: "eval";
  step: number;
  validationLoss: number;
  exactMatch?: number;
  f1?: number;
  accuracy?: number;
  collapse?: {
    collapseRate: number;
    meanNearestCosine: number;
    meanDivergence: number;
    projectedPrompt: string | null;
  };
  ms: number;
}

export interface TuneResult {
  prompt?: Float32Array;
  deepPrompts?: DeepPrompts;
  steps: number;
  lastLoss: number;
  evals: EvalRecord[];
  runDir?: string;
  resumedFrom?: number;
  /** The run ended before `steps` by its earlyStopping criterion (at `steps` of this result). */
  stoppedEarly?: boolean;
}

/**
 * Whether the validation losses of `evals` (in order) ended `patience` evaluations in a row without an
 * improvement: a loss below the best before it by more than `minDelta` of that best.
 */
export function plateaued(evals: readonly EvalRecord[], patience: number, minDelta = 0): boolean {
  let best = Number.POSITIVE_INFINITY;
  let stale = 0;
  for (const e of evals) {
    if (!Number.isFinite(e.validationLoss)) continue; // collapse-only records carry no loss
    if (e.validationLoss < best - minDelta * Math.abs(best) || best === Number.POSITIVE_INFINITY) {
      best = e.validationLoss;
      stale = 0;
    } else stale++;
  }
  return stale >= patience;
}

interface Encoded {
  ids: Int32Array;
  labels: Int32Array;
}

interface Batch {
  inputIds: Int32Array;
  labels: Int32Array;
  attentionMask: Uint8Array;
  batch: number;
  seqLen: number;
  tokens: number;
}

/** Right-pads a group of encoded examples into one batch (pad id 0, mask 0, label -100). */
export function collate(group: { ids: Int32Array; labels: Int32Array }[]): Batch {
  const seqLen = Math.max(...group.map((e) => e.ids.length));
  const n = group.length;
  const inputIds = new Int32Array(n * seqLen);
  const labels = new Int32Array(n * seqLen).fill(-100);
  const attentionMask = new Uint8Array(n * seqLen);
  let tokens = 0;
  group.forEach((e, i) => {
    inputIds.set(e.ids, i * seqLen);
    labels.set(e.labels, i * seqLen);
    attentionMask.fill(1, i * seqLen, i * seqLen + e.ids.length);
    tokens += e.ids.length;
  });
  return { inputIds, labels, attentionMask, batch: n, seqLen, tokens };
}

/** A batch's arrays and shape as the model's calls take them (without the token count). */
function modelBatch(b: Batch): Omit<Batch, "tokens"> {
  const { tokens: _, ...rest } = b;
  return rest;
}

/**
 * Length-bucketed batches: examples sorted by length (stable), cut into batches of `size`, so padding
 * stays small; the order of the batches is shuffled with `rng` each epoch.
 */
export function bucketBatches(lengths: number[], size: number): number[][] {
  const order = lengths.map((l, i) => [l, i] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const batches: number[][] = [];
  for (let i = 0; i < order.length; i += size) batches.push(order.slice(i, i + size).map(([, j]) => j));
  return batches;
}

/** JSON with object keys sorted at every level: equal values give equal text whatever the key order. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v) =>
    v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(
          Object.keys(v)
            .sort()
            .map((k) => [k, (v as Record<string, unknown>)[k]]),
        )
      : v,
  );
}

/**
 * Positions left for an example's tokens when `maxLength` also holds the soft prompt (P vectors) and, in
 * deep-prefix mode, the prefix (its keys and values take positions in every prefixed layer's attention).
 */
export function textBudget(maxLength: number, P: number, mode: TuneMode, deepLength: number): number {
  return maxLength - P - (mode === "deep-prefix" ? deepLength : 0);
}

/** One micro-batch's mean loss over its `count` labelled tokens, and the gradients of that mean. */
export interface MicroBatch {
  loss: number;
  count: number;
  grads: Float32Array[];
}

/**
 * Gradient accumulation: adds into `into` (zeroed, one array per tensor) the gradient of the mean loss over
 * every labelled token of the micro-batches (each micro-batch's gradient weighted by its share of the
 * tokens), and returns that mean loss.
 */
export function combineMicroBatches(parts: MicroBatch[], into: Float32Array[]): number {
  const labelled = parts.reduce((n, p) => n + p.count, 0);
  let loss = 0;
  for (const part of parts) {
    const w = labelled > 0 ? part.count / labelled : 1 / parts.length;
    loss += w * part.loss;
    part.grads.forEach((g, i) => {
      const acc = into[i]!;
      for (let k = 0; k < acc.length; k++) acc[k] += w * g[k]!;
    });
  }
  return loss;
}

/** An integer option >= min, else a RangeError naming it. */
function countOption(name: string, value: number, min: number): number {
  if (!Number.isInteger(value) || value < min)
    throw new RangeError(
      `${name}: expected an integer >= ${min}, got ${typeof value === "number" ? value : `${typeof value} ${JSON.stringify(value)}`}`,
    );
  return value;
}

// The model, task and prior arguments of tune and evaluatePrompt: their shape, before any work.
function checkModelArg(model: unknown): void {
  const m = model as Model | null | undefined;
  if (typeof m !== "object" || m === null || typeof m.forward !== "function" || typeof m.config !== "object")
    throw new TypeError(`model: expected a Model (loadModel), got ${m === null ? "null" : typeof m}`);
}

function checkTaskArg(task: unknown): void {
  const t = task as Task | null | undefined;
  if (typeof t !== "object" || t === null || !Array.isArray(t.train) || !Array.isArray(t.validation))
    throw new TypeError(`task: expected a Task (loadTask), got ${t === null ? "null" : typeof t}`);
}

function checkPriorArg(prior: unknown): void {
  const p = prior as Prior | null | undefined;
  if (typeof p !== "object" || p === null || typeof p.sample !== "function" || typeof p.dim !== "number")
    throw new TypeError(`prior: expected a Prior (createPrior), got ${p === null ? "null" : typeof p}`);
}

// The deep-prompt settings of a run, checked before anything is written (the model only sees them at the
// first forward, after run.json).
function checkDeepSettings(options: TuneOptions, numLayers: number, mode: TuneMode): void {
  const layers: unknown = options.deepLayers;
  if (layers !== undefined) {
    if (!Array.isArray(layers))
      throw new TypeError(
        `deepLayers: expected an array of layer indices, got ${typeof layers} ${JSON.stringify(layers)}`,
      );
    if (layers.length === 0 && mode !== "soft")
      throw new RangeError("deepLayers: expected at least one layer index");
    const seen = new Set<number>();
    for (const [i, l] of layers.entries()) {
      if (typeof l !== "number" || !Number.isInteger(l) || l < 0 || l >= numLayers)
        throw new RangeError(
          `deepLayers[${i}] = ${JSON.stringify(l)}: expected an integer in 0..${numLayers - 1} (the model has ${numLayers} layers)`,
        );
      if (seen.has(l)) throw new RangeError(`deepLayers: layer ${l} is repeated`);
      seen.add(l);
    }
  }
  if (options.deepLength !== undefined) countOption("deepLength", options.deepLength, 1);
  const std: unknown = options.prefixInitStd;
  if (std !== undefined && !(typeof std === "number" && Number.isFinite(std) && std >= 0))
    throw new RangeError(
      `prefixInitStd: expected a finite number >= 0, got ${typeof std === "number" ? std : `${typeof std} ${JSON.stringify(std)}`}`,
    );
}

export function learningRate(
  step: number,
  steps: number,
  lr: number,
  schedule: Schedule,
  warmup: number,
): number {
  if (warmup > 0 && step < warmup) return (lr * (step + 1)) / warmup;
  const span = Math.max(1, steps - warmup);
  const progress = Math.min(1, (step - warmup) / span);
  if (schedule === "linear") return lr * (1 - progress);
  if (schedule === "cosine") return lr * 0.5 * (1 + Math.cos(Math.PI * progress));
  return lr;
}

function norm(arrays: Float32Array[]): number {
  let s = 0;
  for (const a of arrays) for (let i = 0; i < a.length; i++) s += a[i]! * a[i]!;
  return Math.sqrt(s);
}

/** A fingerprint of a model directory: config.json, and each weight file's name, safetensors header and size. */
export function modelFingerprint(dir: string): string {
  const h = createHash("sha256");
  h.update(readFileSync(join(dir, "config.json")));
  for (const f of readdirSync(dir).sort()) {
    if (!f.endsWith(".safetensors")) continue;
    const path = join(dir, f);
    const size = statSync(path).size;
    const fd = openSync(path, "r");
    try {
      const len = Buffer.alloc(8);
      readSync(fd, len, 0, 8, 0);
      const headerLen = Math.min(Number(len.readBigUInt64LE(0)), size - 8);
      const header = Buffer.alloc(headerLen);
      readSync(fd, header, 0, headerLen, 8);
      h.update(f);
      h.update(header);
      h.update(String(size));
    } finally {
      closeSync(fd);
    }
  }
  return h.digest("hex");
}

const PACKAGE_VERSION = "0.1.0";

interface Checkpoint {
  step: number;
  rng: RngState;
  epochBatches: number[][];
  epochCursor: number;
  optimizerStep: number;
  metricsBytes: number;
  lastLoss: number;
  evals: EvalRecord[];
}

/** The deep layers when none are given: the last three, as the paper. */
export function defaultDeepLayers(numLayers: number): number[] {
  return [numLayers - 3, numLayers - 2, numLayers - 1].filter((l) => l >= 0);
}

// The deep-hidden vectors' priors, one per deep layer: `given` (one for all, or one per layer), else the
// run's prior. Checked here: count and dimension; only deep-hidden runs draw from them.
function deepPriorsFor(
  given: Prior | Prior[] | undefined,
  prior: Prior,
  mode: TuneMode,
  layers: number,
  dim: number,
): Prior[] {
  if (given === undefined) return Array.from({ length: layers }, () => prior);
  if (mode !== "deep-hidden")
    throw new TypeError(
      `deepPrior: only deep-hidden runs draw deep vectors from a prior (mode is "${mode}")`,
    );
  const list = Array.isArray(given) ? given : Array.from({ length: layers }, () => given);
  if (list.length !== layers)
    throw new RangeError(
      `deepPrior: expected one prior or ${layers} (one per deep layer), got ${list.length}`,
    );
  for (const [i, p] of list.entries()) {
    if (typeof p?.sample !== "function") throw new TypeError(`deepPrior[${i}]: expected a Prior`);
    if (p.dim !== dim)
      throw new RangeError(`deepPrior[${i}]: its dimension ${p.dim} is not the model's hidden size ${dim}`);
  }
  return list;
}

/** Runs (or resumes) prompt-tuning. See TuneOptions; everything is reproducible from the seed. */
export async function tune(options: TuneOptions): Promise<TuneResult> {
  checkRequiredOptions(options, "tune options", TUNE_KEYS);
  const { model, task, prior } = options;
  checkModelArg(model);
  checkTaskArg(task);
  checkPriorArg(prior);
  const c = model.config;
  const mode = options.mode ?? "soft";
  if (mode !== "soft" && mode !== "deep-hidden" && mode !== "deep-prefix") {
    throw new TypeError(`mode: expected "soft", "deep-hidden" or "deep-prefix", got ${JSON.stringify(mode)}`);
  }
  const P = options.promptLength ?? 20;
  const steps = options.steps;
  if (!Number.isInteger(steps) || steps < 1)
    throw new RangeError(`steps: expected a positive integer, got ${steps}`);
  if (!Number.isInteger(P) || P < (mode === "deep-prefix" ? 0 : 1))
    throw new RangeError(`promptLength: expected a positive integer, got ${P}`);
  if (prior.dim !== c.hiddenSize) {
    throw new RangeError(`prior: its dimension ${prior.dim} is not the model's hidden size ${c.hiddenSize}`);
  }
  const batchSize = countOption("batchSize", options.batchSize ?? 2, 1);
  const optimizer = checkOptions(options.optimizer, "tune options.optimizer", OPTIMIZER_KEYS);
  const opt = {
    lr: 5e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weightDecay: 0.01,
    schedule: "constant" as Schedule,
    warmupSteps: 0,
    accumulate: 1,
    ...definedOnly(optimizer),
  };
  countOption("optimizer.accumulate", opt.accumulate, 1);
  countOption("optimizer.warmupSteps", opt.warmupSteps, 0);
  if (!["constant", "linear", "cosine"].includes(opt.schedule))
    throw new TypeError(
      `optimizer.schedule: expected "constant", "linear" or "cosine", got ${JSON.stringify(opt.schedule)}`,
    );
  if (opt.clipNorm !== undefined && !(Number.isFinite(opt.clipNorm) && opt.clipNorm > 0))
    throw new RangeError(
      `optimizer.clipNorm: expected a finite number > 0 (leave it out for none), got ${opt.clipNorm}`,
    );
  if (opt.deepLr !== undefined) {
    if (mode === "soft") throw new TypeError("optimizer.deepLr: a soft-prompt run has no deep prompts");
    if (!(Number.isFinite(opt.deepLr) && opt.deepLr >= 0))
      throw new RangeError(`optimizer.deepLr: expected a finite number >= 0, got ${opt.deepLr}`);
    if (!(opt.lr > 0))
      throw new RangeError("optimizer.deepLr: needs lr > 0 (it is applied as a factor on lr's schedule)");
  }
  checkDeepSettings(options, c.numLayers, mode);
  const deepLayers = options.deepLayers ?? defaultDeepLayers(c.numLayers);
  const deepLength = options.deepLength ?? (P > 0 ? P : 20);
  const seed = options.seed ?? 0;
  // The generator takes 32 bits: a seed outside them would repeat another seed's run under its own name.
  if (!Number.isInteger(seed) || seed < 0 || seed > 2 ** 32 - 1)
    throw new RangeError(`seed: expected an integer from 0 to 2^32 - 1, got ${seed}`);
  const evalEvery = countOption("evalEvery", options.evalEvery ?? 0, 0);
  const early =
    options.earlyStopping === undefined
      ? undefined
      : checkOptions(options.earlyStopping, "tune options.earlyStopping", EARLY_STOPPING_KEYS);
  if (early !== undefined) {
    countOption("earlyStopping.patience", early.patience, 1);
    const d = early.minDelta ?? 0;
    if (!(Number.isFinite(d) && d >= 0 && d < 1))
      throw new RangeError(`earlyStopping.minDelta: expected a number in [0, 1), got ${d}`);
    if (evalEvery === 0)
      throw new RangeError("earlyStopping: needs evalEvery > 0 (it watches the validation loss)");
  }
  const snapshotEvery = countOption("snapshotEvery", options.snapshotEvery ?? 10, 0);
  const checkpointEvery = countOption("checkpointEvery", options.checkpointEvery ?? 10, 0);
  if (options.collapseEvery !== undefined) countOption("collapseEvery", options.collapseEvery, 0);
  if (options.evalExamples !== undefined) countOption("evalExamples", options.evalExamples, 1);
  const maxNewTokens = countOption("maxNewTokens", options.maxNewTokens ?? 16, 1);
  if (options.generationBatchSize !== undefined)
    countOption("generationBatchSize", options.generationBatchSize, 1);
  // GPT-2's positions are learned: a longer sequence cannot run (it failed at the final evaluation, after
  // training, before its last checkpoint). Its default fits them.
  const gpt2Positions = c.architecture === "gpt2" ? c.maxPositions : Number.POSITIVE_INFINITY;
  const maxLength = countOption("maxLength", options.maxLength ?? Math.min(256, gpt2Positions), 1);
  if (maxLength > gpt2Positions)
    throw new RangeError(
      `maxLength: ${maxLength} exceeds the model's ${gpt2Positions} positions (GPT-2's are learned)`,
    );
  if (options.regularizer !== undefined) {
    checkRequiredOptions(options.regularizer, "tune options.regularizer", REGULARIZER_KEYS);
    const { lambda, schedule = "constant" } = options.regularizer;
    if (!(Number.isFinite(lambda) && lambda >= 0))
      throw new RangeError(`regularizer.lambda: expected a finite number >= 0, got ${lambda}`);
    if (schedule !== "constant" && schedule !== "linear")
      throw new TypeError(
        `regularizer.schedule: expected "constant" or "linear", got ${JSON.stringify(schedule)}`,
      );
  }
  const tokenizer = model.tokenizer;
  if (!tokenizer) throw new Error(`model ${model.dir} has no tokenizer; tune needs one to encode the task`);
  if (options.addSpecialTokens !== undefined && typeof options.addSpecialTokens !== "boolean")
    throw new TypeError(`addSpecialTokens: expected a boolean, got ${String(options.addSpecialTokens)}`);
  // A run directory's run.json says how its texts were encoded: one recorded before addSpecialTokens
  // existed encoded without special tokens.
  const recordedRun =
    options.runDir && existsSync(join(options.runDir, "run.json"))
      ? (readJsonFile(join(options.runDir, "run.json")) as Record<string, unknown>)
      : undefined;
  const addSpecialTokens =
    options.addSpecialTokens ?? (recordedRun ? recordedRun["addSpecialTokens"] === true : true);
  // How examples become tokens: a run directory keeps the encoding it was recorded with (1 when run.json
  // predates the field).
  const encoding = recordedRun ? Number(recordedRun["encoding"] ?? 1) : TEXT_ENCODING;
  // Examples decoded together at evaluation; a run directory recorded before the option decoded its batches.
  const generationBatchSize =
    options.generationBatchSize ??
    (recordedRun ? Number(recordedRun["generationBatchSize"] ?? recordedRun["batchSize"] ?? 16) : 16);
  const encodeOptions = textEncoding(model, task, encoding, addSpecialTokens);
  const { eosId } = encodeOptions;

  // Initial tensors from the prior (a fixed draw order: soft prompt, then each deep layer).
  const rng = new Rng(seed);
  const prompt = mode === "deep-prefix" && P === 0 ? undefined : prior.sample(P, rng);
  let deepPrompts: DeepPrompts | undefined;
  const deepPriors = deepPriorsFor(options.deepPrior, prior, mode, deepLayers.length, c.hiddenSize);
  if (mode === "deep-hidden") {
    deepPrompts = {
      kind: "hidden",
      layers: deepLayers,
      vectors: deepLayers.map((_, i) => deepPriors[i]!.sample(deepLength, rng)),
    };
  } else if (mode === "deep-prefix") {
    const per = deepLength * c.numKvHeads * c.headDim;
    const std = options.prefixInitStd ?? 0.02;
    const draw = () => new Float32Array(per).map(() => rng.normal() * std);
    deepPrompts = {
      kind: "prefix",
      layers: deepLayers,
      keys: deepLayers.map(draw),
      values: deepLayers.map(draw),
    };
  }
  const tensors: Float32Array[] = [];
  if (prompt) tensors.push(prompt);
  if (deepPrompts?.kind === "hidden") tensors.push(...deepPrompts.vectors);
  if (deepPrompts?.kind === "prefix") tensors.push(...deepPrompts.keys, ...deepPrompts.values);
  const initial = tensors.map((t) => t.slice());
  // The deep tensors' rate as a factor on lr (the schedule scales both alike), as PyTorch's param groups.
  const deepScale = opt.deepLr === undefined ? 1 : opt.deepLr / opt.lr;
  const adamw = new AdamW(tensors, {
    lr: opt.lr,
    beta1: opt.beta1,
    beta2: opt.beta2,
    eps: opt.eps,
    weightDecay: opt.weightDecay,
    lrScale: tensors.map((t) => (t === prompt ? 1 : deepScale)),
  });
  let regularizer: Regularizer | undefined;
  let ownsRegularizer = false;
  if (options.regularizer) {
    if (!prompt)
      throw new TypeError("regularizer: it acts on the soft prompt, and this run has none (promptLength 0)");
    const r = options.regularizer.regularizer;
    if (typeof (r as Regularizer).valueAndGradient === "function") regularizer = r as Regularizer;
    else {
      const spec = r as RegularizerSpec;
      regularizer = createRegularizer(spec, {
        prior,
        init: initial[0],
        // A transient copy: the regulariser's index takes its own and keeps no reference to this one.
        vocab: spec.kind === "nearest-vocab" ? model.tokenEmbeddings() : undefined,
        dim: c.hiddenSize,
        threads: model.threads,
      });
      ownsRegularizer = true;
    }
  }
  let collapseRef: CollapseReference | undefined;
  let releaseLock = () => {};
  try {
    // Data: encoded once; prompt positions count against maxLength. Plain-text tasks (metric "none", C4)
    // keep the first tokens of a document longer than the budget.
    const budget = textBudget(maxLength, prompt ? P : 0, mode, deepLength);
    const positions = `maxLength ${maxLength} less ${prompt ? P : 0} prompt${mode === "deep-prefix" ? ` and ${deepLength} prefix` : ""} positions`;
    if (budget < 1) throw new RangeError(`maxLength: ${positions} leaves no room for the text`);
    if (task.metric !== "none" && budget - maxNewTokens < 1)
      throw new RangeError(
        `maxNewTokens: ${positions} leaves ${budget}, no room for a question before ${maxNewTokens} generated tokens`,
      );
    const encode = (ex: Example): Encoded => {
      const e = encodeExample(tokenizer, ex, { ...encodeOptions, maxLength: budget });
      return { ids: e.ids, labels: e.labels };
    };
    const train = task.train.map(encode);
    if (train.length === 0) throw new Error(`task ${task.name}: no training examples`);
    // The examples every evaluation scores, encoded now as evaluatePrompt will: one that does not fit would
    // otherwise fail the first evaluation, by default the final one, after all the training.
    for (const [i, ex] of task.validation.slice(0, options.evalExamples).entries()) {
      try {
        encode(ex);
      } catch (e) {
        throw new RangeError(`task ${task.name}: validation example ${i + 1}: ${(e as Error).message}`);
      }
    }
    if (early && task.validation.length === 0)
      throw new RangeError(`earlyStopping: task ${task.name} has no validation examples to watch`);
    // Validation asked for but none left (a small file whose examples trainCount took): every evaluation
    // would be NaN. validationCount 0, asked for, trains without scores.
    const described = task.describe();
    if (task.validation.length === 0 && described.validationCount !== 0)
      throw new RangeError(
        `task ${task.name}: no validation examples (${described.validationPath ? "the validation file has none" : `trainCount took all ${train.length} the source has`}); ` +
          "lower trainCount, give a validation file (validationPath), or set validationCount 0 to train without scores",
      );

    // Run directory and resume.
    const runDir = options.runDir;
    const runRecord = {
      version: 1,
      package: { name: "priortune", version: PACKAGE_VERSION },
      model: { dir: model.dir, fingerprint: modelFingerprint(model.dir), architecture: c.hfArchitecture },
      task: task.describe(),
      prior: prior.describe(),
      deepPriors: options.deepPrior === undefined ? null : deepPriors.map((p) => p.describe()),
      mode,
      promptLength: P,
      deepLayers: mode === "soft" ? null : deepLayers,
      deepLength: mode === "soft" ? null : deepLength,
      prefixInitStd: mode === "deep-prefix" ? (options.prefixInitStd ?? 0.02) : null,
      optimizer: opt,
      regularizer:
        regularizer && options.regularizer
          ? {
              ...regularizer.describe(),
              lambda: options.regularizer.lambda,
              schedule: options.regularizer.schedule ?? "constant",
            }
          : null,
      steps,
      batchSize,
      evalEvery,
      earlyStopping: early ? { patience: early.patience, minDelta: early.minDelta ?? 0 } : null,
      evalExamples: options.evalExamples ?? null,
      collapseEvery: options.collapseEvery ?? null,
      maxNewTokens,
      generationBatchSize,
      maxLength,
      addSpecialTokens,
      encoding,
      eosId: eosId ?? null,
      seed,
      threads: model.threads,
    };
    let state: Checkpoint = {
      step: 0,
      rng: rng.state(),
      epochBatches: [],
      epochCursor: 0,
      optimizerStep: 0,
      metricsBytes: 0,
      lastLoss: Number.NaN,
      evals: [],
    };
    let resumedFrom: number | undefined;
    const metricsPath = runDir ? join(runDir, "metrics.jsonl") : "";
    if (runDir) {
      ensureDir(join(runDir, "snapshots"));
      // One process at a time: a second tune on the directory (the first not dead yet) interleaved metrics.
      releaseLock = lockDirectory(runDir, "the run directory");
      const runJson = join(runDir, "run.json");
      const checkpointJson = join(runDir, "checkpoint.json");
      if (existsSync(runJson)) {
        // Read once, above (it set the encoding); a run.json written since then is read now.
        const previous = { ...(recordedRun ?? (readJsonFile(runJson) as Record<string, unknown>)) };
        // Fields this version records that an older run.json lacks are not a difference (they were not
        // recorded then); key order is not either. A task recorded before `split` existed is compared with
        // the split it was divided by (withRecordedSplit; loadRecordedTask reloads it so).
        const previousTask = previous["task"] as Record<string, unknown> | undefined;
        if (previousTask) previous["task"] = withRecordedSplit(previousTask);
        previous["addSpecialTokens"] ??= false; // encoded without them before the option existed
        previous["encoding"] ??= 1;
        const comparable: Record<string, unknown> = { ...runRecord, ...previous };
        const differing = Object.keys(comparable).filter(
          (k) => canonicalJson(comparable[k]) !== canonicalJson((runRecord as Record<string, unknown>)[k]),
        );
        if (differing.length > 0) {
          // A task differing only in its split: the run was recorded train first (specForRunDirs says so).
          const { split: was, ...restWas } = (comparable["task"] ?? {}) as Record<string, unknown>;
          const { split: now, ...restNow } = runRecord.task as Record<string, unknown>;
          const onlySplit =
            differing.length === 1 && was !== now && canonicalJson(restWas) === canonicalJson(restNow);
          throw new Error(
            `${runDir} holds a different run (run.json differs in ${differing.join(", ")}` +
              `${onlySplit ? `: its task's split is "${was}", this one's "${now}"; load the task with split: "${was}" (specForRunDirs does) to resume it` : ""}); ` +
              "use a new runDir or delete it",
          );
        }
        const checkpointTensors = join(runDir, "checkpoint.safetensors");
        const saved = existsSync(checkpointTensors) ? readTensors(checkpointTensors) : undefined;
        // The state is written with the tensors, in one file; runs written before kept it in
        // checkpoint.json alone, which must then exist and be of the tensors' step.
        const usable = saved && (saved.metadata.state !== undefined || existsSync(checkpointJson));
        if (saved && usable) {
          const metadata = saved.metadata;
          if (metadata.state !== undefined) state = JSON.parse(metadata.state) as Checkpoint;
          else {
            state = JSON.parse(readFileSync(checkpointJson, "utf8")) as Checkpoint;
            if (metadata.step !== String(state.step))
              throw new Error(
                `${runDir}: checkpoint.json (step ${state.step}) and checkpoint.safetensors (step ${metadata.step}) ` +
                  "are of different steps (the run stopped between writing them); delete both to restart the run",
              );
          }
          const got = saved.tensors;
          tensors.forEach((t, i) => {
            t.set(got.get(`param.${i}`)!.data as Float32Array);
            adamw.m[i]!.set(got.get(`m.${i}`)!.data as Float32Array);
            adamw.v[i]!.set(got.get(`v.${i}`)!.data as Float32Array);
          });
          for (const [i, t] of initial.entries()) t.set(got.get(`init.${i}`)!.data as Float32Array);
          adamw.stepCount = state.optimizerStep;
          if (existsSync(metricsPath)) truncateSync(metricsPath, state.metricsBytes);
          resumedFrom = state.step;
        } else {
          // Stopped before its first checkpoint: the run starts again, and so do its metrics.
          writeFileSync(metricsPath, "");
        }
      } else {
        atomicWrite(runJson, `${JSON.stringify(runRecord, null, 2)}\n`);
        writeFileSync(metricsPath, "");
      }
    }
    const rngNow = new Rng(state.rng);

    const appendMetrics = (record: StepRecord | EvalRecord) => {
      if (!runDir) return;
      appendToFile(metricsPath, `${JSON.stringify(record)}\n`);
    };
    const names = tensorNames(prompt, deepPrompts);
    const saveTensors = (path: string, step: number, kind: string) => {
      writeSafetensorsAtomic(
        path,
        tensors.map((t, i) => ({
          name: names[i]!,
          dtype: "F32" as const,
          shape: tensorShape(names[i]!, t.length, c),
          data: t,
        })),
        {
          format: "priortune-prompt",
          version: "1",
          kind,
          step: String(step),
          mode,
          run: JSON.stringify({ prior: runRecord.prior, task: task.name, seed }),
        },
      );
    };
    let checkpointed = state.step;
    const checkpoint = () => {
      if (!runDir) return;
      checkpointed = state.step;
      state.rng = rngNow.state();
      state.optimizerStep = adamw.stepCount;
      state.metricsBytes = statSync(metricsPath).size;
      const list: TensorToWrite[] = [];
      tensors.forEach((t, i) => {
        list.push({ name: `param.${i}`, dtype: "F32", shape: [t.length], data: t });
        list.push({ name: `m.${i}`, dtype: "F32", shape: [t.length], data: adamw.m[i]! });
        list.push({ name: `v.${i}`, dtype: "F32", shape: [t.length], data: adamw.v[i]! });
        list.push({ name: `init.${i}`, dtype: "F32", shape: [t.length], data: initial[i]! });
      });
      // The state goes in the tensors' file (one atomic rename holds both, so a resume cannot pair one
      // step's tensors with another's state); checkpoint.json repeats it for tools that read the step.
      writeSafetensorsAtomic(join(runDir, "checkpoint.safetensors"), list, {
        step: String(state.step),
        state: JSON.stringify(state),
      });
      atomicWrite(join(runDir, "checkpoint.json"), JSON.stringify(state));
    };

    // The collapse reference, built once per run (an evaluation that builds it counts the time in its ms).
    const reference = async () => {
      if (!collapseRef) {
        options.onStatus?.(COLLAPSE_STATUS);
        collapseRef = await createCollapseReference(model, { seed });
      }
      return collapseRef;
    };
    const evaluate = async (step: number): Promise<EvalRecord> => {
      const t0 = performance.now();
      if (prompt) await reference();
      const built = performance.now() - t0;
      const record = await evaluatePrompt({
        model,
        task,
        prompt,
        deepPrompts,
        batchSize,
        maxNewTokens,
        generationBatchSize,
        evalExamples: options.evalExamples,
        maxLength: budget,
        addSpecialTokens,
        encoding,
        step,
        collapseReference: collapseRef,
        onProgress: options.onEvalProgress,
      });
      record.ms += built;
      return record;
    };

    // On CUDA a step that is loss + clipping + AdamW alone stays on the device (PromptTrainer: tensors, gradients
    // and AdamW moments never leave it, and a repeated batch shape replays a CUDA graph); the host copies are
    // refreshed only where something reads them (evaluation, collapse metrics, snapshots, checkpoints, the
    // result). A regulariser or gradient accumulation combine gradients on the host and take the host path.
    const trainer =
      model.backend === "cuda" && !regularizer && opt.accumulate === 1 && deepScale === 1
        ? await model.promptTrainer(
            { prompt, deepPrompts },
            {
              lr: opt.lr,
              beta1: opt.beta1,
              beta2: opt.beta2,
              eps: opt.eps,
              weightDecay: opt.weightDecay,
              maxGradNorm: opt.clipNorm ?? 0,
            },
          )
        : undefined;
    if (trainer && adamw.stepCount > 0)
      await trainer.setOptimizerState({ step: adamw.stepCount, m: adamw.m, v: adamw.v });
    let stale = false;
    const pull = async () => {
      if (!trainer || !stale) return;
      const now = await trainer.tensors();
      for (const [i, t] of promptTensors(now.prompt, now.deepPrompts).entries()) tensors[i]!.set(t);
      const st = await trainer.optimizerState();
      for (const [i, t] of st.m.entries()) adamw.m[i]!.set(t);
      for (const [i, t] of st.v.entries()) adamw.v[i]!.set(t);
      adamw.stepCount = st.step;
      stale = false;
    };

    if (runDir && state.step === 0 && resumedFrom === undefined)
      saveTensors(join(runDir, "snapshots", "step-000000.safetensors"), 0, "snapshot");
    const lengths = train.map((e) => e.ids.length);
    const nextBatch = () => {
      if (state.epochCursor >= state.epochBatches.length) {
        state.epochBatches = rngNow.shuffle(bucketBatches(lengths, batchSize));
        state.epochCursor = 0;
      }
      return collate(state.epochBatches[state.epochCursor++]!.map((i) => train[i]!));
    };
    // A directory whose run stopped early is finished: rerunning it trains no further.
    const stopsNow = () => !!early && plateaued(state.evals, early.patience, early.minDelta);
    let stoppedEarly = state.step < steps && stopsNow();
    while (!stoppedEarly && state.step < steps) {
      if (options.signal?.aborted) {
        // The steps since the last checkpoint are kept (host copies first: a CUDA trainer holds them).
        if (runDir && state.step > checkpointed) {
          await pull();
          checkpoint();
        }
        throw new Error(
          `tune: aborted at step ${state.step}${runDir ? ` (checkpointed in ${runDir}: run it again to resume)` : ""}`,
        );
      }
      const t0 = performance.now();
      const step = state.step;
      const lr = learningRate(step, steps, opt.lr, opt.schedule, opt.warmupSteps);
      let taskLoss = 0;
      let tokens = 0;
      let gradNorm: number;
      let regValue: number | null = null;
      if (trainer) {
        const b = nextBatch();
        const r = await trainer.step(modelBatch(b), lr);
        taskLoss = r.loss;
        tokens = b.tokens;
        gradNorm = r.gradNorm;
        stale = true;
      } else {
        // Accumulate gradients over micro-batches, each weighted by its labelled tokens: the loss and
        // gradient of the mean over every labelled token of the update, as one batch of them all would
        // give (a plain mean of the micro-batches' means would count a micro-batch with few answer
        // tokens as much as one with many).
        const grads = tensors.map((t) => new Float32Array(t.length));
        const parts: MicroBatch[] = [];
        for (let micro = 0; micro < opt.accumulate; micro++) {
          const b = nextBatch();
          const g: LossAndGrad = await model.lossAndGrad({ ...modelBatch(b), prompt, deepPrompts });
          tokens += b.tokens;
          parts.push({ loss: g.loss, count: g.labelCount, grads: promptGrads(g) });
        }
        taskLoss = combineMicroBatches(parts, grads);
        // Regulariser on the soft prompt (tensor 0): lambda * R(prompt) joins the loss.
        if (regularizer && options.regularizer) {
          const { lambda, schedule = "constant" } = options.regularizer;
          const lam = schedule === "linear" ? (lambda * (step + 1)) / steps : lambda;
          const r = regularizer.valueAndGradient(tensors[0]!);
          regValue = lam * r.value;
          const acc = grads[0]!;
          for (let k = 0; k < acc.length; k++) acc[k] += lam * r.gradient[k]!;
        }
        gradNorm = norm(grads);
        // As the device step: a non-finite gradient stops the run before AdamW writes it into the prompt
        // (and a checkpoint would keep it).
        if (!Number.isFinite(gradNorm))
          throw new Error(`prompt step ${step + 1}: the gradient is not finite (loss ${taskLoss})`);
        // As torch.nn.utils.clip_grad_norm_ (and the device step): scale by clip / (norm + 1e-6) when below 1.
        const coef = opt.clipNorm === undefined ? 1 : opt.clipNorm / (gradNorm + 1e-6);
        if (coef < 1) for (const g of grads) for (let k = 0; k < g.length; k++) g[k] *= coef;
        adamw.step(grads, lr);
      }
      state.step = step + 1;
      state.lastLoss = taskLoss + (regValue ?? 0);
      const record: StepRecord = {
        type: "step",
        step: state.step,
        loss: state.lastLoss,
        taskLoss,
        regularizer: regValue,
        lr,
        gradNorm,
        tokens,
        ms: performance.now() - t0,
      };
      appendMetrics(record);
      options.onStep?.(record);
      // What this step ends with; each reads the host tensors, which a device-resident step must refresh.
      const due = (every: number | undefined) => !!every && state.step % every === 0;
      let last = state.step === steps;
      const evalNow = due(evalEvery) || last;
      const collapseNow = due(options.collapseEvery) && prompt !== undefined && !evalNow;
      const saves = () => runDir !== undefined && (due(snapshotEvery) || due(checkpointEvery) || last);
      if (collapseNow || evalNow || saves()) await pull();
      if (collapseNow) {
        const report = await (await reference()).report(prompt, { perDimensionSpread: false });
        appendMetrics({
          type: "eval",
          step: state.step,
          validationLoss: Number.NaN,
          collapse: {
            collapseRate: report.aggregate.collapseRate,
            meanNearestCosine: report.aggregate.meanNearestCosine,
            meanDivergence: report.aggregate.meanDivergence,
            projectedPrompt: report.aggregate.projectedPrompt,
          },
          ms: 0,
        });
      }
      if (evalNow) {
        const ev = await evaluate(state.step);
        state.evals.push(ev);
        appendMetrics(ev);
        options.onEval?.(ev);
        // A stop the evaluation decides makes this the run's last step: snapshot, checkpoint, final prompt.
        if (!last && stopsNow()) stoppedEarly = last = true;
      }
      if (runDir && (due(snapshotEvery) || last)) {
        saveTensors(
          join(runDir, "snapshots", `step-${String(state.step).padStart(6, "0")}.safetensors`),
          state.step,
          "snapshot",
        );
      }
      if (runDir && (due(checkpointEvery) || last)) checkpoint();
    }
    if (runDir) saveTensors(join(runDir, "prompt.safetensors"), state.step, "final");
    return {
      prompt,
      deepPrompts,
      steps: state.step,
      lastLoss: state.lastLoss,
      evals: state.evals,
      runDir,
      resumedFrom,
      ...(stoppedEarly ? { stoppedEarly } : {}),
    };
  } finally {
    collapseRef?.dispose();
    if (ownsRegularizer) regularizer?.dispose();
    releaseLock();
  }
}

export interface EvaluateOptions {
  model: Model;
  task: Task;
  prompt?: Float32Array;
  deepPrompts?: DeepPrompts;
  batchSize?: number;
  /** Validation examples used (default all). */
  evalExamples?: number;
  maxNewTokens?: number;
  /** Examples decoded together for the task metrics (default 16; see TuneOptions). */
  generationBatchSize?: number;
  /** Token budget for an example without the soft prompt (default 256 - P). */
  maxLength?: number;
  /** The tokenizer's special tokens (BOS) before each text, as tune's option (default true). */
  addSpecialTokens?: boolean;
  /** The run's text encoding (run.json's `encoding`; default TEXT_ENCODING, this version's). */
  encoding?: number;
  step?: number;
  /** Collapse metrics of the soft prompt against this reference (created from the model when absent). */
  collapseReference?: CollapseReference;
  /** Seed of the reference created when none is given (its divergence rows; tune uses the run's seed). */
  seed?: number;
  /** Set false for the validation loss alone (no generation, no collapse metrics). */
  scores?: boolean;
  /** Called after each batch: batches done of the total (loss batches, then generation batches). */
  onProgress?: (done: number, total: number) => void;
  /** A long phase starting that onProgress does not show (building the collapse reference). */
  onStatus?: (message: string) => void;
}

const EVALUATE_KEYS = {
  model: true,
  task: true,
  prompt: true,
  deepPrompts: true,
  batchSize: true,
  evalExamples: true,
  maxNewTokens: true,
  generationBatchSize: true,
  maxLength: true,
  addSpecialTokens: true,
  encoding: true,
  step: true,
  collapseReference: true,
  seed: true,
  scores: true,
  onProgress: true,
  onStatus: true,
} satisfies OptionKeys<EvaluateOptions>;

/** Mean cross-entropy on validation tokens; task metrics from greedy generation; collapse of the soft prompt. */
export async function evaluatePrompt(options: EvaluateOptions): Promise<EvalRecord> {
  checkRequiredOptions(options, "evaluatePrompt options", EVALUATE_KEYS);
  const { model, task, prompt, deepPrompts } = options;
  checkModelArg(model);
  checkTaskArg(task);
  const batchSize = countOption("batchSize", options.batchSize ?? 2, 1);
  const maxNewTokens = countOption("maxNewTokens", options.maxNewTokens ?? 16, 1);
  const generationBatchSize = countOption("generationBatchSize", options.generationBatchSize ?? 16, 1);
  if (options.evalExamples !== undefined) countOption("evalExamples", options.evalExamples, 1);
  if (options.maxLength !== undefined) countOption("maxLength", options.maxLength, 1);
  if (options.step !== undefined) countOption("step", options.step, 0);
  if (options.seed !== undefined) countOption("seed", options.seed, 0);
  for (const key of ["scores", "addSpecialTokens"] as const) {
    const v: unknown = options[key];
    if (v !== undefined && typeof v !== "boolean")
      throw new TypeError(`${key}: expected a boolean, got ${typeof v} ${JSON.stringify(v)}`);
  }
  if (options.onProgress !== undefined && typeof options.onProgress !== "function")
    throw new TypeError(`onProgress: expected a function, got ${typeof options.onProgress}`);
  const t0 = performance.now();
  const tokenizer = model.tokenizer;
  if (!tokenizer) throw new Error(`model ${model.dir} has no tokenizer`);
  const encodeOptions = textEncoding(
    model,
    task,
    options.encoding ?? TEXT_ENCODING,
    options.addSpecialTokens ?? true,
  );
  const { eosId, addSpecialTokens } = encodeOptions;
  const budget = options.maxLength ?? 256 - (prompt ? prompt.length / model.config.hiddenSize : 0);
  const validation = task.validation.slice(0, options.evalExamples ?? task.validation.length);
  const scores = options.scores ?? true;
  const generating = scores && task.metric !== "none" && validation.length > 0;
  const batches = Math.ceil(validation.length / batchSize);
  const total = generating ? batches + Math.ceil(validation.length / generationBatchSize) : batches;
  let done = 0;
  const progressed = () => options.onProgress?.(++done, total);
  let lossSum = 0;
  let count = 0;
  for (let i = 0; i < validation.length; i += batchSize) {
    // As training encodes them.
    const enc = validation
      .slice(i, i + batchSize)
      .map((ex) => encodeExample(tokenizer, ex, { ...encodeOptions, maxLength: budget }));
    const out = await model.forward({ ...modelBatch(collate(enc)), prompt, deepPrompts, logits: false });
    if (out.labelCount) {
      lossSum += out.loss! * out.labelCount;
      count += out.labelCount;
    }
    progressed();
  }
  const record: EvalRecord = {
    type: "eval",
    step: options.step ?? 0,
    validationLoss: count ? lossSum / count : Number.NaN,
    ms: 0,
  };
  if (generating) {
    let em = 0;
    let f1 = 0;
    let acc = 0;
    for (let i = 0; i < validation.length; i += generationBatchSize) {
      const group = validation.slice(i, i + generationBatchSize);
      const enc = group.map((ex) =>
        encodeExample(
          tokenizer,
          { ...ex, completion: "" },
          { maxLength: budget - maxNewTokens, addSpecialTokens },
        ),
      );
      const b = collate(enc);
      const ids = await model.generate({
        inputIds: b.inputIds,
        attentionMask: b.attentionMask,
        batch: b.batch,
        seqLen: b.seqLen,
        prompt,
        deepPrompts,
        maxNewTokens,
        eosId: eosId ?? -1,
      });
      group.forEach((ex, j) => {
        const row = Array.from(ids.subarray(j * maxNewTokens, (j + 1) * maxNewTokens)).filter(
          (t) => t >= 0 && t !== eosId,
        );
        // Special tokens the model writes besides the end of text (another end-of-turn id) are no answer text.
        const text = tokenizer.decode(row, { skipSpecialTokens: true }).split("\n")[0]!.trim();
        const golds = ex.answers?.length ? ex.answers : [ex.completion.trim()];
        if (task.metric === "qa") {
          em += exactMatch(text, golds);
          f1 += f1Score(text, golds);
        } else acc += arithmeticCorrect(text, golds[0]!) ? 1 : 0;
      });
      progressed();
    }
    if (task.metric === "qa") {
      record.exactMatch = em / validation.length;
      record.f1 = f1 / validation.length;
    } else {
      record.accuracy = acc / validation.length;
    }
  }
  if (scores && prompt) {
    if (!options.collapseReference) options.onStatus?.(COLLAPSE_STATUS);
    const ref =
      options.collapseReference ?? (await createCollapseReference(model, { seed: options.seed ?? 0 }));
    try {
      const report = await ref.report(prompt, { perDimensionSpread: false });
      record.collapse = {
        collapseRate: report.aggregate.collapseRate,
        meanNearestCosine: report.aggregate.meanNearestCosine,
        meanDivergence: report.aggregate.meanDivergence,
        projectedPrompt: report.aggregate.projectedPrompt,
      };
    } finally {
      if (!options.collapseReference) ref.dispose();
    }
  }
  record.ms = performance.now() - t0;
  return record;
}

/**
 * How a run turns examples into tokens, by run.json's `encoding`. 2 (this version): the end of text is
 * tokenizer_config's eos_token (else the usual names), the answer's leading space is left to a tokenizer
 * that starts every text with one, and C4 documents keep their first tokens ("head"). 1 (run directories
 * recorded before the field): the first of the usual names, the space kept, C4 cut as other plain text
 * ("truncate"), so that they resume and evaluate as they were trained.
 */
export const TEXT_ENCODING = 2;

const COLLAPSE_STATUS =
  "building the collapse reference (the vocabulary's index, neighbour distances and Gaussian fit; once)";

function textEncoding(model: Model, task: Task, version: number, addSpecialTokens: boolean) {
  if (version !== 1 && version !== 2)
    throw new RangeError(
      `encoding: ${version} is not a text encoding this version knows (1 or ${TEXT_ENCODING})`,
    );
  const t = model.tokenizer;
  const eosId =
    version >= 2 ? endOfText(model) : endOfTextId(t && { tokenToId: (s: string) => t.tokenToId(s) });
  const plain = task.metric === "none";
  const c4 = task.describe()["kind"] === "c4";
  const completionOverflow: "error" | "truncate" | "head" = !plain
    ? "error"
    : version >= 2 && c4
      ? "head"
      : "truncate";
  return { eosId, completionOverflow, impliedSpace: version >= 2, addSpecialTokens };
}

/** The model's tokenizer's end-of-text token (endOfTextId: tokenizer_config's eos_token, else the usual names). */
export function endOfText(model: {
  readonly tokenizer: { tokenToId?(token: string): number | undefined; readonly eosToken?: string } | null;
}): number | undefined {
  return endOfTextId(model.tokenizer);
}

function tensorNames(prompt: Float32Array | undefined, deep: DeepPrompts | undefined): string[] {
  const names: string[] = prompt ? ["prompt"] : [];
  if (deep?.kind === "hidden") names.push(...deep.layers.map((l) => `deep.hidden.${l}`));
  if (deep?.kind === "prefix")
    names.push(
      ...deep.layers.map((l) => `deep.prefix.${l}.keys`),
      ...deep.layers.map((l) => `deep.prefix.${l}.values`),
    );
  return names;
}

function tensorShape(name: string, length: number, c: Model["config"]): number[] {
  if (name.startsWith("deep.prefix.")) return [length / (c.numKvHeads * c.headDim), c.numKvHeads, c.headDim];
  return [length / c.hiddenSize, c.hiddenSize];
}

/** Reads the prompt tensors a run saved (prompt.safetensors or a snapshot). */
export function readPromptFile(path: string): {
  prompt?: Float32Array;
  deepPrompts?: DeepPrompts;
  metadata: Record<string, string>;
} {
  const { tensors, metadata } = readTensors(path);
  const prompt = tensors.get("prompt")?.data as Float32Array | undefined;
  const hidden = [...tensors.keys()]
    .filter((k) => k.startsWith("deep.hidden."))
    .map((k) => Number(k.split(".")[2]));
  const prefix = [...tensors.keys()]
    .filter((k) => /^deep\.prefix\.\d+\.keys$/.test(k))
    .map((k) => Number(k.split(".")[2]));
  let deepPrompts: DeepPrompts | undefined;
  if (hidden.length) {
    hidden.sort((a, b) => a - b);
    deepPrompts = {
      kind: "hidden",
      layers: hidden,
      vectors: hidden.map((l) => tensors.get(`deep.hidden.${l}`)!.data as Float32Array),
    };
  } else if (prefix.length) {
    prefix.sort((a, b) => a - b);
    deepPrompts = {
      kind: "prefix",
      layers: prefix,
      keys: prefix.map((l) => tensors.get(`deep.prefix.${l}.keys`)!.data as Float32Array),
      values: prefix.map((l) => tensors.get(`deep.prefix.${l}.values`)!.data as Float32Array),
    };
  }
  return { prompt, deepPrompts, metadata };
}
