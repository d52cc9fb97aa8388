// Hugging Face config.json -> priortune's model description, and the tensor names each architecture needs.
import type { NativeLoadEntry, NativeModelConfig } from "./native.js";
import type { TensorInfo } from "./safetensors.js";

export interface RopeScaling {
  type: "default" | "linear" | "llama3";
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositions: number;
}

/** What `model.config` reports. Sizes follow Transformers' names, in camelCase. */
export interface ModelConfig {
  architecture: "gpt2" | "llama";
  /** The `architectures[0]` entry of config.json, e.g. "LlamaForCausalLM". */
  hfArchitecture: string;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediateSize: number;
  maxPositions: number;
  normEps: number;
  tiedHead: boolean;
  attentionBias: boolean;
  mlpBias: boolean;
  ropeTheta?: number;
  ropeScaling?: RopeScaling;
  /** Mistral-style sliding window; sequences longer than it are refused. */
  slidingWindow?: number;
  /** GPT-2's scale_attn_by_inverse_layer_idx: layer l's attention scores also scaled by 1 / (l + 1). */
  scaleAttnByInverseLayerIdx?: boolean;
}

type Json = Record<string, unknown>;

function num(cfg: Json, key: string, fallback?: number): number {
  const v = cfg[key];
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    throw new Error(`config.json: missing "${key}"`);
  }
  if (typeof v !== "number" || !Number.isFinite(v))
    throw new Error(`config.json: "${key}" must be a number, got ${JSON.stringify(v)}`);
  return v;
}

function nonNegative(cfg: Json, key: string, fallback: number): number {
  const v = num(cfg, key, fallback);
  if (v < 0) throw new Error(`config.json: "${key}" must be >= 0, got ${v}`);
  return v;
}

function slidingWindow(v: unknown): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1)
    throw new Error(
      `config.json: "sliding_window" must be a positive integer or null, got ${JSON.stringify(v)}`,
    );
  return v;
}

/** A number > 0 (RoPE's theta and factors: zero or less gives infinite or NaN frequencies). */
function positive(cfg: Json, key: string, fallback?: number): number {
  const v = num(cfg, key, fallback);
  if (!(v > 0)) throw new Error(`config.json: "${key}" must be > 0, got ${v}`);
  return v;
}

const GPT2_ARCHS = new Set(["GPT2LMHeadModel", "GPT2Model"]);
const LLAMA_ARCHS = new Set(["LlamaForCausalLM", "MistralForCausalLM", "LlamaModel"]);

export function parseConfig(cfg: Json): ModelConfig {
  const archs = (cfg.architectures as string[] | undefined) ?? [];
  const modelType = cfg.model_type as string | undefined;
  const hfArchitecture =
    archs[0] ?? (modelType === "gpt2" ? "GPT2LMHeadModel" : modelType === "llama" ? "LlamaForCausalLM" : "");
  if (GPT2_ARCHS.has(hfArchitecture)) return parseGpt2(cfg, hfArchitecture);
  if (LLAMA_ARCHS.has(hfArchitecture)) return parseLlama(cfg, hfArchitecture);
  throw new Error(
    `unsupported architecture '${hfArchitecture || modelType || "(none given)"}': priortune supports GPT2LMHeadModel and LlamaForCausalLM (incl. Mistral-style)`,
  );
}

function parseGpt2(cfg: Json, hfArchitecture: string): ModelConfig {
  const act = (cfg.activation_function as string | undefined) ?? "gelu_new";
  if (act !== "gelu_new" && act !== "gelu_pytorch_tanh") {
    throw new Error(
      `GPT-2 activation_function '${act}' is not supported (supported: gelu_new, gelu_pytorch_tanh)`,
    );
  }
  if (cfg.scale_attn_weights === false)
    throw new Error("GPT-2 with scale_attn_weights=false is not supported");
  const inverseLayer = cfg.scale_attn_by_inverse_layer_idx ?? false;
  if (typeof inverseLayer !== "boolean")
    throw new Error(
      `config.json: "scale_attn_by_inverse_layer_idx" must be a boolean, got ${JSON.stringify(inverseLayer)}`,
    );
  const hidden = num(cfg, "n_embd");
  const heads = num(cfg, "n_head");
  if (hidden % heads !== 0)
    throw new Error(`config.json: n_embd (${hidden}) is not a multiple of n_head (${heads})`);
  return {
    architecture: "gpt2",
    hfArchitecture,
    vocabSize: num(cfg, "vocab_size"),
    hiddenSize: hidden,
    numLayers: num(cfg, "n_layer"),
    numHeads: heads,
    numKvHeads: heads,
    headDim: hidden / heads,
    intermediateSize: num(cfg, "n_inner", 4 * hidden),
    maxPositions: num(cfg, "n_positions"),
    normEps: nonNegative(cfg, "layer_norm_epsilon", 1e-5),
    tiedHead: cfg.tie_word_embeddings !== false,
    attentionBias: true,
    mlpBias: true,
    ...(inverseLayer ? { scaleAttnByInverseLayerIdx: true } : {}),
  };
}

