// Full-parameter training in the native core: a model built from a config with seeded random weights
// (createModel), or read back for more training (loadTrainableModel); Pretrainer steps AdamW over every
// weight and saves a Hugging Face directory that loadModel and Transformers' from_pretrained both read.
//
// The optimizer lives in the core (kernels/cpu/model.cpp, "Full-parameter training"): the fp32 slots are the
// master weights, the AdamW moments belong to the model, and weight decay applies only to the weight
// matrices of linear layers (attention q/k/v and output, MLP, an untied LM head) — never to embeddings, norm
// weights or biases (see Model::decays in kernels/include/priortune/model.h).
import { copyFileSync, existsSync, rmSync, statSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join, resolve } from "node:path";
import { defaultLogger, type Logger } from "./backend.js";
import { isMistral, loadPlan, type ModelConfig, nativeConfig, parseConfig } from "./config.js";
import { atomicWrite, ensureDir, readJsonFile } from "./files.js";
import { CallQueue, Model, modelCall, PROMPT_TRAINER_KEYS } from "./model.js";
import { addon, type NativeAdamState, type NativeModel } from "./native.js";
import { Rng } from "./rng.js";
import { listModelTensors, type TensorToWrite, writeSafetensorsAtomic } from "./safetensors.js";
import { endOfTextId, findTokenizer, type Tokenizer } from "./tokenizer.js";
import {
  checkLabels,
  checkOptions,
  checkTokenIds,
  type OptionKeys,
  requireInt32,
  requirePositiveInt,
  requireUint8,
  threadsOr,
} from "./validate.js";

type Json = Record<string, unknown>;

/** What the training API keeps about a model it made or loaded (the public Model hides its native handle). */
interface Trainable {
  native: NativeModel;
  /** config.json to write back (the source's own, or one generated from the parsed config). */
  hfConfig: Json;
  /** Directory whose tokenizer files a save copies, when there is one. */
  sourceDir: string | null;
}

const trainable = new WeakMap<Model, Trainable>();

