// Shared test helpers: fixture paths, golden files, and error measures with stated tolerances.
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { NativeAdamWOptions } from "../lib/native.js";
import { readTensors, type TensorData } from "../lib/safetensors.js";

export const fixtures = join(dirname(fileURLToPath(import.meta.url)), "fixtures");
export const modelDir = (name: string) => join(fixtures, "models", name);

/** Copies a fixture model directory to `dst` (replacing what is there), to edit the copy. Returns `dst`. */
export function copyModelDir(name: string, dst: string): string {
  rmSync(dst, { recursive: true, force: true });
  mkdirSync(dst, { recursive: true });
  for (const f of readdirSync(modelDir(name))) copyFileSync(join(modelDir(name), f), join(dst, f));
  return dst;
}

export interface Golden {
  get(name: string): TensorData;
  shape(name: string): number[];
  meta: Record<string, string>;
}

export function readGolden(model: string): Golden {
  const { tensors, metadata } = readTensors(join(fixtures, "golden", `${model}.safetensors`));
  return {
    get(name) {
      const t = tensors.get(name);
      if (!t) throw new Error(`golden ${model}: no tensor ${name}`);
      return t.data;
    },
    shape(name) {
      return tensors.get(name)!.shape;
    },
    meta: metadata,
  };
}

/** Largest |a - b| and the largest |b| (the reference's scale). */
export function compare(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
): { maxAbs: number; scale: number } {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} != ${expected.length}`);
  let maxAbs = 0;
  let scale = 0;
  for (let i = 0; i < actual.length; i++) {
    maxAbs = Math.max(maxAbs, Math.abs(actual[i]! - expected[i]!));
    scale = Math.max(scale, Math.abs(expected[i]!));
  }
  return { maxAbs, scale };
}

export function toInt32(data: TensorData): Int32Array {
  return data instanceof Int32Array ? data : Int32Array.from(data as ArrayLike<number>);
}

export function toUint8(data: TensorData): Uint8Array {
  return Uint8Array.from(data as ArrayLike<number>);
}

export function toFloat32(data: TensorData): Float32Array {
  return Float32Array.from(data as ArrayLike<number>);
}

/** The labelled, right-padded batch of a golden file (input_ids, attention_mask, labels). */
export function goldenBatch(g: Golden): {
  inputIds: Int32Array;
  attentionMask: Uint8Array;
  labels: Int32Array;
  batch: number;
  seqLen: number;
} {
  const [batch, seqLen] = g.shape("input_ids") as [number, number];
  return {
    inputIds: toInt32(g.get("input_ids")),
    attentionMask: toUint8(g.get("attention_mask")),
    labels: toInt32(g.get("labels")),
    batch,
    seqLen,
  };
}

/** The AdamW settings a golden file's curve was trained with, in AdamWOptions' names. */
export function goldenAdamW(g: Golden): NativeAdamWOptions {
  const a = JSON.parse(g.meta.adamw!) as Record<string, number>;
  return {
    lr: a.lr!,
    beta1: a.beta1!,
    beta2: a.beta2!,
    eps: a.eps!,
    weightDecay: a.weight_decay!,
    maxGradNorm: a.max_grad_norm ?? 0,
  };
}

/**
 * Runs fn with the environment variable `name` set to value (undefined: unset), then restores it. The addon
 * reads PRIORTUNE_CUDA_GEMM at every product and PRIORTUNE_CUDA_KNN at every search.
 */
export async function withEnv<T>(name: string, value: string | undefined, fn: () => Promise<T>): Promise<T> {
  const before = process.env[name];
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
  try {
    return await fn();
  } finally {
    if (before === undefined) delete process.env[name];
    else process.env[name] = before;
  }
}

/** withEnv for several variables at once (each undefined value: unset), all restored afterwards. */
export function withEnvs<T>(vars: Record<string, string | undefined>, fn: () => Promise<T>): Promise<T> {
  return Object.entries(vars).reduceRight<() => Promise<T>>(
    (inner, [name, value]) =>
      () =>
        withEnv(name, value, inner),
    fn,
  )();
}