function parseRope(cfg: Json): { theta: number; scaling: RopeScaling } {
  // Transformers 4.x: rope_theta + rope_scaling {rope_type|type, ...}; 5.x: rope_parameters {rope_type, rope_theta, ...}.
  const params = (cfg.rope_parameters ?? cfg.rope_scaling ?? null) as Json | null;
  const theta = positive(params && typeof params.rope_theta === "number" ? params : cfg, "rope_theta", 10000);
  const type = ((params?.rope_type ?? params?.type ?? "default") as string).toLowerCase();
  if (type !== "default" && type !== "linear" && type !== "llama3") {
    throw new Error(`rope scaling type '${type}' is not supported (supported: default, linear, llama3)`);
  }
  const p = params ?? {};
  const scaling: RopeScaling = {
    type,
    factor: type === "default" ? 1 : positive(p, "factor"),
    lowFreqFactor: type === "llama3" ? positive(p, "low_freq_factor") : 1,
    highFreqFactor: type === "llama3" ? positive(p, "high_freq_factor") : 4,
    originalMaxPositions: type === "llama3" ? positive(p, "original_max_position_embeddings") : 8192,
  };
  if (scaling.highFreqFactor <= scaling.lowFreqFactor)
    throw new Error(
      `config.json: rope scaling "high_freq_factor" (${scaling.highFreqFactor}) must exceed "low_freq_factor" (${scaling.lowFreqFactor})`,
    );
  return { theta, scaling };
}

/** Whether a Llama-family config is Mistral's (whose config class has defaults of its own). */
export function isMistral(hfArchitecture: string, cfg: Json = {}): boolean {
  // model_type is what Transformers builds from (an earlier saveModel wrote "llama" beside a Mistral name).
  if (typeof cfg.model_type === "string") return cfg.model_type === "mistral";
  return hfArchitecture === "MistralForCausalLM";
}

function parseLlama(cfg: Json, hfArchitecture: string): ModelConfig {
  const act = (cfg.hidden_act as string | undefined) ?? "silu";
  if (act !== "silu") throw new Error(`Llama hidden_act '${act}' is not supported (supported: silu)`);
  const hidden = num(cfg, "hidden_size");
  const heads = num(cfg, "num_attention_heads");
  const kvHeads = num(cfg, "num_key_value_heads", heads);
  if (cfg.head_dim == null && hidden % heads !== 0)
    throw new Error(
      `config.json: hidden_size (${hidden}) is not a multiple of num_attention_heads (${heads}) and no head_dim is given`,
    );
  if (heads % kvHeads !== 0) {
    throw new Error(
      `config.json: num_attention_heads (${heads}) is not a multiple of num_key_value_heads (${kvHeads})`,
    );
  }
  const rope = parseRope(cfg);
  // Transformers' MistralConfig defaults, where config.json leaves them out: a window of 4096 (an absent key;
  // null is no window) and 131072 positions.
  const mistral = isMistral(hfArchitecture, cfg);
  const window = mistral && !("sliding_window" in cfg) ? 4096 : cfg.sliding_window;
  return {
    architecture: "llama",
    hfArchitecture,
    vocabSize: num(cfg, "vocab_size"),
    hiddenSize: hidden,
    numLayers: num(cfg, "num_hidden_layers"),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim: num(cfg, "head_dim", hidden / heads),
    intermediateSize: num(cfg, "intermediate_size"),
    maxPositions: num(cfg, "max_position_embeddings", mistral ? 131072 : 2048),
    normEps: nonNegative(cfg, "rms_norm_eps", 1e-6),
    tiedHead: cfg.tie_word_embeddings === true,
    attentionBias: cfg.attention_bias === true,
    mlpBias: cfg.mlp_bias === true,
    ropeTheta: rope.theta,
    ropeScaling: rope.scaling,
    slidingWindow: window == null ? undefined : slidingWindow(window),
  };
}

