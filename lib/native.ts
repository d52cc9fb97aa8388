// Loads the compiled addon and types it by hand (the one place that knows the native surface).
// The addon is searched at $PRIORTUNE_ADDON, then build/Release/priortune.node of this package.
import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ModelConfig } from "./config.js";

export interface CudaInfo {
  compiled: boolean;
  usable: boolean;
  deviceCount: number;
  reason: string;
  name: string;
  computeCapability: string;
  totalMemory: number;
  /** This build has the CUDA model kernels (kernels/cuda). */
  modelKernels: boolean;
}

/** What the native model is built from: the parsed config's sizes plus the flattened RoPE settings. */
/** Full-parameter AdamW state (see NativeModel.exportAdamState). */
export interface NativeAdamState {
  step: number;
  m: Record<string, Float32Array>;
  v: Record<string, Float32Array>;
}

export interface NativeModelConfig
  extends Pick<
    ModelConfig,
    | "architecture"
    | "vocabSize"
    | "hiddenSize"
    | "numLayers"
    | "numHeads"
    | "numKvHeads"
    | "headDim"
    | "intermediateSize"
    | "maxPositions"
    | "normEps"
    | "tiedHead"
    | "attentionBias"
    | "mlpBias"
  > {
  scaleAttnByInverseLayerIdx: boolean;
  ropeTheta: number;
  ropeType: string;
  ropeFactor: number;
  ropeLowFreqFactor: number;
  ropeHighFreqFactor: number;
  ropeOriginalMaxPositions: number;
  threads: number;
}

export interface NativeLoadEntry {
  /** The tensor's name in the file, for errors (default: target). */
  name?: string;
  target: string;
  rowOffset: number;
  file: string;
  offset: number;
  dtype: "F32" | "F16" | "BF16" | "F64";
  rows: number;
  cols: number;
  transpose: boolean;
}

export type DeepPrompts =
  | { kind: "hidden"; layers: number[]; vectors: Float32Array[] }
  | { kind: "prefix"; layers: number[]; keys: Float32Array[]; values: Float32Array[] };

export interface NativeForwardArgs {
  deepPrompts?: DeepPrompts;
  inputIds: Int32Array;
  batch: number;
  seqLen: number;
  attentionMask?: Uint8Array;
  labels?: Int32Array;
  prompt?: Float32Array;
  hiddenStates?: number[];
  logits?: boolean;
}

export interface NativeForwardResult {
  logits?: Float32Array;
  hiddenStates: Float32Array[];
  loss?: number;
  labelCount?: number;
}

export interface NativeGradResult {
  loss: number;
  labelCount: number;
  /** d loss / d prompt, P x hiddenSize (when a prompt was given). */
  promptGrad?: Float32Array;
  /** Same shapes as the deepPrompts given: one array per layer. */
  deepPromptGrads?:
    | { kind: "hidden"; vectors: Float32Array[] }
    | { kind: "prefix"; keys: Float32Array[]; values: Float32Array[] };
}

export interface NativeModel {
  loadTensors(entries: NativeLoadEntry[]): Promise<void>;
  checkComplete(): void;
  forward(args: NativeForwardArgs): Promise<NativeForwardResult>;
  lossAndGrad(args: NativeForwardArgs & { labels: Int32Array }): Promise<NativeGradResult>;
  generate(args: NativeForwardArgs, maxNewTokens: number, eosId: number): Promise<Int32Array>;
  tokenEmbeddings(): Float32Array;
  weightBytes(): number;
  dispose(): void;
}

/**
 * A native kNN search's result; deviceMs: the CUDA kernels' device time (events, query preparation included),
 * deviceScreenMs the preparation and screening part of it; both 0 on the CPU.
 */
export interface NativeKnnResult {
  indices: Int32Array;
  scores: Float32Array;
  recoveredQueries: number;
  deviceMs: number;
  deviceScreenMs: number;
}