function trainableOf(model: Model, caller: string): Trainable {
  const t = trainable.get(model);
  if (!t) {
    throw new TypeError(
      `${caller}: expected a model from createModel or loadTrainableModel (loadModel's models are frozen)`,
    );
  }
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// Hugging Face layout: the inverse of lib/config.ts's load plan.

/** One Hugging Face tensor cut from (part of) a canonical slot. */
interface HfTensor {
  name: string;
  slot: string;
  rowOffset: number;
  rows: number;
  /** GPT-2 Conv1D weights are stored [in, out]: the slot's [out, in] transposed. */
  transpose: boolean;
  /** 1 for vectors (norm weights, biases), 2 for matrices. */
  dims: 1 | 2;
}

/**
 * The tensors `save` writes, with the names Transformers' save_pretrained uses for the config's class
 * (`transformer.` / `model.` prefixes for the causal-LM classes; no `lm_head.weight` when tied).
 */
export function hfTensorLayout(c: ModelConfig): HfTensor[] {
  const out: HfTensor[] = [];
  const lm = /ForCausalLM$|LMHeadModel$/.test(c.hfArchitecture);
  const C = c.hiddenSize;
  const I = c.intermediateSize;
  if (c.architecture === "gpt2") {
    const p = lm ? "transformer." : "";
    const add = (name: string, slot: string, rows: number, dims: 1 | 2, transpose = false) =>
      out.push({ name: p + name, slot, rowOffset: 0, rows, transpose, dims });
    add("wte.weight", "tok_emb", c.vocabSize, 2);
    add("wpe.weight", "pos_emb", c.maxPositions, 2);
    add("ln_f.weight", "lnf.w", C, 1);
    add("ln_f.bias", "lnf.b", C, 1);
    for (let i = 0; i < c.numLayers; i++) {
      const h = `h.${i}.`;
      const l = `l${i}.`;
      add(`${h}ln_1.weight`, `${l}ln1.w`, C, 1);
      add(`${h}ln_1.bias`, `${l}ln1.b`, C, 1);
      add(`${h}attn.c_attn.weight`, `${l}qkv.w`, 3 * C, 2, true);
      add(`${h}attn.c_attn.bias`, `${l}qkv.b`, 3 * C, 1);
      add(`${h}attn.c_proj.weight`, `${l}proj.w`, C, 2, true);
      add(`${h}attn.c_proj.bias`, `${l}proj.b`, C, 1);
      add(`${h}ln_2.weight`, `${l}ln2.w`, C, 1);
      add(`${h}ln_2.bias`, `${l}ln2.b`, C, 1);
      add(`${h}mlp.c_fc.weight`, `${l}fc.w`, I, 2, true);
      add(`${h}mlp.c_fc.bias`, `${l}fc.b`, I, 1);
      add(`${h}mlp.c_proj.weight`, `${l}fc2.w`, C, 2, true);
      add(`${h}mlp.c_proj.bias`, `${l}fc2.b`, C, 1);
    }
  } else {
    const p = lm ? "model." : "";
    const add = (name: string, slot: string, rows: number, dims: 1 | 2, rowOffset = 0) =>
      out.push({ name: p + name, slot, rowOffset, rows, transpose: false, dims });
    const qRows = c.numHeads * c.headDim;
    const kvRows = c.numKvHeads * c.headDim;
    add("embed_tokens.weight", "tok_emb", c.vocabSize, 2);
    add("norm.weight", "lnf.w", C, 1);
    for (let i = 0; i < c.numLayers; i++) {
      const h = `layers.${i}.`;
      const l = `l${i}.`;
      add(`${h}input_layernorm.weight`, `${l}ln1.w`, C, 1);
      add(`${h}post_attention_layernorm.weight`, `${l}ln2.w`, C, 1);
      for (const kind of ["weight", ...(c.attentionBias ? ["bias"] : [])]) {
        const [t, dims] = kind === "weight" ? (["w", 2] as const) : (["b", 1] as const);
        add(`${h}self_attn.q_proj.${kind}`, `${l}qkv.${t}`, qRows, dims, 0);
        add(`${h}self_attn.k_proj.${kind}`, `${l}qkv.${t}`, kvRows, dims, qRows);
        add(`${h}self_attn.v_proj.${kind}`, `${l}qkv.${t}`, kvRows, dims, qRows + kvRows);
        add(`${h}self_attn.o_proj.${kind}`, `${l}proj.${t}`, C, dims);
      }
      for (const kind of ["weight", ...(c.mlpBias ? ["bias"] : [])]) {
        const [t, dims] = kind === "weight" ? (["w", 2] as const) : (["b", 1] as const);
        add(`${h}mlp.gate_proj.${kind}`, `${l}fc.${t}`, I, dims, 0);
        add(`${h}mlp.up_proj.${kind}`, `${l}fc.${t}`, I, dims, I);
        add(`${h}mlp.down_proj.${kind}`, `${l}fc2.${t}`, C, dims);
      }
    }
  }
  if (!c.tiedHead)
    out.push({
      name: "lm_head.weight",
      slot: "lm_head",
      rowOffset: 0,
      rows: c.vocabSize,
      transpose: false,
      dims: 2,
    });
  return out;
}

/**
 * Canonical slots (name -> [rows x cols] values, e.g. a model's weights or gradients) as Hugging Face
 * tensors: Llama's fused q/k/v and gate/up split back, GPT-2's Conv1D weights transposed back to [in, out].
 */
export function toHfTensors(
  c: ModelConfig,
  slots: Record<string, Float32Array>,
  shapes: Record<string, { rows: number; cols: number }>,
): TensorToWrite[] {
  return hfTensorLayout(c).map((t) => {
    const data = slots[t.slot];
    const shape = shapes[t.slot];
    if (!data || !shape) throw new Error(`toHfTensors: no slot '${t.slot}' for ${t.name}`);
    const cols = shape.cols;
    const part = data.subarray(t.rowOffset * cols, (t.rowOffset + t.rows) * cols);
    if (t.dims === 1) return { name: t.name, dtype: "F32", shape: [t.rows], data: part.slice() };
    if (!t.transpose) return { name: t.name, dtype: "F32", shape: [t.rows, cols], data: part.slice() };
    const tr = new Float32Array(part.length);
    for (let r = 0; r < t.rows; r++) for (let k = 0; k < cols; k++) tr[k * t.rows + r] = part[r * cols + k]!;
    return { name: t.name, dtype: "F32", shape: [cols, t.rows], data: tr };
  });
}

/** A Transformers config.json for a parsed config (used when the model was not made from one). */
export function hfConfigJson(c: ModelConfig): Json {
  if (c.architecture === "gpt2") {
    return {
      architectures: [c.hfArchitecture || "GPT2LMHeadModel"],
      model_type: "gpt2",
      vocab_size: c.vocabSize,
      n_embd: c.hiddenSize,
      n_layer: c.numLayers,
      n_head: c.numHeads,
      n_positions: c.maxPositions,
      n_inner: c.intermediateSize,
      activation_function: "gelu_new",
      layer_norm_epsilon: c.normEps,
      tie_word_embeddings: c.tiedHead,
      ...(c.scaleAttnByInverseLayerIdx ? { scale_attn_by_inverse_layer_idx: true } : {}),
      dtype: "float32",
    };
  }
  const rope = c.ropeScaling;
  return {
    architectures: [c.hfArchitecture || "LlamaForCausalLM"],
    // Transformers builds the class of model_type: Mistral's is the one with the sliding window.
    model_type: isMistral(c.hfArchitecture) ? "mistral" : "llama",
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    head_dim: c.headDim,
    max_position_embeddings: c.maxPositions,
    rms_norm_eps: c.normEps,
    hidden_act: "silu",
    attention_bias: c.attentionBias,
    mlp_bias: c.mlpBias,
    tie_word_embeddings: c.tiedHead,
    // Mistral's config class reads an absent window as 4096: no window is an explicit null there.
    ...(c.slidingWindow !== undefined || isMistral(c.hfArchitecture)
      ? { sliding_window: c.slidingWindow ?? null }
      : {}),
    // Transformers 4.x reads rope_theta and rope_scaling, 5.x rope_parameters: both are written.
    rope_theta: c.ropeTheta ?? 10000,
    ...(rope && rope.type !== "default"
      ? {
          rope_scaling: {
            rope_type: rope.type,
            factor: rope.factor,
            ...(rope.type === "llama3"
              ? {
                  low_freq_factor: rope.lowFreqFactor,
                  high_freq_factor: rope.highFreqFactor,
                  original_max_position_embeddings: rope.originalMaxPositions,
                }
              : {}),
          },
        }
      : {}),
    rope_parameters: {
      rope_type: rope?.type ?? "default",
      rope_theta: c.ropeTheta ?? 10000,
      ...(rope && rope.type !== "default" ? { factor: rope.factor } : {}),
      ...(rope?.type === "llama3"
        ? {
            low_freq_factor: rope.lowFreqFactor,
            high_freq_factor: rope.highFreqFactor,
            original_max_position_embeddings: rope.originalMaxPositions,
          }
        : {}),
    },
    dtype: "float32",
  };
}

// ---------------------------------------------------------------------------------------------------------
// Construction

export interface CreateModelOptions {
  /** Seed of the random initialisation (default 0): same seed and config, same weights. */
  seed?: number;
  /** Standard deviation of the linear and embedding weights (default: config.json's initializer_range or 0.02). */
  initStd?: number;
  /** CPU threads; default: all available cores. */
  threads?: number;
  logger?: Logger;
}

const CREATE_MODEL_KEYS = {
  seed: true,
  initStd: true,
  threads: true,
  logger: true,
} satisfies OptionKeys<CreateModelOptions>;

function isParsedConfig(v: Json): boolean {
  return (v.architecture === "gpt2" || v.architecture === "llama") && typeof v.hiddenSize === "number";
}

/**
 * Initial weights as Transformers initialises GPT-2 and Llama (`_init_weights`): linear and embedding weights
 * N(0, std²), biases 0, norm weights 1 (LayerNorm biases 0); GPT-2 also scales its residual projections
 * (attn.c_proj, mlp.c_proj) to std / sqrt(2 · layers) (GPT-2 paper, section 2.3). Slots are drawn in
 * canonical-name order from one seeded generator.
 */
export function initialWeights(
  c: ModelConfig,
  shapes: { name: string; rows: number; cols: number }[],
  seed: number,
  std: number,
): Record<string, Float32Array> {
  const rng = new Rng(seed);
  const out: Record<string, Float32Array> = {};
  const residualStd = std / Math.sqrt(2 * c.numLayers);
  for (const { name, rows, cols } of [...shapes].sort((a, b) => (a.name < b.name ? -1 : 1))) {
    const v = new Float32Array(rows * cols);
    if (/(^|\.)(ln1|ln2|lnf)\.w$/.test(name)) v.fill(1);
    else if (cols > 1) {
      const s = c.architecture === "gpt2" && /\.(proj|fc2)\.w$/.test(name) ? residualStd : std;
      for (let i = 0; i < v.length; i++) v[i] = s * rng.normal();
    }
    out[name] = v;
  }
  return out;
}

/**
 * A trainable model with seeded random weights, from a Hugging Face model directory's config.json (its weights,
 * if any, are ignored; its tokenizer is kept), a config.json object, or a parsed ModelConfig.
 */
export async function createModel(
  source: string | Json | ModelConfig,
  optionsArg?: CreateModelOptions,
): Promise<Model> {
  const options = checkOptions(optionsArg, "createModel options", CREATE_MODEL_KEYS);
  let hfConfig: Json;
  let config: ModelConfig;
  let sourceDir: string | null = null;
  let tokenizer: Tokenizer | null = null;
  if (typeof source === "string" && existsSync(source) && statSync(source).isFile()) {
    // A config.json file on its own: no directory to take a tokenizer from.
    hfConfig = readJsonFile(resolve(source)) as Json;
    config = parseConfig(hfConfig);
  } else if (typeof source === "string") {
    sourceDir = resolve(source);
    const path = join(sourceDir, "config.json");
    if (!existsSync(path))
      throw new Error(
        `${sourceDir}: no config.json (expected a config.json file or a Hugging Face model directory)`,
      );
    hfConfig = readJsonFile(path) as Json;
    config = parseConfig(hfConfig);
    tokenizer = findTokenizer(sourceDir, (m) => (options.logger ?? defaultLogger)("warn", m));
  } else if (typeof source === "object" && source !== null) {
    if (isParsedConfig(source as Json)) {
      config = source as ModelConfig;
      hfConfig = hfConfigJson(config);
      config = parseConfig(hfConfig); // normalises hfArchitecture and checks the sizes
    } else {
      hfConfig = { ...(source as Json) };
      config = parseConfig(hfConfig);
    }
  } else {
    throw new TypeError(
      `source: expected a model directory, a config.json object or a ModelConfig, got ${source === null ? "null" : typeof source}`,
    );
  }
  const seed = options.seed ?? 0;
  if (!Number.isInteger(seed)) throw new TypeError(`seed: expected an integer, got ${seed}`);
  const rangeFromConfig = typeof hfConfig.initializer_range === "number" ? hfConfig.initializer_range : 0.02;
  const std = options.initStd ?? rangeFromConfig;
  if (typeof std !== "number" || !(std > 0) || !Number.isFinite(std))
    throw new RangeError(`initStd: expected a positive number, got ${std}`);
  const threads = threadsOr(options.threads, availableParallelism());
  const native = new (addon().NativeModel)(nativeConfig(config, threads));
  try {
    native.importTensors(initialWeights(config, native.slots(), seed, std));
    native.checkComplete();
  } catch (e) {
    native.dispose();
    throw e;
  }
  (options.logger ?? defaultLogger)(
    "info",
    `created ${config.hfArchitecture} with seed ${seed}, init std ${std}`,
  );
  const model = new Model(
    native,
    sourceDir ?? "",
    config,
    "cpu",
    "training runs on the CPU",
    tokenizer,
    threads,
    ["F32"],
  );
  trainable.set(model, { native, hfConfig: float32Config(hfConfig), sourceDir });
  return model;
}

/** The config.json a save writes: the source's, with the dtype of the weights written (F32). */
function float32Config(hfConfig: Json): Json {
  const out: Json = { ...hfConfig, dtype: "float32" };
  if ("torch_dtype" in out) out.torch_dtype = "float32";
  return out;
}

/** loadModel for training: the same directory formats, and the model can be given to a Pretrainer. */
export async function loadTrainableModel(
  dirArg: string,
  optionsArg?: { threads?: number; logger?: Logger },
): Promise<Model> {
  const options = checkOptions(optionsArg, "loadTrainableModel options", { threads: true, logger: true });
  if (typeof dirArg !== "string")
    throw new TypeError(`dir: expected a model directory path, got ${typeof dirArg}`);
  const dir = resolve(dirArg);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new Error(`${dir}: not a directory`);
  const path = join(dir, "config.json");
  if (!existsSync(path)) throw new Error(`${dir}: no config.json (expected a Hugging Face model directory)`);
  const hfConfig = readJsonFile(path) as Json;
  const config = parseConfig(hfConfig);
  const threads = threadsOr(options.threads, availableParallelism());
  const { entries, dtypes } = loadPlan(config, listModelTensors(dir));
  const tokenizer = findTokenizer(dir, (m) => (options.logger ?? defaultLogger)("warn", m));
  const native = new (addon().NativeModel)(nativeConfig(config, threads));
  try {
    await native.loadTensors(entries);
    native.checkComplete();
  } catch (e) {
    native.dispose();
    throw e;
  }
  const model = new Model(
    native,
    dir,
    config,
    "cpu",
    "training runs on the CPU",
    tokenizer,
    threads,
    [...dtypes].sort(),
  );
  trainable.set(model, { native, hfConfig: float32Config(hfConfig), sourceDir: dir });
  return model;
}

// ---------------------------------------------------------------------------------------------------------
// Access to the weights

/** Copies of the model's fp32 weights by canonical slot name, with their shapes. */
export function modelWeights(model: Model): {
  tensors: Record<string, Float32Array>;
  shapes: Record<string, { rows: number; cols: number }>;
} {
  const { native } = trainableOf(model, "modelWeights");
  if (model.disposed) throw new Error("Model is disposed");
  return { tensors: native.exportTensors(), shapes: slotShapes(native) };
}

/**
 * Replaces some or all weights (canonical slot name -> rows x cols finite values), e.g. an initialisation
 * of one's own. AdamW's moments are kept.
 */
export function setModelWeights(model: Model, tensors: Record<string, Float32Array>): void {
  const { native } = trainableOf(model, "setModelWeights");
  if (model.disposed) throw new Error("Model is disposed");
  native.importTensors(tensors);
}

function slotShapes(native: NativeModel): Record<string, { rows: number; cols: number }> {
  const shapes: Record<string, { rows: number; cols: number }> = {};
  for (const s of native.slots()) shapes[s.name] = { rows: s.rows, cols: s.cols };
  return shapes;
}

/** A model directory's tokenizer files (either tokenizer.json or GPT-2's vocab.json + merges.txt). */
const TOKENIZER_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
];