export function nativeConfig(c: ModelConfig, threads: number): NativeModelConfig {
  return {
    architecture: c.architecture,
    vocabSize: c.vocabSize,
    hiddenSize: c.hiddenSize,
    numLayers: c.numLayers,
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    intermediateSize: c.intermediateSize,
    maxPositions: c.maxPositions,
    normEps: c.normEps,
    tiedHead: c.tiedHead,
    attentionBias: c.attentionBias,
    mlpBias: c.mlpBias,
    scaleAttnByInverseLayerIdx: c.scaleAttnByInverseLayerIdx ?? false,
    ropeTheta: c.ropeTheta ?? 10000,
    ropeType: c.ropeScaling?.type ?? "default",
    ropeFactor: c.ropeScaling?.factor ?? 1,
    ropeLowFreqFactor: c.ropeScaling?.lowFreqFactor ?? 1,
    ropeHighFreqFactor: c.ropeScaling?.highFreqFactor ?? 4,
    ropeOriginalMaxPositions: c.ropeScaling?.originalMaxPositions ?? 8192,
    threads,
  };
}

/** One Hugging Face tensor that fills (part of) a canonical slot; see kernels/include/priortune/model.h. */
interface Need {
  hf: string;
  target: string;
  rowOffset: number;
  /** GPT-2 Conv1D weights are stored [in, out]; slots hold [out, in]. */
  transpose: boolean;
  /** The shape the config implies, as the slot holds it ([out, in] for a matrix, [n] for a vector). */
  shape: number[];
}

function needs(c: ModelConfig): Need[] {
  const out: Need[] = [];
  const add = (hf: string, target: string, shape: number[], rowOffset = 0, transpose = false) =>
    out.push({ hf, target, rowOffset, transpose, shape });
  const C = c.hiddenSize;
  const I = c.intermediateSize;
  if (c.architecture === "gpt2") {
    add("wte.weight", "tok_emb", [c.vocabSize, C]);
    add("wpe.weight", "pos_emb", [c.maxPositions, C]);
    add("ln_f.weight", "lnf.w", [C]);
    add("ln_f.bias", "lnf.b", [C]);
    for (let i = 0; i < c.numLayers; i++) {
      const h = `h.${i}.`;
      const l = `l${i}.`;
      add(`${h}ln_1.weight`, `${l}ln1.w`, [C]);
      add(`${h}ln_1.bias`, `${l}ln1.b`, [C]);
      add(`${h}attn.c_attn.weight`, `${l}qkv.w`, [3 * C, C], 0, true);
      add(`${h}attn.c_attn.bias`, `${l}qkv.b`, [3 * C]);
      add(`${h}attn.c_proj.weight`, `${l}proj.w`, [C, C], 0, true);
      add(`${h}attn.c_proj.bias`, `${l}proj.b`, [C]);
      add(`${h}ln_2.weight`, `${l}ln2.w`, [C]);
      add(`${h}ln_2.bias`, `${l}ln2.b`, [C]);
      add(`${h}mlp.c_fc.weight`, `${l}fc.w`, [I, C], 0, true);
      add(`${h}mlp.c_fc.bias`, `${l}fc.b`, [I]);
      add(`${h}mlp.c_proj.weight`, `${l}fc2.w`, [C, I], 0, true);
      add(`${h}mlp.c_proj.bias`, `${l}fc2.b`, [C]);
    }
  } else {
    const qRows = c.numHeads * c.headDim;
    const kvRows = c.numKvHeads * c.headDim;
    add("embed_tokens.weight", "tok_emb", [c.vocabSize, C]);
    add("norm.weight", "lnf.w", [C]);
    for (let i = 0; i < c.numLayers; i++) {
      const h = `layers.${i}.`;
      const l = `l${i}.`;
      add(`${h}input_layernorm.weight`, `${l}ln1.w`, [C]);
      add(`${h}post_attention_layernorm.weight`, `${l}ln2.w`, [C]);
      for (const kind of ["weight", ...(c.attentionBias ? ["bias"] : [])]) {
        const t = kind === "weight" ? "w" : "b";
        const m = (rows: number, cols: number) => (kind === "weight" ? [rows, cols] : [rows]);
        add(`${h}self_attn.q_proj.${kind}`, `${l}qkv.${t}`, m(qRows, C), 0);
        add(`${h}self_attn.k_proj.${kind}`, `${l}qkv.${t}`, m(kvRows, C), qRows);
        add(`${h}self_attn.v_proj.${kind}`, `${l}qkv.${t}`, m(kvRows, C), qRows + kvRows);
        add(`${h}self_attn.o_proj.${kind}`, `${l}proj.${t}`, m(C, qRows));
      }
      for (const kind of ["weight", ...(c.mlpBias ? ["bias"] : [])]) {
        const t = kind === "weight" ? "w" : "b";
        const m = (rows: number, cols: number) => (kind === "weight" ? [rows, cols] : [rows]);
        add(`${h}mlp.gate_proj.${kind}`, `${l}fc.${t}`, m(I, C), 0);
        add(`${h}mlp.up_proj.${kind}`, `${l}fc.${t}`, m(I, C), I);
        add(`${h}mlp.down_proj.${kind}`, `${l}fc2.${t}`, m(C, I));
      }
    }
  }
  if (!c.tiedHead) add("lm_head.weight", "lm_head", [c.vocabSize, C]);
  return out;
}