export interface Addon {
  cudaInfo(): CudaInfo;
  cpuInfo(): { gemmKernel: string; hardwareThreads: number };
  gemm(
    transA: boolean,
    transB: boolean,
    M: number,
    N: number,
    K: number,
    alpha: number,
    A: Float32Array,
    lda: number,
    B: Float32Array,
    ldb: number,
    beta: number,
    C: Float32Array,
    ldc: number,
    threads: number,
  ): void;
  selectGemmKernel(name: "avx512" | "avx2" | "generic"): boolean;
  fmaPeakGflops(threads: number): number;
  /** The process's held directory locks, shared by its worker threads (lib/files.ts lockDirectory). */
  heldLock(op: "add" | "delete" | "has", path: string): boolean;
  adamwStep(
    param: Float32Array,
    grad: Float32Array,
    m: Float32Array,
    v: Float32Array,
    lr: number,
    beta1: number,
    beta2: number,
    eps: number,
    weightDecay: number,
    step: number,
  ): void;
  NativeModel: new (config: NativeModelConfig) => NativeModel;
  /** Single CPU ops, synchronous, for the finite-difference tests (native/ops.cpp). */
  ops: NativeOps;
  // --- nearest-neighbour search (kernels/cpu/knn.cpp, native/knn.cpp) ---
  NativeKnnIndex: new () => {
    build(
      vocab: Float32Array,
      dim: number,
      metric: string,
      backend: "cpu" | "cuda",
      threads: number,
    ): Promise<void>;
    search(queries: Float32Array, k: number, threads: number): Promise<NativeKnnResult>;
    searchRows(rows: Int32Array, k: number, threads: number, excludeSelf: boolean): Promise<NativeKnnResult>;
    /** The listed rows, copied (ids.length x dim). */
    rowsAt(ids: Int32Array): Float32Array;
    info(): {
      rows: number;
      dim: number;
      metric: string;
      backend: string;
      hostBytes: number;
      deviceBytes: number;
    };
    dispose(): void;
  };
  knnSearchOnce(
    queries: Float32Array,
    vocab: Float32Array,
    dim: number,
    metric: string,
    k: number,
    threads: number,
  ): Promise<NativeKnnResult>;
  /** Test hook: the kNN float64 re-scoring sums of one instruction set (null where the CPU lacks it). */
  knnDots4(
    isa: "avx512" | "avx2" | "generic",
    yDouble: boolean,
    x: Float32Array,
    y: Float32Array,
  ): Float64Array | null;
  mahalanobisSquared(
    vectors: Float32Array,
    dim: number,
    mean: Float64Array,
    cholesky: Float64Array,
    threads: number,
  ): Promise<Float64Array>;
  meanDistances(
    queries: Float32Array,
    rows: Float32Array,
    dim: number,
    threads: number,
  ): Promise<Float64Array>;
  gramEigenvalues(x: Float32Array, dim: number, threads: number): Promise<Float64Array>;
  // --- priors and regularisers (kernels/cpu/prior_gaussian.cpp, native/priors.cpp) ---
  /** rows: an array, or a NativeKnnIndex (fitted to all its rows, read in place). */
  priorGaussianFit(
    rows: Float32Array | InstanceType<Addon["NativeKnnIndex"]>,
    dim: number,
    options: { shrinkage?: number; ridgeAbsolute?: number; ridgeRelative?: number; keepCovariance?: boolean },
    threads: number,
  ): Promise<{
    mean: Float64Array;
    cholesky: Float64Array;
    covariance: Float64Array | null;
    ridge: number;
    meanVariance: number;
    logDet: number;
    covarianceSeconds: number;
    choleskySeconds: number;
  }>;
  priorCholesky(
    matrix: Float64Array,
    dim: number,
    threads: number,
  ): Promise<{ cholesky: Float64Array; logDet: number; seconds: number }>;
  /** mean + scale * L z per row of z (synchronous). */
  priorGaussianTransform(
    z: Float64Array,
    dim: number,
    mean: Float64Array,
    cholesky: Float64Array,
    scale: number,
    threads: number,
  ): Float32Array;
  /** Squared Mahalanobis distances and, when asked, Sigma^-1 (x - mean) per row (synchronous). */
  priorGaussianEnergy(
    x: Float32Array,
    dim: number,
    mean: Float64Array,
    cholesky: Float64Array,
    gradient: boolean,
    threads: number,
  ): { mahalanobisSquared: Float64Array; gradient: Float32Array | null };
  /** Exact L2 nearest row of a fixed set (synchronous, for the nearest-vocabulary regulariser). */
  NativeNearestRows: new (
    vocab: Float32Array,
    dim: number,
    threads: number,
  ) => {
    nearest(queries: Float32Array, threads: number): Int32Array;
    rowsAt(ids: Int32Array): Float32Array;
    rows(): number;
    dispose(): void;
  };
  // --- end priors ---
}