/** Files a save copies from the source directory: the tokenizer and generation defaults. */
export const COMPANION_FILES = [...TOKENIZER_FILES, "generation_config.json"];

export interface SaveModelOptions {
  /**
   * The tokenizer the model goes with (default the model's): its end-of-text token fills config.json's
   * missing bos_token_id / eos_token_id (null without one): Transformers would fill them with its class
   * defaults (GPT-2 50256, Llama 1 and 2), other tokens or none at all in a priortune vocabulary.
   */
  tokenizer?: Tokenizer;
  /**
   * The directory of that tokenizer when it is not the model's source (a model pretrained with a tokenizer of
   * its own): its tokenizer files are written instead of the source's, none of the source's tokenizer files
   * or generation_config.json (the source tokenizer's ids) is kept, and bos/eos come from `tokenizer`
   * whatever the source config said.
   */
  tokenizerDir?: string;
}

const SAVE_MODEL_KEYS = { tokenizer: true, tokenizerDir: true } satisfies OptionKeys<SaveModelOptions>;

/**
 * Writes a Hugging Face model directory: config.json, model.safetensors (F32, Transformers' tensor names and
 * layouts) and the tokenizer files (the source directory's, or options.tokenizerDir's). loadModel and
 * from_pretrained read it back. Files of the same names are overwritten. A tokenizer_config.json whose
 * model_max_length exceeds the model's positions is written with the positions (Transformers truncates to it).
 */
