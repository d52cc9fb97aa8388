// The GEMM every CPU op stands on, against a float64 reference, for every micro-kernel this CPU has,
// all transpose combinations, odd shapes (partial register tiles) and beta in {0, 0.3}.
// Tolerance: |C - ref| <= 1e-5 * (1 + |ref|) * sqrt(K)/4 — fp32 accumulation error grows with sqrt(K).
import { afterAll, describe, expect, it } from "vitest";
import { addon } from "../lib/native.js";

const native = addon();
const original = native.cpuInfo().gemmKernel;
afterAll(() => native.selectGemmKernel(original as "avx512"));

function rand(n: number, seed: number): Float32Array {
  let s = seed;
  return new Float32Array(n).map(() => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return s / 2147483648 - 0.5;
  });
}

const kernels = (["generic", "avx2", "avx512"] as const).filter((k) => native.selectGemmKernel(k));

describe.each(kernels)("sgemm with the %s micro-kernel", (kernel) => {
  it.each([
    [1, 1, 1],
    [7, 33, 5],
    [33, 17, 300],
    [130, 70, 257],
    [64, 96, 512],
  ])("M=%i N=%i K=%i, every transpose, beta 0 and 0.3", (M, N, K) => {
    native.selectGemmKernel(kernel);
    for (const ta of [false, true]) {
      for (const tb of [false, true]) {
        for (const beta of [0, 0.3]) {
          const A = rand(M * K, 1 + M);
          const B = rand(K * N, 2 + N);
          const C0 = rand(M * N, 3 + K);
          const C = C0.slice();
          if (beta === 0) C.fill(Number.NaN); // beta = 0 must not read C
          const lda = ta ? M : K;
          const ldb = tb ? K : N;
          native.gemm(ta, tb, M, N, K, 0.7, A, lda, B, ldb, beta, C, N, 2);
          let worst = 0;
          for (let i = 0; i < M; i++) {
            for (let j = 0; j < N; j++) {
              let s = 0;
              for (let k = 0; k < K; k++)
                s += (ta ? A[k * lda + i]! : A[i * lda + k]!) * (tb ? B[j * ldb + k]! : B[k * ldb + j]!);
              const ref = 0.7 * s + beta * C0[i * N + j]!;
              worst = Math.max(worst, Math.abs(C[i * N + j]! - ref) / (1 + Math.abs(ref)));
            }
          }
          expect(worst, `ta=${ta} tb=${tb} beta=${beta}`).toBeLessThan((1e-5 * Math.sqrt(K)) / 4 + 1e-6);
        }
      }
    }
  });
});

// The float64 covariance behind every Gaussian fit (collapse reference, fitted priors) runs register tiles of
// the GEMM's instruction set: against a float64 reference for odd widths (partial panels) and several row
// chunks, bit-identical for any thread count, and the same bits from the AVX-512 and AVX2 tiles (both fuse
// each multiply-add, in row order).
describe("float64 covariance tiles", () => {
  async function covariance(x: Float32Array, d: number, threads: number): Promise<Float64Array> {
    const fit = await native.priorGaussianFit(x, d, { keepCovariance: true }, threads);
    return fit.covariance!;
  }

  it.each([
    [600, 37],
    [300, 48],
    [257, 8],
    [3, 1],
  ])("n=%i d=%i with every kernel this CPU has", async (n, d) => {
    const x = rand(n * d, 11 + d).map((v, i) => 5 + v * (1 + (i % d) / 3));
    const mean = new Float64Array(d);
    for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) mean[j] += x[r * d + j]! / n;
    const ref = new Float64Array(d * d);
    for (let r = 0; r < n; r++)
      for (let i = 0; i < d; i++)
        for (let j = 0; j < d; j++)
          ref[i * d + j] += ((x[r * d + i]! - mean[i]!) * (x[r * d + j]! - mean[j]!)) / (n - 1);
    const scale = Math.max(...ref.map(Math.abs));
    const bits: Record<string, Buffer> = {};
    try {
      for (const kernel of kernels) {
        native.selectGemmKernel(kernel);
        const one = await covariance(x, d, 1);
        let worst = 0;
        for (let i = 0; i < d * d; i++) worst = Math.max(worst, Math.abs(one[i]! - ref[i]!) / scale);
        expect(worst, kernel).toBeLessThan(1e-13);
        for (let i = 0; i < d; i++)
          for (let j = 0; j < i; j++) expect(one[i * d + j], `${kernel} symmetric`).toBe(one[j * d + i]);
        bits[kernel] = Buffer.from(one.buffer);
        expect(
          Buffer.from((await covariance(x, d, 2)).buffer).equals(bits[kernel]!),
          `${kernel} threads`,
        ).toBe(true);
      }
    } finally {
      native.selectGemmKernel(original as "avx512");
    }
    if (bits.avx512 && bits.avx2) expect(bits.avx512.equals(bits.avx2)).toBe(true);
  });
});

describe("gemm argument checks", () => {
  it("rejects arrays too short for the shape", () => {
    const a = new Float32Array(4);
    expect(() => native.gemm(false, false, 2, 2, 3, 1, a, 3, a, 2, 0, a, 2, 1)).toThrow(/A: array too short/);
    expect(() =>
      native.gemm(
        false,
        false,
        2,
        2,
        2,
        1,
        a,
        2,
        new Int32Array(4) as unknown as Float32Array,
        2,
        0,
        a,
        2,
        1,
      ),
    ).toThrow(/B: expected Float32Array, got Int32Array/);
  });
});

describe("build flavour", () => {
  it("matches what CI built (PRIORTUNE_EXPECT_CUDA_COMPILED)", () => {
    const expected = process.env.PRIORTUNE_EXPECT_CUDA_COMPILED;
    const info = native.cudaInfo();
    if (expected !== undefined) expect(info.compiled).toBe(expected === "1");
    // The CUDA build always carries the model kernels (kernels/cuda/model.cu).
    expect(info.modelKernels).toBe(info.compiled);
    // Without a GPU or driver the probe must answer with a reason, never crash.
    if (!info.usable) expect(info.reason.length).toBeGreaterThan(0);
  });
});
