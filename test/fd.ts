// Central finite differences shared by the op tests (test/ops.test.ts, test/weights.test.ts).
// For an op y = f(x) and a random cotangent r, L(x) = sum(r * f(x)) (summed in float64); the analytic
// gradient must match (L(x + h e_i) - L(x - h e_i)) / 2h on sampled coordinates.
// Tolerance: |fd - analytic| <= 2e-2 * max|analytic| + 1e-4, with h = 1e-2: the ops run in fp32, so the
// difference quotient carries ~1e-4 relative rounding noise, and the O(h^2) truncation is ~1e-4.
import { expect } from "vitest";

export const H_STEP = 1e-2;

/** A small seeded uniform generator on [-0.5, 0.5) (an LCG: reproducible, no state to share). */
export function rng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296 - 0.5;
  };
}

/** Roughly normal values (sum of three uniforms) times `scale`. */
export function randn(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return new Float32Array(n).map(() => (r() + r() + r()) * scale);
}

export function dot(a: Float32Array, b: Float32Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

/**
 * Checks analytic[i] against central differences of loss(x) for up to `samples` coordinates; returns the
 * worst |fd - analytic| / max|analytic| (PRIORTUNE_REPORT=1 prints it for the record).
 */
export function checkGradient(
  x: Float32Array,
  loss: (x: Float32Array) => number,
  analytic: Float32Array,
  samples = 48,
): number {
  expect(analytic.length).toBe(x.length);
  let scale = 0;
  for (const v of analytic) scale = Math.max(scale, Math.abs(v));
  expect(scale, "gradient is not all zero").toBeGreaterThan(0);
  const step = Math.max(1, Math.floor(x.length / samples));
  let worst = 0;
  for (let i = 0; i < x.length; i += step) {
    const keep = x[i]!;
    x[i] = keep + H_STEP;
    const up = loss(x);
    x[i] = keep - H_STEP;
    const down = loss(x);
    x[i] = keep;
    const fd = (up - down) / (2 * H_STEP);
    worst = Math.max(worst, Math.abs(fd - analytic[i]!) / scale);
    expect(Math.abs(fd - analytic[i]!), `coordinate ${i}: fd ${fd} vs analytic ${analytic[i]}`).toBeLessThan(
      2e-2 * scale + 1e-4,
    );
  }
  if (process.env.PRIORTUNE_REPORT) console.log("finite differences: max |fd - analytic| / scale", worst);
  return worst;
}