export interface NativeOps {
  layernorm(
    x: Float32Array,
    w: Float32Array,
    b: Float32Array,
    N: number,
    C: number,
  ): [Float32Array, Float32Array, Float32Array];
  layernormBackward(
    dout: Float32Array,
    x: Float32Array,
    w: Float32Array,
    mean: Float32Array,
    rstd: Float32Array,
    N: number,
    C: number,
  ): Float32Array;
  rmsnorm(x: Float32Array, w: Float32Array, N: number, C: number): [Float32Array, Float32Array];
  rmsnormBackward(
    dout: Float32Array,
    x: Float32Array,
    w: Float32Array,
    rstd: Float32Array,
    N: number,
    C: number,
  ): Float32Array;
  gelu(x: Float32Array): Float32Array;
  geluBackward(x: Float32Array, dout: Float32Array): Float32Array;
  swiglu(gateUp: Float32Array, N: number, I: number): Float32Array;
  swigluBackward(gateUp: Float32Array, dout: Float32Array, N: number, I: number): Float32Array;
  rope(
    x: Float32Array,
    B: number,
    S: number,
    heads: number,
    hd: number,
    theta: number,
    backward: boolean,
  ): Float32Array;
  attention(
    qkv: Float32Array,
    keyMask: Uint8Array | null,
    prefixK: Float32Array | null,
    prefixV: Float32Array | null,
    Pp: number,
    B: number,
    S: number,
    H: number,
    KV: number,
    hd: number,
    scale: number,
  ): [Float32Array, Float32Array];
  attentionBackward(
    dout: Float32Array,
    probs: Float32Array,
    qkv: Float32Array,
    prefixK: Float32Array | null,
    prefixV: Float32Array | null,
    Pp: number,
    B: number,
    S: number,
    H: number,
    KV: number,
    hd: number,
    scale: number,
    qRows: number,
  ): [Float32Array, Float32Array, Float32Array];
  lmHeadCrossentropy(
    x: Float32Array,
    targets: Int32Array,
    W: Float32Array,
    R: number,
    C: number,
    V: number,
  ): [number, Float32Array];
}

/** The package root: the nearest ancestor directory whose package.json is priortune's. */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = join(dir, "package.json");
    if (existsSync(pj) && JSON.parse(readFileSync(pj, "utf8")).name === "priortune") return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error("priortune: cannot find the package root above " + import.meta.url);
    dir = parent;
  }
}

let cached: Addon | undefined;

/** Where the addon is loaded from: $PRIORTUNE_ADDON, else this package's build/Release/priortune.node. */
export function addonPath(): string {
  return process.env.PRIORTUNE_ADDON ?? join(packageRoot(), "build", "Release", "priortune.node");
}

/** The native addon, loaded once. Throws an error that says how to build it when it is missing. */
export function addon(): Addon {
  if (cached) return cached;
  const path = addonPath();
  if (!existsSync(path)) {
    throw new Error(
      `priortune: native addon not found at ${path}: its install script did not run or failed. ` +
        `In a project that depends on priortune, allow it (\`npm approve-scripts priortune\`, or ` +
        `"allowScripts": { "priortune": true } in package.json) and run \`npm rebuild priortune\`; in a ` +
        `checkout of priortune, \`npm run build:native\` (cmake-js) or \`npm run build:gyp\` (node-gyp)`,
    );
  }
  cached = createRequire(import.meta.url)(path) as Addon;
  return cached;
}

// --- full-parameter training (kernels/cpu/model.cpp "Full-parameter training", native/model.cpp) ---
// Declaration merging adds these members to NativeModel and NativeOps above.

