// Central finite differences for every op's backward, on tiny random shapes, independent of the fixtures.
// For an op y = f(x) and a random cotangent r, L(x) = sum(r * f(x)) (summed in float64); the analytic
// gradient backward(r) must match (L(x + h e_i) - L(x - h e_i)) / 2h on sampled coordinates.
// Tolerance: |fd - analytic| <= 2e-2 * max|analytic| + 1e-4, with h = 1e-2: the ops run in fp32, so the
// difference quotient carries ~1e-4 relative rounding noise, and the O(h^2) truncation is ~1e-4.
import { describe, expect, it } from "vitest";
import { addon } from "../lib/native.js";
import { checkGradient, dot, randn } from "./fd.js";

const ops = addon().ops;

describe("finite-difference checks of the CPU ops' backward", () => {
  const N = 5;
  const C = 12;

  it("layernorm", () => {
    const x = randn(N * C, 1);
    const w = randn(C, 2);
    const b = randn(C, 3);
    const r = randn(N * C, 4);
    const [, mean, rstd] = ops.layernorm(x, w, b, N, C);
    const dx = ops.layernormBackward(r, x, w, mean, rstd, N, C);
    checkGradient(x, (v) => dot(ops.layernorm(v, w, b, N, C)[0], r), dx);
  });

  it("rmsnorm", () => {
    const x = randn(N * C, 5);
    const w = randn(C, 6);
    const r = randn(N * C, 7);
    const [, rstd] = ops.rmsnorm(x, w, N, C);
    const dx = ops.rmsnormBackward(r, x, w, rstd, N, C);
    checkGradient(x, (v) => dot(ops.rmsnorm(v, w, N, C)[0], r), dx);
  });

  // Both norms are scale-invariant once eps is negligible, so s d/dx at s x is the same for every large s.
  // RMSNorm's rstd^3 falls below FLT_MIN once entries pass ~1e13: the backward must not form it.
  it.each([
    { name: "layernorm", ln: true },
    { name: "rmsnorm", ln: false },
  ])("$name backward keeps its precision on rows of scale 1e30", ({ ln }) => {
    const x = randn(N * C, 14);
    const w = randn(C, 15);
    const b = randn(C, 16);
    const r = randn(N * C, 17);
    const grad = (v: Float32Array) => {
      if (ln) {
        const [, mean, rstd] = ops.layernorm(v, w, b, N, C);
        return ops.layernormBackward(r, v, w, mean, rstd, N, C);
      }
      const [, rstd] = ops.rmsnorm(v, w, N, C);
      return ops.rmsnormBackward(r, v, w, rstd, N, C);
    };
    const want = grad(x.map((v) => v * 1e10)).map((v) => v * 1e10);
    const got = grad(x.map((v) => v * 1e30)).map((v) => v * 1e30);
    const scale = Math.max(...want.map(Math.abs));
    for (let i = 0; i < want.length; i++) expect(Math.abs(got[i] - want[i])).toBeLessThan(1e-5 * scale);
  });

  it("gelu (tanh approximation)", () => {
    const x = randn(64, 8, 2);
    const r = randn(64, 9);
    checkGradient(x, (v) => dot(ops.gelu(v), r), ops.geluBackward(x, r));
  });

  it("swiglu", () => {
    const I = 7;
    const g = randn(N * 2 * I, 10, 2);
    const r = randn(N * I, 11);
    checkGradient(g, (v) => dot(ops.swiglu(v, N, I), r), ops.swigluBackward(g, r, N, I));
  });

  it("rope: the backward is the transpose of the rotation", () => {
    const [B, S, heads, hd] = [2, 5, 3, 8];
    const x = randn(B * S * heads * hd, 12);
    const r = randn(x.length, 13);
    checkGradient(
      x,
      (v) => dot(ops.rope(v, B, S, heads, hd, 10000, false), r),
      ops.rope(r, B, S, heads, hd, 10000, true),
    );
  });

  describe.each([
    { name: "multi-head", H: 2, KV: 2, Pp: 0 },
    { name: "grouped-query", H: 4, KV: 2, Pp: 0 },
    { name: "grouped-query with key/value prefixes", H: 4, KV: 2, Pp: 3 },
  ])("attention, $name, causal with padding", ({ H, KV, Pp }) => {
    const [B, S, hd] = [2, 5, 4];
    const scale = 1 / Math.sqrt(hd);
    const qkv = randn(B * S * (H + 2 * KV) * hd, 14);
    const mask = Uint8Array.from([1, 1, 1, 1, 1, 1, 1, 1, 0, 0]); // second sequence right-padded
    const pk = Pp ? randn(Pp * KV * hd, 15) : null;
    const pv = Pp ? randn(Pp * KV * hd, 16) : null;
    const r = randn(B * S * H * hd, 17);
    const run = (q: Float32Array, k: Float32Array | null, v: Float32Array | null) =>
      ops.attention(q, mask, k, v, Pp, B, S, H, KV, hd, scale)[0];
    const [, probs] = ops.attention(qkv, mask, pk, pv, Pp, B, S, H, KV, hd, scale);
    const [dqkv, dpk, dpv] = ops.attentionBackward(r, probs, qkv, pk, pv, Pp, B, S, H, KV, hd, scale, S);

    it("gradient of q, k and v", () => {
      checkGradient(qkv, (v) => dot(run(v, pk, pv), r), dqkv, 96);
    });
    if (Pp > 0) {
      it("gradient of the prefix keys and values", () => {
        checkGradient(pk!, (v) => dot(run(qkv, v, pv), r), dpk);
        checkGradient(pv!, (v) => dot(run(qkv, pk, v), r), dpv);
      });
    }
    it("qRows limits only dq: dk and dv are unchanged", () => {
      const [part] = ops.attentionBackward(r, probs, qkv, pk, pv, Pp, B, S, H, KV, hd, scale, 2);
      const ld = (H + 2 * KV) * hd;
      for (let row = 0; row < B * S; row++) {
        for (let c = 0; c < ld; c++) {
          const full = dqkv[row * ld + c]!;
          const got = part[row * ld + c]!;
          if (c < H * hd && row % S >= 2) expect(got).toBe(0);
          else expect(got).toBeCloseTo(full, 6);
        }
      }
    });
  });

  it("LM head + cross-entropy (fused), with an ignored row", () => {
    const [R, Cx, V] = [4, 6, 11];
    const x = randn(R * Cx, 18);
    const W = randn(V * Cx, 19);
    const targets = Int32Array.from([3, -100, 10, 0]);
    const [, dx] = ops.lmHeadCrossentropy(x, targets, W, R, Cx, V);
    checkGradient(x, (v) => ops.lmHeadCrossentropy(v, targets, W, R, Cx, V)[0], dx);
    for (let c = 0; c < Cx; c++) expect(dx[Cx + c]).toBe(0);
  });
});