export function saveModel(model: Model, dirArg: string, optionsArg?: SaveModelOptions): void {
  const options = checkOptions(optionsArg, "saveModel options", SAVE_MODEL_KEYS);
  const t = trainableOf(model, "saveModel");
  if (model.disposed) throw new Error("Model is disposed");
  if (typeof dirArg !== "string") throw new TypeError(`dir: expected a directory path, got ${typeof dirArg}`);
  const dir = resolve(dirArg);
  if (options.tokenizerDir !== undefined && typeof options.tokenizerDir !== "string")
    throw new TypeError(`tokenizerDir: expected a directory path, got ${typeof options.tokenizerDir}`);
  const tokenizerDir = options.tokenizerDir === undefined ? undefined : resolve(options.tokenizerDir);
  const ownTokenizer = tokenizerDir !== undefined && tokenizerDir !== t.sourceDir;
  // The tokenizer whose files are written: a tokenizerDir without one would write a model with no tokenizer
  // (and null bos/eos ids).
  const dirTokenizer = ownTokenizer ? findTokenizer(tokenizerDir, () => {}) : null;
  if (ownTokenizer && !dirTokenizer)
    throw new Error(
      `tokenizerDir: ${tokenizerDir} holds no tokenizer (tokenizer.json, or vocab.json and merges.txt)`,
    );
  // an old index beside the new model.safetensors would describe other weights (we and Transformers read the
  // single file first, other tools may not)
  if (existsSync(join(dir, "model.safetensors.index.json")))
    throw new Error(`${dir} holds model.safetensors.index.json (sharded weights); save to another directory`);
  ensureDir(dir);
  const tensors = toHfTensors(model.config, t.native.exportTensors(), slotShapes(t.native));
  // Atomic: a crash leaves the old weights or the new, never a torn file (a save over the source directory
  // would otherwise risk the only copy).
  writeSafetensorsAtomic(join(dir, "model.safetensors"), tensors, { format: "pt" });
  const hfConfig: Json = { ...t.hfConfig };
  if (ownTokenizer || !("bos_token_id" in hfConfig) || !("eos_token_id" in hfConfig)) {
    // The tokenizer whose files are written (loaded from tokenizerDir when not given), not the model's.
    const tokenizer = options.tokenizer ?? (ownTokenizer ? dirTokenizer : model.tokenizer);
    const end = endOfTextId(tokenizer) ?? null;
    if (ownTokenizer) hfConfig.bos_token_id = hfConfig.eos_token_id = end;
    hfConfig.bos_token_id ??= end;
    hfConfig.eos_token_id ??= end;
  }
  atomicWrite(join(dir, "config.json"), `${JSON.stringify(hfConfig, null, 2)}\n`);
  // The tokenizer files: all of one directory's, so that no file of another tokenizer survives beside them.
  const from = ownTokenizer ? tokenizerDir : t.sourceDir;
  if (from && from !== dir) {
    if (ownTokenizer) for (const f of COMPANION_FILES) rmSync(join(dir, f), { force: true });
    for (const f of ownTokenizer ? TOKENIZER_FILES : COMPANION_FILES) {
      if (existsSync(join(from, f))) copyFileSync(join(from, f), join(dir, f));
    }
  }
  capModelMaxLength(join(dir, "tokenizer_config.json"), model.config.maxPositions);
}