/** AdamW settings of one full-parameter step (weight decay only on the slots the core decays). */
export interface NativeAdamWOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Clip the global gradient norm to this before the update; 0 = no clipping. */
  maxGradNorm: number;
}

export interface NativeModel {
  /** Canonical weight slots (kernels/include/priortune/model.h) with their [rows, cols] shapes. */
  slots(): { name: string; rows: number; cols: number }[];
  /** Copies of every slot's fp32 weights, by canonical name. */
  exportTensors(): Record<string, Float32Array>;
  /** Copies rows x cols finite values into each named slot and marks it loaded. */
  importTensors(tensors: Record<string, Float32Array>): void;
  /** AdamW's step count and moments of every slot (copies; empty before the first trainStep). */
  exportAdamState(): NativeAdamState;
  /** Restores what exportAdamState gave (checked whole before anything changes). */
  importAdamState(state: NativeAdamState): void;
  /** Loss and d loss / d every weight slot (token-id batches only; labels required). */
  trainGrads(
    args: NativeForwardArgs & { labels: Int32Array },
  ): Promise<{ loss: number; labelCount: number; gradients: Record<string, Float32Array> }>;
  /** trainGrads, then one AdamW step on every slot; gradNorm is the global norm before clipping. */
  trainStep(
    args: NativeForwardArgs & { labels: Int32Array },
    adamw: NativeAdamWOptions,
  ): Promise<{ loss: number; labelCount: number; gradNorm: number; step: number }>;
}

/** Weight-gradient halves of the ops; the gradient arrays are accumulated (+=) in place. */
export interface NativeOps {
  matmul(
    x: Float32Array,
    W: Float32Array,
    bias: Float32Array | null,
    N: number,
    C: number,
    OC: number,
  ): Float32Array;
  matmulBackwardWeights(
    dW: Float32Array,
    dbias: Float32Array | null,
    dout: Float32Array,
    x: Float32Array,
    N: number,
    C: number,
    OC: number,
  ): void;
  layernormBackwardWeights(
    dw: Float32Array,
    db: Float32Array,
    dout: Float32Array,
    x: Float32Array,
    mean: Float32Array,
    rstd: Float32Array,
    N: number,
    C: number,
  ): void;
  rmsnormBackwardWeights(
    dw: Float32Array,
    dout: Float32Array,
    x: Float32Array,
    rstd: Float32Array,
    N: number,
    C: number,
  ): void;
  embedding(
    ids: Int32Array,
    prompt: Float32Array | null,
    P: number,
    wte: Float32Array,
    wpe: Float32Array | null,
    posOffset: number,
    B: number,
    T: number,
    C: number,
  ): Float32Array;
  embeddingBackwardWeights(
    dwte: Float32Array,
    dwpe: Float32Array | null,
    dout: Float32Array,
    ids: Int32Array,
    P: number,
    posOffset: number,
    B: number,
    T: number,
    C: number,
  ): void;
  /** [lossSum, dx] with grad_scale 1; dW (+=) the head's weight gradient. */
  lmHeadCrossentropyWeights(
    dW: Float32Array,
    x: Float32Array,
    targets: Int32Array,
    W: Float32Array,
    R: number,
    C: number,
    V: number,
  ): [number, Float32Array];
}
// --- end full-parameter training ---
// --- activation and prompt analyses (kernels/cpu/analysis_linalg.cpp, native/analysis.cpp) ---
// Declaration merging adds these members to Addon above.

export interface Addon {
  /** Symmetric eigen-decomposition (float64): values descending, row k of vectors = eigenvector k. */
  analysisSymmetricEigen(
    matrix: Float64Array,
    dim: number,
    vectors: boolean,
    threads: number,
  ): Promise<{ values: Float64Array; vectors: Float64Array | null }>;
  /** rows(a) x rows(b) squared Euclidean distances (b null: a against itself, exact zero diagonal). */
  analysisPairwiseSquaredDistances(
    a: Float32Array,
    b: Float32Array | null,
    dim: number,
    threads: number,
  ): Promise<Float64Array>;
  /** tr sqrt(S1^1/2 S2 S1^1/2) of two symmetric positive semi-definite matrices (the Frechet cross term). */
  analysisTraceSqrtProduct(s1: Float64Array, s2: Float64Array, dim: number, threads: number): Promise<number>;
  /** tr(S2^-1 S1) from the lower Cholesky factors L2, L1. */
  analysisTraceInverseProduct(
    l2: Float64Array,
    l1: Float64Array,
    dim: number,
    threads: number,
  ): Promise<number>;
  /** The float64 mean and unbiased covariance of the rows (n >= 2). */
  analysisCovariance(
    rows: Float32Array,
    dim: number,
    threads: number,
  ): Promise<{ mean: Float64Array; covariance: Float64Array }>;
}
// --- end analyses ---