/** Strips the wrapper prefixes checkpoints use ("transformer.", "model."); lm_head keeps its name. */
function canonicalName(name: string): string {
  for (const prefix of ["transformer.", "model."])
    if (name.startsWith(prefix)) return name.slice(prefix.length);
  return name;
}

/**
 * The native load plan for a model directory's tensors. Throws naming every missing tensor, and any tensor
 * with an unsupported dtype or a shape that does not match the config.
 */
export function loadPlan(
  c: ModelConfig,
  tensors: Map<string, TensorInfo>,
): { entries: NativeLoadEntry[]; dtypes: Set<string> } {
  const byName = new Map<string, TensorInfo>();
  for (const [name, info] of tensors) byName.set(canonicalName(name), info);
  const missing: string[] = [];
  const entries: NativeLoadEntry[] = [];
  const dtypes = new Set<string>();
  for (const n of needs(c)) {
    const t = byName.get(n.hf);
    if (!t) {
      missing.push(n.hf);
      continue;
    }
    if (t.dtype !== "F32" && t.dtype !== "F16" && t.dtype !== "BF16" && t.dtype !== "F64") {
      throw new Error(
        `tensor '${t.name}' has dtype ${t.dtype}; priortune loads F32, F16, BF16 and F64 weights`,
      );
    }
    dtypes.add(t.dtype);
    // The shape the config implies, checked per tensor (the native loader checks only that each fits its
    // slot, so a q_proj and k_proj of swapped heights would otherwise fill the fused qkv slot wrongly).
    const stored = n.transpose ? [...n.shape].reverse() : n.shape;
    if (t.shape.length !== stored.length || t.shape.some((x, i) => x !== stored[i]))
      throw new Error(
        `tensor '${t.name}' in ${t.file} has shape [${t.shape}], but config.json implies [${stored}] ` +
          `(hidden ${c.hiddenSize}, heads ${c.numHeads}/${c.numKvHeads} of ${c.headDim}, intermediate ${c.intermediateSize}, vocab ${c.vocabSize})`,
      );
    const rows = n.shape[0]!;
    const cols = n.shape.length === 2 ? n.shape[1]! : 1;
    entries.push({
      name: t.name,
      target: n.target,
      rowOffset: n.rowOffset,
      file: t.file,
      offset: t.offset,
      dtype: t.dtype as NativeLoadEntry["dtype"],
      rows,
      cols,
      transpose: n.transpose,
    });
  }
  if (missing.length > 0) {
    const shown =
      missing.slice(0, 8).join(", ") + (missing.length > 8 ? `, ... (${missing.length} in all)` : "");
    throw new Error(`model weights are missing tensor(s) required by ${c.hfArchitecture}: ${shown}`);
  }
  return { entries, dtypes };
}

/** Parameter count of the frozen model (tied heads counted once). */
export function parameterCount(c: ModelConfig): number {
  const C = c.hiddenSize;
  const qkv = (c.numHeads + 2 * c.numKvHeads) * c.headDim;
  const o = c.numHeads * c.headDim;
  let perLayer: number;
  let rest = c.vocabSize * C;
  if (c.architecture === "gpt2") {
    perLayer = 4 * C + qkv * C + qkv + o * C + C + 2 * c.intermediateSize * C + c.intermediateSize + C;
    rest += c.maxPositions * C + 2 * C;
  } else {
    const I = c.intermediateSize;
    perLayer = 2 * C + qkv * C + o * C + 3 * I * C;
    if (c.attentionBias) perLayer += qkv + C;
    if (c.mlpBias) perLayer += 2 * I + C;
    rest += C;
  }
  if (!c.tiedHead) rest += c.vocabSize * C;
  return rest + c.numLayers * perLayer;
}
