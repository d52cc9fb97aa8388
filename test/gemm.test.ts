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

// Packing (register transposes for operands read along k, row copies for the others; portable loops with the
// generic kernel) moves values only, and each C element is summed in one order wherever it sits in the tiles:
// any block of the product, computed alone through strided views (rows and columns starting mid-panel,
// unaligned starts, leading dimensions wider than the rows, padded with NaN so that a read past a row's end
// shows), equals that block of the full product bit for bit, at 1 and 2 threads. K = 604: two full KC blocks
// and a tail of 92 (not a multiple of 8).
describe.each(kernels)("sgemm blocks with the %s micro-kernel", (kernel) => {
  it("a block through strided views equals the full product's block, every transpose", () => {
    native.selectGemmKernel(kernel);
    const [M, N, K] = [75, 93, 604];
    const pad = 5;
    const blocks = [
      [3, 70, 5, 90],
      [1, 2, 31, 33],
      [9, 75, 0, 17],
    ];
    // rows x cols with row stride cols + pad, the padding NaN
    const padded = (rows: number, cols: number, seed: number) => {
      const v = rand(rows * cols, seed);
      const out = new Float32Array(rows * (cols + pad)).fill(Number.NaN);
      for (let r = 0; r < rows; r++) out.set(v.subarray(r * cols, (r + 1) * cols), r * (cols + pad));
      return out;
    };
    for (const ta of [false, true])
      for (const tb of [false, true]) {
        const A = ta ? padded(K, M, 5) : padded(M, K, 5);
        const B = tb ? padded(N, K, 6) : padded(K, N, 6);
        const lda = (ta ? M : K) + pad;
        const ldb = (tb ? K : N) + pad;
        const full = new Float32Array(M * N);
        native.gemm(ta, tb, M, N, K, 1, A, lda, B, ldb, 0, full, N, 2);
        expect(full.some(Number.isNaN), `ta=${ta} tb=${tb}: a padding value was read`).toBe(false);
        for (const [i0, i1, j0, j1] of blocks) {
          const m = i1! - i0!;
          const n = j1! - j0!;
          const a = A.subarray(ta ? i0! : i0! * lda);
          const b = B.subarray(tb ? j0! * ldb : j0!);
          for (const threads of [1, 2]) {
            const part = new Float32Array(m * n);
            native.gemm(ta, tb, m, n, K, 1, a, lda, b, ldb, 0, part, n, threads);
            let differ = 0;
            for (let i = 0; i < m; i++)
              for (let j = 0; j < n; j++)
                if (!Object.is(part[i * n + j], full[(i0! + i) * N + j0! + j])) differ++;
            expect(differ, `ta=${ta} tb=${tb} rows ${i0}-${i1} cols ${j0}-${j1} threads ${threads}`).toBe(0);
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

// Linear layers of a few rows (token-by-token decoding): up to 32 rows stream W once (AVX-512 tiles with the
// GEMM's AVX-512 kernel, else plain dot products), each out[n, o] summed in the same order whatever the other rows,
// so a row's result is the same alone or in any batch of up to 32 (generation's tokens do not depend on the
// batch). Against float64 with the GEMM's tolerance.
describe.each(kernels)("matmul of a few rows (decoding), with the %s GEMM kernel", (kernel) => {
  it.each([
    [768, 67],
    [770, 5],
    [8, 33],
  ])("C=%i OC=%i: each row as alone, N = 1..33, and the float64 values", (C, OC) => {
    native.selectGemmKernel(kernel);
    const rows = 33;
    const x = rand(rows * C, 11 + C);
    const W = rand(OC * C, 12 + OC);
    const bias = rand(OC, 13);
    const alone = Array.from({ length: rows }, (_, n) =>
      native.ops.matmul(x.subarray(n * C, (n + 1) * C), W, bias, 1, C, OC),
    );
    for (const N of [2, 3, 4, 5, 8, 17, 32, 33]) {
      const out = native.ops.matmul(x.subarray(0, N * C), W, bias, N, C, OC);
      let differ = 0;
      let worst = 0;
      for (let n = 0; n < N; n++)
        for (let o = 0; o < OC; o++) {
          if (out[n * OC + o] !== alone[n]![o]) differ++;
          let ref = bias[o]!;
          for (let c = 0; c < C; c++) ref += x[n * C + c]! * W[o * C + c]!;
          worst = Math.max(worst, Math.abs(out[n * OC + o]! - ref) / ((1 + Math.abs(ref)) * Math.sqrt(C)));
        }
      // 33 rows go to the blocked GEMM (another summation order): accuracy only.
      if (N <= 32) expect(differ, `N=${N}`).toBe(0);
      expect(worst, `N=${N}`).toBeLessThan(1e-5 / 4);
    }
  });
});