// --- CUDA backend (kernels/cuda/model.cu, native/model.cpp "CUDA backend") ---

export type CudaPrecision = "bf16" | "tf32" | "fp32";

export interface DeviceMemory {
  device: string;
  precision: CudaPrecision;
  /** Bytes of weights on the device. */
  weightBytes: number;
  /** Bytes of activations, scratch and device-resident trainables held now. */
  workspaceBytes: number;
  deviceFreeBytes: number;
  deviceTotalBytes: number;
}

/** One CUDA op compared with its CPU reference: err = max |gpu - cpu| / max |cpu|, pass = err <= tol. */
export interface CudaOpCheck {
  op: string;
  shape: string;
  err: number;
  tol: number;
  pass: boolean;
  note: string;
}

export interface NativeModel {
  /** Uploads the weights to CUDA device 0; forward and lossAndGrad then run there. */
  attachCuda(options: {
    precision?: CudaPrecision;
    graphs?: boolean;
    profile?: boolean;
  }): Promise<DeviceMemory>;
  deviceMemory(): DeviceMemory;
  /** Milliseconds per stage since the last call (attachCuda with profile: true; profiled steps run eagerly). */
  deviceProfile(): Record<string, number>;
  /** Device-resident trainables for promptStep (AdamW state reset). */
  setTrainables(t: { prompt?: Float32Array; deepPrompts?: DeepPrompts }): Promise<void>;
  /** Copies of the device-resident tensors ("param", default) or AdamW's moments ("m", "v"); step = AdamW steps. */
  trainables(
    slot?: "param" | "m" | "v",
  ): Promise<{ prompt?: Float32Array; deepPrompts?: DeepPrompts; step: number }>;
  /** Restores AdamW's moments (shaped as the trainables) and step count. */
  setOptimizerState(
    m: { prompt?: Float32Array; deepPrompts?: DeepPrompts },
    v: { prompt?: Float32Array; deepPrompts?: DeepPrompts },
    step: number,
  ): Promise<void>;
  /** Loss, gradients and one AdamW step of the device-resident trainables, on the device. */
  promptStep(
    args: NativeForwardArgs & { labels: Int32Array },
    adamw: NativeAdamWOptions,
  ): Promise<{ loss: number; labelCount: number; gradNorm: number; step: number }>;
}

export interface Addon {
  /**
   * Every CUDA op against its CPU reference on device 0, or those of the parts named ("gemm", "elementwise",
   * "attention"); rejects without a usable device.
   */
  cudaSelfTest(parts?: string[]): Promise<CudaOpCheck[]>;
  /**
   * Median ms (CUDA events) of the device GEMM C[M, N] = A[M, K] . B[N, K]^T ("nt", default) or A . B[K, N]
   * ("nn", the input-gradient products) on random operands, and its max |C - R| / max |R| against our fp32
   * GEMM; engine "cublaslt" times cuBLASLt (loaded at run time: $PRIORTUNE_CUBLASLT or
   * libcublasLt.so.13/.12) instead.
   */
  cudaGemmBench(
    precision: CudaPrecision,
    M: number,
    N: number,
    K: number,
    iters: number,
    engine?: "priortune" | "cublaslt",
    layout?: "nt" | "nn",
  ): Promise<{ ms: number; maxRelErr: number; engine: string }>;
}

export interface NativeModel {
  /** Synthetic weights for benchmarks: uniform values of standard deviation std, norm weights 1, biases 0. */
  fillRandom(seed: number, std: number): Promise<void>;
}