// tokenizer_config.json's model_max_length, the longest input Transformers lets through, at most the model's
// positions (a tokenizer trained for 256 beside a 64-position model would let GPT-2 overflow its positions).
function capModelMaxLength(path: string, positions: number): void {
  if (!existsSync(path) || !(positions > 0)) return;
  const config = readJsonFile(path) as Json;
  if (typeof config !== "object" || config === null) return;
  const max = config.model_max_length;
  if (typeof max === "number" && max > positions) {
    config.model_max_length = positions;
    atomicWrite(path, `${JSON.stringify(config, null, 2)}\n`);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Training

export interface PretrainerOptions {
  /** Learning rate, or a schedule of the step about to be taken (1, 2, ...). */
  lr: number | ((step: number) => number);
  /** AdamW betas (default 0.9, 0.95: the usual language-model pretraining values). */
  beta1?: number;
  beta2?: number;
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay on linear-layer weights only (default 0.1). */
  weightDecay?: number;
  /** Clip the global gradient norm to this before each update (default 1; 0 turns clipping off). */
  maxGradNorm?: number;
}

// The same AdamW settings as a prompt trainer's (the compiler checks that the two types agree).
const PRETRAINER_KEYS = PROMPT_TRAINER_KEYS satisfies OptionKeys<PretrainerOptions>;

export interface PretrainBatch {
  /** Token ids, batch x seqLen, row-major. */
  inputIds: Int32Array;
  batch: number;
  seqLen: number;
  /** 1 = token, 0 = padding (right padding); default all ones. */
  attentionMask?: Uint8Array;
  /**
   * Labels aligned with inputIds (-100 = ignore); the core shifts them (position t predicts t + 1). Default:
   * the input ids themselves, -100 at padding: every real next token is a target.
   */
  labels?: Int32Array;
}

export interface PretrainStep {
  /** Mean cross-entropy over the batch's targets before this update. */
  loss: number;
  labelCount: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Learning rate used. */
  lr: number;
  /** Updates taken so far, this one included. */
  step: number;
}

const PRETRAIN_BATCH_KEYS = {
  inputIds: true,
  batch: true,
  seqLen: true,
  attentionMask: true,
  labels: true,
} satisfies OptionKeys<PretrainBatch>;

/**
 * A checked batch holding its own copies of the arrays, so that a queued call reads what was checked
 * whatever the caller does to its arrays meanwhile.
 */
function checkedBatch(c: ModelConfig, b: PretrainBatch) {
  if (typeof b !== "object" || b === null) throw new TypeError("batch: expected an object");
  checkOptions(b, "batch", PRETRAIN_BATCH_KEYS);
  const batch = requirePositiveInt(b.batch, "batch");
  const seqLen = requirePositiveInt(b.seqLen, "seqLen");
  const inputIds = requireInt32(b.inputIds, "inputIds", batch * seqLen).slice();
  checkTokenIds(inputIds, c.vocabSize, "inputIds");
  if (c.architecture === "gpt2" && seqLen > c.maxPositions)
    throw new RangeError(`seqLen ${seqLen} exceeds the model's ${c.maxPositions} positions`);
  // Training attends over every position: past a sliding window that would be another model than the one
  // evaluated (and Transformers') computes.
  if (c.slidingWindow !== undefined && seqLen > c.slidingWindow)
    throw new RangeError(
      `seqLen ${seqLen} exceeds the model's sliding window (${c.slidingWindow}), which priortune does not implement`,
    );
  const attentionMask =
    b.attentionMask === undefined
      ? undefined
      : requireUint8(b.attentionMask, "attentionMask", batch * seqLen).slice();
  let labels: Int32Array;
  if (b.labels === undefined) {
    labels = inputIds.slice();
    if (attentionMask) for (let i = 0; i < labels.length; i++) if (!attentionMask[i]) labels[i] = -100;
  } else {
    labels = requireInt32(b.labels, "labels", batch * seqLen).slice();
    checkLabels(labels, c.vocabSize, "labels");
  }
  return { inputIds, batch, seqLen, attentionMask, labels };
}

function checkNumber(v: unknown, name: string, ok: (x: number) => boolean, what: string): number {
  if (typeof v !== "number" || !Number.isFinite(v) || !ok(v))
    throw new RangeError(`${name}: expected ${what}, got ${String(v)}`);
  return v;
}

/** AdamW over every weight of a trainable model, one batch per step. */
export class Pretrainer {
  readonly #model: Model;
  readonly #native: NativeModel;
  readonly #lr: number | ((step: number) => number);
  readonly #adamw: { beta1: number; beta2: number; eps: number; weightDecay: number; maxGradNorm: number };
  #steps = 0;
  readonly #queue = new CallQueue();

  constructor(model: Model, options: PretrainerOptions) {
    this.#native = trainableOf(model, "Pretrainer").native;
    this.#model = model;
    if (model.disposed) throw new Error("Model is disposed");
    if (typeof options !== "object" || options === null) throw new TypeError("options: expected an object");
    checkOptions(options, "Pretrainer options", PRETRAINER_KEYS);
    if (typeof options.lr !== "function")
      checkNumber(options.lr, "lr", (x) => x >= 0, "a number >= 0 or a function");
    this.#lr = options.lr;
    const unit = (x: number) => x >= 0 && x < 1;
    this.#adamw = {
      beta1: checkNumber(options.beta1 ?? 0.9, "beta1", unit, "a number in [0, 1)"),
      beta2: checkNumber(options.beta2 ?? 0.95, "beta2", unit, "a number in [0, 1)"),
      eps: checkNumber(options.eps ?? 1e-8, "eps", (x) => x > 0, "a number > 0"),
      weightDecay: checkNumber(options.weightDecay ?? 0.1, "weightDecay", (x) => x >= 0, "a number >= 0"),
      maxGradNorm: checkNumber(options.maxGradNorm ?? 1, "maxGradNorm", (x) => x >= 0, "a number >= 0"),
    };
  }

  get model(): Model {
    return this.#model;
  }

  /** Updates taken by this trainer. */
  get steps(): number {
    return this.#steps;
  }

  /**
   * Loss and gradient of one batch, then one AdamW update of every weight. Steps called without awaiting
   * the previous one run in call order, each with its own step number and learning rate.
   */
  async step(batch: PretrainBatch): Promise<PretrainStep> {
    // The batch is checked and copied now (an async function runs up to its first await at the call, and a
    // throw becomes the promise's rejection), so a caller may refill its arrays before the step runs.
    const args = checkedBatch(this.#model.config, batch);
    const run = async () => {
      if (this.#model.disposed) throw new Error("Model is disposed");
      const next = this.#steps + 1;
      const lr = typeof this.#lr === "function" ? this.#lr(next) : this.#lr;
      checkNumber(lr, `lr(${next})`, (x) => x >= 0, "a number >= 0");
      const out = await modelCall(this.#model, () => this.#native.trainStep(args, { lr, ...this.#adamw }));
      this.#steps = next;
      return { loss: out.loss, labelCount: out.labelCount, gradNorm: out.gradNorm, lr, step: next };
    };
    return this.#queued(run);
  }

  /** Loss and d loss / d every weight (canonical slot names and layouts) for one batch, without an update. */
  async gradients(
    batch: PretrainBatch,
  ): Promise<{ loss: number; labelCount: number; gradients: Record<string, Float32Array> }> {
    const args = checkedBatch(this.#model.config, batch);
    return this.#queued(async () => {
      if (this.#model.disposed) throw new Error("Model is disposed");
      return modelCall(this.#model, () => this.#native.trainGrads(args));
    });
  }

  /** Mean loss of a batch with the current weights (no gradient, no update), after the steps called before. */
  async evaluate(batch: PretrainBatch): Promise<number> {
    const args = checkedBatch(this.#model.config, batch);
    return this.#queued(async () => (await this.#model.forward({ ...args, logits: false })).loss!);
  }

  /** Runs `work` after everything queued before it (steps, gradients, evaluations), in call order. */
  #queued<T>(work: () => Promise<T>): Promise<T> {
    return this.#queue.run(work);
  }

  /** saveModel(this.model, dir, options). */
  save(dir: string, options: SaveModelOptions = {}): void {
    saveModel(this.#model, dir, options);
  }

  /** AdamW's step count and moments of every weight (copies), for a checkpoint. */
  optimizerState(): NativeAdamState {
    if (this.#model.disposed) throw new Error("Model is disposed");
    return this.#native.exportAdamState();
  }

  /** Restores what optimizerState() gave: a resumed run then continues as if it had not stopped. */
  setOptimizerState(state: NativeAdamState): void {
    if (this.#model.disposed) throw new Error("Model is disposed");
    this.#native.importAdamState(state);
  }
}
