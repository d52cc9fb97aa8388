// AdamW over prompt tensors, stepping in the native core (no JS-side array math in a training step).
import type { LossAndGrad } from "./model.js";
import type { DeepPrompts } from "./native.js";
import { addon } from "./native.js";
import { checkRequiredOptions, type OptionKeys, requireFloat32 } from "./validate.js";

export interface AdamWOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** Decoupled weight decay (PyTorch's AdamW default 0.01). */
  weightDecay?: number;
  /**
   * Per tensor, a factor on the learning rate (default 1 each): parameter groups with their own rates, as
   * PyTorch's (a schedule scales every group alike). The paper trains activation-space vectors at 1e-3
   * beside token-space ones at 5e-3.
   */
  lrScale?: number[];
}

const ADAMW_KEYS = {
  lr: true,
  beta1: true,
  beta2: true,
  eps: true,
  weightDecay: true,
  lrScale: true,
} satisfies OptionKeys<AdamWOptions>;

/** The trainable tensors of a prompt-tuning run, in a fixed order: the soft prompt, then the deep prompts. */
export function promptTensors(prompt?: Float32Array, deep?: DeepPrompts): Float32Array[] {
  const out: Float32Array[] = prompt ? [prompt] : [];
  if (deep?.kind === "hidden") out.push(...deep.vectors);
  if (deep?.kind === "prefix") out.push(...deep.keys, ...deep.values);
  return out;
}

/** The inverse of promptTensors: `flat` (in promptTensors order) shaped as `like`'s prompt and deep prompts. */
export function fromPromptTensors(
  like: { prompt?: Float32Array; deepPrompts?: DeepPrompts },
  flat: Float32Array[],
): { prompt?: Float32Array; deepPrompts?: DeepPrompts } {
  let k = 0;
  const next = () => flat[k++]!;
  const prompt = like.prompt ? next() : undefined;
  const d = like.deepPrompts;
  const deep: DeepPrompts | undefined =
    d === undefined
      ? undefined
      : d.kind === "hidden"
        ? { kind: "hidden", layers: [...d.layers], vectors: d.vectors.map(next) }
        : { kind: "prefix", layers: [...d.layers], keys: d.keys.map(next), values: d.values.map(next) };
  return { ...(prompt ? { prompt } : {}), ...(deep ? { deepPrompts: deep } : {}) };
}

/** The gradients of lossAndGrad in the order of promptTensors. */
export function promptGrads(g: LossAndGrad): Float32Array[] {
  const out: Float32Array[] = g.promptGrad ? [g.promptGrad] : [];
  const d = g.deepPromptGrads;
  if (d?.kind === "hidden") out.push(...d.vectors);
  if (d?.kind === "prefix") out.push(...d.keys, ...d.values);
  return out;
}

/**
 * torch.optim.AdamW's update (decoupled decay, bias correction), in place on the given tensors.
 * State (m, v, step) is exposed for checkpoints.
 */
export class AdamW {
  readonly params: Float32Array[];
  readonly m: Float32Array[];
  readonly v: Float32Array[];
  stepCount = 0;
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly lrScale: number[];

  constructor(params: Float32Array[], options: AdamWOptions) {
    if (!Array.isArray(params) || params.length === 0)
      throw new TypeError("params: expected a non-empty array of Float32Array");
    this.params = params.map((p, i) => requireFloat32(p, `params[${i}]`));
    checkRequiredOptions(options, "AdamW options", ADAMW_KEYS);
    this.m = this.params.map((p) => new Float32Array(p.length));
    this.v = this.params.map((p) => new Float32Array(p.length));
    const { lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0.01 } = options;
    for (const [name, value] of Object.entries({ lr, beta1, beta2, eps, weightDecay })) {
      if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
        throw new RangeError(`${name}: expected a finite number >= 0, got ${value}`);
      }
    }
    if (beta1 >= 1 || beta2 >= 1) throw new RangeError("beta1 and beta2 must be below 1");
    const scale = options.lrScale ?? this.params.map(() => 1);
    if (
      !Array.isArray(scale) ||
      scale.length !== this.params.length ||
      !scale.every((x) => typeof x === "number" && Number.isFinite(x) && x >= 0)
    )
      throw new RangeError(`lrScale: expected ${this.params.length} finite numbers >= 0 (one per tensor)`);
    this.lrScale = [...scale];
    this.lr = lr;
    this.beta1 = beta1;
    this.beta2 = beta2;
    this.eps = eps;
    this.weightDecay = weightDecay;
  }

  /** One update with the given gradients (same order and lengths as params); `lr` overrides for schedules. */
  step(grads: Float32Array[], lr = this.lr): void {
    if (!Array.isArray(grads) || grads.length !== this.params.length) {
      throw new TypeError(`grads: expected ${this.params.length} Float32Array (one per parameter tensor)`);
    }
    // Everything is checked before any state changes: a refused step leaves the step count and tensors as
    // they were (else the bias correction would be off by one for the rest of the run).
    this.params.forEach((p, i) => {
      requireFloat32(grads[i], `grads[${i}]`, p.length);
    });
    if (typeof lr !== "number" || !Number.isFinite(lr) || lr < 0)
      throw new RangeError(`lr: expected a finite number >= 0, got ${lr}`);
    this.stepCount += 1;
    const native = addon();
    for (let i = 0; i < this.params.length; i++) {
      native.adamwStep(
        this.params[i]!,
        grads[i]!,
        this.m[i]!,
        this.v[i]!,
        lr * this.lrScale[i]!,
        this.beta1,
        this.beta2,
        this.eps,
        this.weightDecay,
        this.stepCount,
      );
    }
  }
}
