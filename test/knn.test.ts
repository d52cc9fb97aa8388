// Exact nearest-neighbour search against a plain float64 brute force written here, on random data, duplicated
// rows, near-ties, zero rows, all three metrics and k in {1, 10, 1024}; CUDA against the CPU where a device is.
import { describe, expect, it } from "vitest";
import { type KnnMetric, MAX_K, type NeighborResult, nearestNeighbors, VocabIndex } from "../lib/knn.js";
import { addon } from "../lib/native.js";
import { seededRandom } from "../lib/stats.js";
import { withEnv } from "./helpers.js";

// ---- the float64 reference -------------------------------------------------------------------------------

function metricValue(metric: KnnMetric, q: Float32Array, v: Float32Array): number {
  let dot = 0;
  let qq = 0;
  let vv = 0;
  let dist2 = 0;
  for (let i = 0; i < q.length; i++) {
    dot += q[i] * v[i];
    qq += q[i] * q[i];
    vv += v[i] * v[i];
    dist2 += (q[i] - v[i]) * (q[i] - v[i]);
  }
  if (metric === "dot") return dot;
  if (metric === "l2") return dist2;
  const nq = Math.sqrt(qq);
  const nv = Math.sqrt(vv);
  return nq === 0 || nv === 0 ? 0 : dot / (nq * nv);
}

/** Top-k by float64 value, ties to the lower index; l2 values are squared here, square-rooted on return. */
function bruteForce(
  queries: Float32Array,
  vocab: Float32Array,
  dim: number,
  k: number,
  metric: KnnMetric,
  exclude?: Int32Array,
): { indices: Int32Array; values: Float64Array } {
  const Q = queries.length / dim;
  const V = vocab.length / dim;
  const indices = new Int32Array(Q * k);
  const values = new Float64Array(Q * k);
  for (let q = 0; q < Q; q++) {
    const qv = queries.subarray(q * dim, (q + 1) * dim);
    const all: { m: number; i: number }[] = [];
    for (let r = 0; r < V; r++) {
      if (exclude && exclude[q] === r) continue;
      all.push({ m: metricValue(metric, qv, vocab.subarray(r * dim, (r + 1) * dim)), i: r });
    }
    all.sort((a, b) => (a.m !== b.m ? (metric === "l2" ? a.m - b.m : b.m - a.m) : a.i - b.i));
    for (let t = 0; t < k; t++) {
      indices[q * k + t] = all[t].i;
      values[q * k + t] = metric === "l2" ? Math.sqrt(all[t].m) : all[t].m;
    }
  }
  return { indices, values };
}

function expectExact(got: NeighborResult, want: { indices: Int32Array; values: Float64Array }): void {
  expect(Array.from(got.indices)).toEqual(Array.from(want.indices));
  for (let i = 0; i < got.scores.length; i++) {
    // fp32 rounding of the float64 value: half an ulp, plus a tiny absolute slack for values near 0.
    expect(Math.abs(got.scores[i] - want.values[i])).toBeLessThanOrEqual(
      Math.abs(want.values[i]) * 2 ** -23 + 1e-12,
    );
  }
}

// ---- data ------------------------------------------------------------------------------------------------

function gaussian(n: number, seed: number, scale = 1): Float32Array {
  const r = seededRandom(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u = Math.max(r(), 1e-12);
    const v = r();
    const m = Math.sqrt(-2 * Math.log(u)) * scale;
    out[i] = m * Math.cos(2 * Math.PI * v);
    if (i + 1 < n) out[i + 1] = m * Math.sin(2 * Math.PI * v);
  }
  return out;
}

const METRICS: KnnMetric[] = ["cosine", "l2", "dot"];
type GemmKernel = Parameters<ReturnType<typeof addon>["selectGemmKernel"]>[0];

// ---- CPU -------------------------------------------------------------------------------------------------

describe("VocabIndex (CPU) equals the float64 brute force", () => {
  // dim 300 > the GEMM's 256-wide k-blocks; 1500 rows is not a multiple of any panel width.
  const dim = 300;
  const V = 1500;
  const vocab = gaussian(V * dim, 1);
  const queries = gaussian(13 * dim, 2);

  for (const metric of METRICS) {
    for (const k of [1, 10, 1024]) {
      it(`${metric}, k = ${k}`, async () => {
        const index = await VocabIndex.create(vocab, { dim, metric, backend: "cpu" });
        try {
          const got = await index.search(queries, { k });
          expect(got.count).toBe(13);
          expect(got.deviceMs).toBe(0);
          expectExact(got, bruteForce(queries, vocab, dim, k, metric));
        } finally {
          index.dispose();
        }
      });
    }
  }

  it("odd shapes: dim 37, 70 rows, 1 query, and a queries view with a byte offset", async () => {
    const d = 37;
    const v = gaussian(70 * d, 3);
    const backing = gaussian(5 * d, 4);
    const q = backing.subarray(2 * d, 3 * d);
    for (const metric of METRICS) {
      const got = await nearestNeighbors(q, v, { dim: d, k: 70, metric, backend: "cpu" });
      expectExact(got, bruteForce(q, v, d, 70, metric));
    }
  });

  it("tiny dimensions (1 and 3), where cosines tie massively", async () => {
    for (const d of [1, 3]) {
      const v = gaussian(300 * d, 40 + d);
      const q = gaussian(4 * d, 50 + d);
      for (const metric of METRICS) {
        const got = await nearestNeighbors(q, v, { dim: d, k: 20, metric, backend: "cpu" });
        expectExact(got, bruteForce(q, v, d, 20, metric));
      }
    }
  });

  it("is independent of the thread count", async () => {
    const index = await VocabIndex.create(vocab, { dim, metric: "cosine", backend: "cpu", threads: 1 });
    const one = await index.search(queries, { k: 10, threads: 1 });
    const two = await index.search(queries, { k: 10, threads: 2 });
    const many = await index.search(queries, { k: 10, threads: 7 });
    expect(Array.from(two.indices)).toEqual(Array.from(one.indices));
    expect(Array.from(many.indices)).toEqual(Array.from(one.indices));
    expect(Array.from(two.scores)).toEqual(Array.from(one.scores));
    index.dispose();
  });

  it("duplicated rows: exact ties go to the lower index, also with more copies than candidates", async () => {
    const d = 64;
    const base = gaussian(400 * d, 5);
    // Row 7 copied to 150 further places (more than the 43 screening candidates of k = 10): the screening bound
    // cannot certify and the query is searched again with more candidates.
    const V2 = 400 + 150;
    const v = new Float32Array(V2 * d);
    v.set(base);
    for (let c = 0; c < 150; c++) v.set(base.subarray(7 * d, 8 * d), (400 + c) * d);
    // And rows 20, 21 equal to row 3.
    v.set(base.subarray(3 * d, 4 * d), 20 * d);
    v.set(base.subarray(3 * d, 4 * d), 21 * d);
    const q = new Float32Array(3 * d);
    q.set(base.subarray(7 * d, 8 * d), 0);
    q.set(base.subarray(3 * d, 4 * d), d);
    q.set(gaussian(d, 6), 2 * d);
    for (const metric of METRICS) {
      for (const k of [1, 10, 200]) {
        const got = await nearestNeighbors(q, v, { dim: d, k, metric, backend: "cpu" });
        expectExact(got, bruteForce(q, v, d, k, metric));
      }
    }
    const got = await nearestNeighbors(q, v, { dim: d, k: 10, metric: "cosine", backend: "cpu" });
    expect(Array.from(got.indices.subarray(0, 10))).toEqual([7, 400, 401, 402, 403, 404, 405, 406, 407, 408]);
    expect(got.recoveredQueries).toBeGreaterThan(0);
  });

  it("equal rows score the same bits wherever they fall (dim 37: rows not 64-byte aligned; any thread count)", async () => {
    const d = 37;
    const base = gaussian(3000 * d, 31);
    const copies = [5, 6, 7, 8, 9, 100, 1001, 2002, 2999]; // (re-scored four at a time, in any grouping)
    const v = new Float32Array(base);
    for (const c of copies) v.set(base.subarray(5 * d, 6 * d), c * d);
    const q = new Float32Array(2 * d);
    q.set(base.subarray(5 * d, 6 * d));
    q.set(gaussian(d, 32), d);
    for (let i = d; i < 2 * d; i++) q[i] = 0.25 * q[i] + base[5 * d + (i - d)];
    for (const metric of METRICS) {
      const want = bruteForce(q, v, d, 12, metric);
      for (const threads of [1, 2, 3]) {
        const got = await nearestNeighbors(q, v, { dim: d, k: 12, metric, backend: "cpu", threads });
        expectExact(got, want);
        for (let row = 0; row < 2; row++) {
          const ids = Array.from(got.indices.subarray(row * 12, row * 12 + copies.length));
          expect(ids).toEqual(copies);
          const first = got.scores[row * 12];
          for (let t = 1; t < copies.length; t++) expect(got.scores[row * 12 + t]).toBe(first);
        }
      }
    }
  });

  it("a vocabulary of more than 8 MiB (copied in parallel blocks) keeps every row, with 1 and 3 threads", async () => {
    const d = 64;
    const V = 33001; // 8.06 MiB: five 2 MiB blocks, the last partial
    const v = gaussian(V * d, 33);
    const q = new Float32Array(v.subarray((V - 1) * d, V * d)); // the last row, in the partial block
    for (const threads of [1, 3]) {
      const index = await VocabIndex.create(v, { dim: d, metric: "l2", backend: "cpu", threads });
      try {
        const back = index.rowsAt([0, 16384, V - 1]);
        expect(Array.from(back.subarray(0, d))).toEqual(Array.from(v.subarray(0, d)));
        expect(Array.from(back.subarray(d, 2 * d))).toEqual(Array.from(v.subarray(16384 * d, 16385 * d)));
        expect(Array.from(back.subarray(2 * d))).toEqual(Array.from(q));
        const got = await index.search(q, { k: 1 });
        expect(got.indices[0]).toBe(V - 1);
        expect(got.scores[0]).toBe(0);
      } finally {
        index.dispose();
      }
      const once = await nearestNeighbors(q, v, { dim: d, k: 3, metric: "l2", backend: "cpu", threads });
      expectExact(once, bruteForce(q, v, d, 3, "l2"));
    }
  });

  it("a second screening round with 4x the candidates certifies what the first could not", async () => {
    const d = 32;
    const base = gaussian(2000 * d, 17);
    const v = new Float32Array(base);
    for (let c = 0; c < 60; c++) v.set(base.subarray(5 * d, 6 * d), (1000 + c) * d); // 61 equal rows > 43
    const q = new Float32Array(base.subarray(5 * d, 6 * d));
    for (const metric of METRICS) {
      // One thread: one candidate buffer keeping 43 for all rows (with more threads each holds a share of the copies).
      const got = await nearestNeighbors(q, v, { dim: d, k: 10, metric, backend: "cpu", threads: 1 });
      expect(got.recoveredQueries).toBe(1);
      expectExact(got, bruteForce(q, v, d, 10, metric));
    }
  });

  it("a query that takes four rounds (43, 172, 688 candidates, then the exact scan) is recovered once", async () => {
    const d = 32;
    const base = gaussian(2000 * d, 19);
    const v = new Float32Array(base);
    for (let c = 0; c < 999; c++) v.set(base.subarray(5 * d, 6 * d), (1000 + c) * d); // 1000 equal rows
    const q = new Float32Array(base.subarray(5 * d, 6 * d));
    const got = await nearestNeighbors(q, v, { dim: d, k: 10, metric: "cosine", backend: "cpu", threads: 1 });
    expect(got.recoveredQueries).toBe(1);
    expectExact(got, bruteForce(q, v, d, 10, "cosine"));
  });

  it("concurrent searches on one index agree", async () => {
    const index = await VocabIndex.create(vocab, { dim, metric: "l2", backend: "cpu" });
    const results = await Promise.all([1, 2, 3, 4].map(() => index.search(queries, { k: 10 })));
    for (const r of results) expect(Array.from(r.indices)).toEqual(Array.from(results[0].indices));
    index.dispose();
  });

  it("near-ties that fp32 cannot separate are ranked like float64", async () => {
    const d = 256;
    const r = seededRandom(9);
    const base = gaussian(300 * d, 10);
    const v = new Float32Array(base);
    // Rows 100..139: row 50 with one component nudged by one ulp, up or down; their cosines and dot products
    // with a query equal to row 50 differ from row 50's by about 1e-8 relative, below the fp32 GEMM's error.
    for (let c = 0; c < 40; c++) {
      const row = new Float32Array(base.subarray(50 * d, 51 * d));
      const j = Math.floor(r() * d);
      const bits = new Int32Array(row.buffer, j * 4, 1);
      bits[0] += r() < 0.5 ? 1 : -1;
      v.set(row, (100 + c) * d);
    }
    // The query is row 50 plus small noise: rows 50 and 100..139 are its 41 nearest, separated by ~1e-9
    // relative (far above float64 rounding, far below fp32's). A query *equal* to row 50 would make the cosine
    // differences (~1e-17) smaller than float64 rounding, where no two float64 implementations need agree.
    const q = new Float32Array(base.subarray(50 * d, 51 * d));
    const noise = gaussian(d, 16, 1e-3);
    for (let i = 0; i < d; i++) q[i] += noise[i];
    for (const metric of METRICS) {
      for (const k of [1, 10, 41]) {
        const got = await nearestNeighbors(q, v, { dim: d, k, metric, backend: "cpu" });
        const want = bruteForce(q, v, d, k, metric);
        if (metric !== "cosine") {
          expectExact(got, want);
          continue;
        }
        // Cosine: the nudges move the dot product and the norm together, so some pairs of rows differ by less
        // than float64 rounding (rows 102 and 122 here: 0.9999996165022312 both, in this file's plain sums),
        // where no two summation orders need agree. Each position holds a row whose value is the t-th best to
        // float64 rounding, every row once.
        expect(new Set(got.indices).size).toBe(k);
        for (let t = 0; t < k; t++) {
          const row = got.indices[t];
          const m = metricValue(metric, q, v.subarray(row * d, (row + 1) * d));
          expect(Math.abs(m - want.values[t])).toBeLessThanOrEqual(1e-14);
          expect(Math.abs(got.scores[t] - want.values[t])).toBeLessThanOrEqual(2 ** -24);
        }
      }
    }
  });

  it("zero-norm rows and queries: cosine 0 (so ties to the lowest indices), l2 and dot as defined", async () => {
    const d = 16;
    const v = gaussian(50 * d, 11);
    v.fill(0, 10 * d, 11 * d);
    const q = new Float32Array(2 * d);
    q.set(gaussian(d, 12), d);
    for (const metric of METRICS) {
      const got = await nearestNeighbors(q, v, { dim: d, k: 50, metric, backend: "cpu" });
      expectExact(got, bruteForce(q, v, d, 50, metric));
    }
    const cos = await nearestNeighbors(q, v, { dim: d, k: 5, metric: "cosine", backend: "cpu" });
    expect(Array.from(cos.indices.subarray(0, 5))).toEqual([0, 1, 2, 3, 4]);
    expect(Array.from(cos.scores.subarray(0, 5))).toEqual([0, 0, 0, 0, 0]);
  });

  it("self-search returns each row's nearest other rows", async () => {
    const d = 48;
    const v = gaussian(600 * d, 13);
    v.set(v.subarray(5 * d, 6 * d), 9 * d); // row 9 duplicates row 5
    const index = await VocabIndex.create(v, { dim: d, metric: "cosine", backend: "cpu" });
    const rows = Int32Array.from([0, 5, 9, 599, 300]);
    for (const k of [1, 10]) {
      const got = await index.selfSearch({ k, rows, chunkRows: 2 });
      const q = new Float32Array(rows.length * d);
      rows.forEach((r, i) => {
        q.set(v.subarray(r * d, (r + 1) * d), i * d);
      });
      expectExact(got, bruteForce(q, v, d, k, "cosine", rows));
    }
    const all = await index.selfSearch({ k: 1, chunkRows: 128 });
    expect(all.count).toBe(600);
    expect(all.indices[5]).toBe(9);
    expect(all.indices[9]).toBe(5);
    for (let i = 0; i < 600; i++) expect(all.indices[i]).not.toBe(i);
    index.dispose();
  });

  it("candidate buffers cut many times, and under massive ties, with every kernel's scan", async () => {
    // 20005 rows: each thread's buffers fill and are cut back many times (the scan follows the GEMM kernel's
    // instruction set: AVX-512, AVX2 or scalar; kernels this CPU lacks are skipped). Rows of entries +-1 (d = 4)
    // tie massively, so the cut by bisection finds no value between the ties and selects exactly. Self-search
    // excludes each query's own row while its buffers are cut, the last one in the AVX2 scan's scalar tail.
    const d = 16;
    const v = gaussian(20005 * d, 21);
    const q = gaussian(7 * d, 22);
    const dq = 4;
    const vq = gaussian(20000 * dq, 23).map(Math.sign);
    const qq = gaussian(5 * dq, 24).map(Math.sign);
    const rows = Int32Array.from([0, 7, 9999, 19999, 20004]);
    const qs = new Float32Array(rows.length * d);
    rows.forEach((r, i) => {
      qs.set(v.subarray(r * d, (r + 1) * d), i * d);
    });
    const want = new Map<number, ReturnType<typeof bruteForce>>();
    for (const k of [1, 10, 100]) want.set(k, bruteForce(q, v, d, k, "cosine"));
    const wantSelf = bruteForce(qs, v, d, 10, "cosine", rows);
    const wantTied = new Map(METRICS.map((m) => [m, bruteForce(qq, vq, dq, 30, m)]));
    const initial = addon().cpuInfo().gemmKernel as GemmKernel;
    try {
      for (const kernel of ["avx512", "avx2", "generic"] as const) {
        if (!addon().selectGemmKernel(kernel)) continue;
        for (const k of [1, 10, 100]) {
          for (const threads of [1, 3]) {
            const got = await nearestNeighbors(q, v, {
              dim: d,
              k,
              metric: "cosine",
              backend: "cpu",
              threads,
            });
            expectExact(got, want.get(k)!);
            // The gap between the k-th and the 2c-th candidates is far above the screening error: a cut that
            // kept too few candidates would show as a second round.
            expect(got.recoveredQueries).toBe(0);
          }
        }
        const index = await VocabIndex.create(v, { dim: d, metric: "cosine", backend: "cpu" });
        try {
          expectExact(await index.selfSearch({ k: 10, rows, chunkRows: 3 }), wantSelf);
        } finally {
          index.dispose();
        }
        for (const metric of METRICS) {
          const got = await nearestNeighbors(qq, vq, { dim: dq, k: 30, metric, backend: "cpu", threads: 2 });
          expectExact(got, wantTied.get(metric)!);
        }
      }
    } finally {
      addon().selectGemmKernel(initial);
    }
  });

  it("one-shot searches (rows packed during the search, in 256-wide k-slices) with every kernel, dim 300", async () => {
    const initial = addon().cpuInfo().gemmKernel as GemmKernel;
    const want = new Map(METRICS.map((m) => [m, bruteForce(queries, vocab, dim, 10, m)]));
    try {
      for (const kernel of ["avx512", "avx2", "generic"] as const) {
        if (!addon().selectGemmKernel(kernel)) continue;
        for (const metric of METRICS) {
          const got = await nearestNeighbors(queries, vocab, { dim, k: 10, metric, backend: "cpu" });
          expectExact(got, want.get(metric)!);
          expect(got.recoveredQueries).toBe(0);
          const index = await VocabIndex.create(vocab, { dim, metric, backend: "cpu" });
          try {
            const viaIndex = await index.search(queries, { k: 10 });
            expect(Array.from(viaIndex.scores)).toEqual(Array.from(got.scores));
            expect(viaIndex.recoveredQueries).toBe(0);
          } finally {
            index.dispose();
          }
        }
      }
    } finally {
      addon().selectGemmKernel(initial);
    }
  });

  it("all GEMM micro-kernels give the exact answer, with the same bits (their float64 re-scoring included)", async () => {
    // dim 100: twelve 8-wide steps and a tail of 4 in the float64 sums. k = 60 with 40 queries re-scores by rows
    // (3-4 candidates per row), k = 10 by queries.
    const d = 100;
    const v = gaussian(900 * d, 14);
    const q = gaussian(40 * d, 15);
    const kernels = ["avx2", "generic", "avx512"] as const;
    const initial = addon().cpuInfo().gemmKernel as GemmKernel;
    const ran = new Set<string>();
    try {
      for (const metric of METRICS) {
        for (const k of [10, 60]) {
          const want = bruteForce(q, v, d, k, metric);
          let first: NeighborResult | undefined;
          for (const kernel of kernels) {
            if (!addon().selectGemmKernel(kernel)) continue; // (this CPU lacks it)
            ran.add(kernel);
            const got = await nearestNeighbors(q, v, { dim: d, k, metric, backend: "cpu" });
            expectExact(got, want);
            first ??= got;
            expect(Array.from(got.scores)).toEqual(Array.from(first.scores));
          }
        }
      }
    } finally {
      addon().selectGemmKernel(initial);
    }
    expect(ran).toContain("generic");
    expect(ran).toContain(initial);
  });

  it("the float64 re-scoring sums give the same bits in every instruction set, operand width and role", () => {
    // The returned scores are float32: the float64 sums are compared here directly. Lengths 1..70 (every
    // tail), signed zeros, subnormals, values near 1e17 and exponents far apart (x - y inexact).
    const r = seededRandom(47);
    const special = [0, -0, 1e-40, -3e-42, 1e17, -2.5e16, 1e-30, 3e30];
    const isas = ["avx512", "avx2", "generic"] as const;
    const bits = (a: Float64Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString("hex");
    let compared = 0;
    for (let n = 1; n <= 70; n++) {
      for (let trial = 0; trial < 3; trial++) {
        const x = new Float32Array(n);
        const y = new Float32Array(4 * n);
        const fill = (a: Float32Array) => {
          for (let i = 0; i < a.length; i++) {
            const u = r();
            a[i] =
              u < 0.15
                ? special[Math.floor(r() * special.length)]
                : (r() - 0.5) * 2 ** Math.floor(r() * 40 - 20);
          }
        };
        fill(x);
        fill(y);
        let want: string | undefined;
        for (const isa of isas) {
          for (const wide of [false, true]) {
            const out = addon().knnDots4(isa, wide, x, y);
            if (!out) continue; // (this CPU lacks the instruction set)
            const got = bits(out);
            want ??= got;
            expect(got).toBe(want);
            expect(bits(out.subarray(0, 4))).toBe(bits(out.subarray(4, 8))); // with or without distances
            compared++;
          }
        }
        // The summation order itself, replayed here (float products are exact in double, so a fused
        // multiply-add is a multiply and an add): dots4 in 8 lanes, the norms' dot_f64 in 32 folded to 8.
        const lanes = (y0: number, width: number) => {
          const l = new Float64Array(width);
          for (let i = 0; i < n; i++) l[i % width] += x[i] * y[y0 + i];
          const f =
            width === 8
              ? l
              : Float64Array.from({ length: 8 }, (_, j) => l[j] + l[j + 16] + (l[j + 8] + l[j + 24]));
          return f[0] + f[4] + (f[2] + f[6]) + (f[1] + f[5] + (f[3] + f[7]));
        };
        const replay = addon().knnDots4("generic", false, x, y) as Float64Array;
        for (let j = 0; j < 4; j++) {
          expect(replay[j]).toBe(lanes(j * n, 8));
          expect(replay[12 + j]).toBe(lanes(j * n, 32));
        }
        // Roles swapped: y_0 as x, x as all four y.
        const swapped = addon().knnDots4(
          "generic",
          true,
          y.subarray(0, n),
          new Float32Array([...x, ...x, ...x, ...x]),
        );
        expect(bits((swapped as Float64Array).subarray(0, 1))).toBe(bits(replay.subarray(0, 1)));
        expect(bits((swapped as Float64Array).subarray(8, 9))).toBe(bits(replay.subarray(8, 9)));
        // And the values are the float64 sums, to the rounding of any summation order (n u sum |terms|).
        for (let j = 0; j < 4; j++) {
          let dot = 0;
          let size = 0;
          let dist2 = 0;
          for (let i = 0; i < n; i++) {
            dot += x[i] * y[j * n + i];
            size += Math.abs(x[i] * y[j * n + i]);
            dist2 += (x[i] - y[j * n + i]) ** 2;
          }
          expect(Math.abs(replay[j] - dot)).toBeLessThanOrEqual(2 * n * 2 ** -53 * size);
          expect(Math.abs(replay[8 + j] - dist2)).toBeLessThanOrEqual(2 * n * 2 ** -53 * dist2);
        }
      }
    }
    const available = isas.filter((isa) =>
      addon().knnDots4(isa, false, new Float32Array(1), new Float32Array(4)),
    );
    expect(available).toContain("generic");
    expect(compared).toBe(available.length * 2 * 70 * 3);
  });

  it("re-scoring by rows and by queries give the same bits; a query alone gets the bits it gets in a batch", async () => {
    // 1500 rows, 40 queries, k = 200: about 5 candidates per row, so re-scored row by row unless forced.
    const q = gaussian(40 * dim, 41);
    q.set(vocab.subarray(7 * dim, 8 * dim), 3 * dim); // a query equal to a row
    for (const metric of METRICS) {
      const index = await VocabIndex.create(vocab, { dim, metric, backend: "cpu" });
      try {
        const want = bruteForce(q, vocab, dim, 200, metric);
        const byMode = new Map<string, NeighborResult>();
        for (const mode of ["rows", "queries", undefined]) {
          const got = await withEnv("PRIORTUNE_KNN_RESCORE", mode, () => index.search(q, { k: 200 }));
          expectExact(got, want);
          byMode.set(String(mode), got);
        }
        const rows = byMode.get("rows") as NeighborResult;
        for (const other of [byMode.get("queries"), byMode.get("undefined")] as NeighborResult[]) {
          expect(Array.from(other.indices)).toEqual(Array.from(rows.indices));
          expect(Array.from(other.scores)).toEqual(Array.from(rows.scores));
        }
        const alone = await index.search(q.subarray(3 * dim, 4 * dim), { k: 200 });
        expect(Array.from(alone.scores)).toEqual(Array.from(rows.scores.subarray(3 * 200, 4 * 200)));
        // A self-search re-scored both ways (the excluded row is never a candidate).
        const self = await withEnv("PRIORTUNE_KNN_RESCORE", "rows", () =>
          index.selfSearch({ k: 100, rows: Int32Array.from({ length: 40 }, (_, i) => i * 37) }),
        );
        const selfQ = await withEnv("PRIORTUNE_KNN_RESCORE", "queries", () =>
          index.selfSearch({ k: 100, rows: Int32Array.from({ length: 40 }, (_, i) => i * 37) }),
        );
        expect(Array.from(self.indices)).toEqual(Array.from(selfQ.indices));
        expect(Array.from(self.scores)).toEqual(Array.from(selfQ.scores));
        for (let i = 0; i < 40; i++)
          expect(Array.from(self.indices.subarray(i * 100, i * 100 + 100))).not.toContain(i * 37);
      } finally {
        index.dispose();
      }
    }
  });

  it("ties beyond the first re-scoring's reach are certified by re-scoring more, in the same round", async () => {
    // 40 equal rows (cosine 1 with the query): the pooled candidates' cut keeps exactly k + 8 = 18 of those ties to
    // re-score first, which cannot certify; the merge then re-scores the rest of the pool (one thread: at most
    // c + 16 = 59) in the same round.
    const d = 32;
    const base = gaussian(2000 * d, 43);
    const v = new Float32Array(base);
    for (let c = 0; c < 39; c++) v.set(base.subarray(5 * d, 6 * d), (1200 + c) * d);
    const q = new Float32Array(base.subarray(5 * d, 6 * d));
    for (const metric of METRICS) {
      for (const mode of ["rows", "queries"]) {
        const got = await withEnv("PRIORTUNE_KNN_RESCORE", mode, () =>
          nearestNeighbors(q, v, { dim: d, k: 10, metric, backend: "cpu", threads: 1 }),
        );
        expect(got.recoveredQueries).toBe(0);
        expectExact(got, bruteForce(q, v, d, 10, metric));
        expect(Array.from(got.indices)).toEqual([5, ...Array.from({ length: 9 }, (_, i) => 1200 + i)]);
      }
    }
  });
});

describe("VocabIndex argument checks", () => {
  const dim = 8;
  const vocab = gaussian(20 * dim, 20);

  it("names the argument in every error", async () => {
    await expect(VocabIndex.create([1, 2] as unknown as Float32Array, { dim })).rejects.toThrow(
      "vocab: expected a Float32Array, got Array(2)",
    );
    await expect(VocabIndex.create(vocab, { dim: 7 })).rejects.toThrow(
      "vocab: expected a non-empty length that is a multiple of dim (7)",
    );
    await expect(VocabIndex.create(vocab, { dim: 2.5 })).rejects.toThrow(
      "dim: expected an integer, got number 2.5",
    );
    await expect(VocabIndex.create(new Float32Array(0), { dim })).rejects.toThrow(
      "vocab: expected a non-empty length",
    );
    await expect(VocabIndex.create(vocab, { dim, metric: "manhattan" as KnnMetric })).rejects.toThrow(
      'metric: expected "cosine", "l2" or "dot", got string "manhattan"',
    );
    await expect(VocabIndex.create(vocab, { dim, backend: "tpu" as "cpu" })).rejects.toThrow(
      "backend: expected",
    );
    const index = await VocabIndex.create(vocab, { dim, backend: "cpu" });
    await expect(index.search(new Float32Array(9), { k: 1 })).rejects.toThrow(
      "queries: expected a non-empty length",
    );
    await expect(index.search(vocab.subarray(0, dim), { k: 21 })).rejects.toThrow(
      "k: expected an integer from 1 to 20, got 21",
    );
    await expect(index.search(vocab.subarray(0, dim), { k: 0 })).rejects.toThrow(
      "k: expected an integer from 1 to 20",
    );
    await expect(index.selfSearch({ k: 20 })).rejects.toThrow("k: expected an integer from 1 to 19, got 20");
    await expect(index.selfSearch({ k: 1, rows: [3, 20] })).rejects.toThrow("rows: element 1 is 20");
    index.dispose();
  });

  it("rowsAt copies the index's own rows: the original values, whatever the caller does to its array", async () => {
    const mine = vocab.slice();
    const index = await VocabIndex.create(mine, { dim, backend: "cpu" });
    mine.fill(7); // the index copied the rows when create() was called
    const rows = index.rowsAt([19, 0, 19]);
    expect(rows).toEqual(
      Float32Array.from([
        ...vocab.subarray(19 * dim, 20 * dim),
        ...vocab.subarray(0, dim),
        ...vocab.subarray(19 * dim, 20 * dim),
      ]),
    );
    rows.fill(3); // a copy: the index is unchanged
    expect(index.rowsAt(Int32Array.of(19))).toEqual(vocab.subarray(19 * dim, 20 * dim));
    expect(index.rowsAt([])).toEqual(new Float32Array(0));
    expect(() => index.rowsAt([3, 20])).toThrow("ids: element 1 is 20, outside the index's rows [0, 20)");
    expect(() => index.rowsAt([2 ** 32 + 1])).toThrow("ids: element 0 is 4294967297");
    expect(() => index.rowsAt([0.5])).toThrow("ids: element 0 is 0.5");
    expect(() => index.rowsAt(Float32Array.of(1) as never)).toThrow(
      "ids: expected an Int32Array or an array of row indices, got Float32Array",
    );
    index.dispose();
  });

  it("fitGaussian reads the index's rows: the same bits as the fit of the array, even if disposed meanwhile", async () => {
    const rows = gaussian(300 * dim, 23);
    const options = { ridgeRelative: 1e-3, shrinkage: 0.1 };
    const want = await addon().priorGaussianFit(rows, dim, options, 2);
    for (const backend of ["cpu", ...(addon().cudaInfo().usable ? ["cuda" as const] : [])] as const) {
      const index = await VocabIndex.create(rows, { dim, backend });
      const got = await index.fitGaussian(options, 2);
      for (const key of ["mean", "cholesky", "ridge", "meanVariance", "logDet"] as const)
        expect(got[key]).toEqual(want[key]);
      expect(got.covariance).toBeNull();
      const pending = index.fitGaussian(options);
      index.dispose(); // the fit in flight holds the rows
      expect((await pending).logDet).toBe(want.logDet);
    }
    // The native call checks the width, and takes arrays as before.
    const native = new (addon().NativeKnnIndex)();
    await native.build(rows, dim, "cosine", "cpu", 1);
    expect(() => addon().priorGaussianFit(native, dim + 1, {}, 1)).toThrow(
      `rows: the index's rows have dim ${dim}, expected ${dim + 1}`,
    );
    expect(() => addon().priorGaussianFit({} as never, dim, {}, 1)).toThrow(
      "rows: expected Float32Array, got object",
    );
    native.dispose();
    expect(() => addon().priorGaussianFit(native, dim, {}, 1)).toThrow("Index is disposed");
  });

  it("a native index whose build failed can be built again; thread counts above 1024 are refused", async () => {
    const bad = new Float32Array(vocab);
    bad[2] = Number.NaN;
    const native = new (addon().NativeKnnIndex)();
    await expect(native.build(bad, dim, "cosine", "cpu", 1)).rejects.toThrow("vocab: row 0");
    await native.build(vocab, dim, "cosine", "cpu", 1);
    const r = await native.search(vocab.subarray(0, dim), 1, 1);
    expect(r.indices[0]).toBe(0);
    expect(() => native.search(vocab.subarray(0, dim), 1, 4096)).toThrow("threads: expected at most 1024");
    native.dispose();
  });

  it("k is capped at 1024 even for large vocabularies", async () => {
    const v = gaussian(1100 * 4, 21);
    const index = await VocabIndex.create(v, { dim: 4, backend: "cpu" });
    await expect(index.search(v.subarray(0, 4), { k: MAX_K + 1 })).rejects.toThrow(
      "k: expected an integer from 1 to 1024, got 1025",
    );
    index.dispose();
  });

  it("rejects NaN and Infinity, naming the row and column", async () => {
    const bad = new Float32Array(vocab);
    bad[3 * dim + 5] = Number.NaN;
    await expect(VocabIndex.create(bad, { dim, backend: "cpu" })).rejects.toThrow(
      "vocab: row 3 has a non-finite value (NaN) at column 5",
    );
    await expect(nearestNeighbors(vocab, bad, { dim, k: 1, backend: "cpu" })).rejects.toThrow(
      "vocab: row 3 has a non-finite value (NaN) at column 5",
    );
    // The CPU index checks its rows as it takes their norms: the first bad row is named, whichever thread saw it.
    const two = new Float32Array(vocab);
    two.fill(1e30, 9 * dim, 10 * dim);
    two[14 * dim + 7] = Number.POSITIVE_INFINITY;
    for (const threads of [1, 2, 3]) {
      await expect(VocabIndex.create(two, { dim, backend: "cpu", threads })).rejects.toThrow(
        "vocab: row 9 has a norm of 1e18 or more",
      );
      await expect(nearestNeighbors(vocab, two, { dim, k: 1, backend: "cpu", threads })).rejects.toThrow(
        "vocab: row 9 has a norm of 1e18 or more",
      );
    }
    two.fill(0, 9 * dim, 10 * dim);
    await expect(VocabIndex.create(two, { dim, backend: "cpu" })).rejects.toThrow(
      "vocab: row 14 has a non-finite value (Infinity) at column 7",
    );
    const index = await VocabIndex.create(vocab, { dim, backend: "cpu" });
    const q = new Float32Array(2 * dim);
    q[dim + 1] = Number.NEGATIVE_INFINITY;
    await expect(index.search(q, { k: 3 })).rejects.toThrow(
      "queries: row 1 has a non-finite value (-Infinity) at column 1",
    );
    const huge = new Float32Array(dim).fill(1e30);
    await expect(index.search(huge, { k: 3 })).rejects.toThrow("queries: row 0 has a norm of 1e18 or more");
    index.dispose();
  });

  it('throws "Index is disposed" after dispose, and a search in flight still finishes', async () => {
    const index = await VocabIndex.create(vocab, { dim, backend: "cpu" });
    const pending = index.search(vocab, { k: 2 });
    index.dispose();
    expect(index.disposed).toBe(true);
    const r = await pending;
    expect(r.indices[0]).toBe(0);
    await expect(index.search(vocab, { k: 2 })).rejects.toThrow("Index is disposed");
    await expect(index.selfSearch({ k: 1 })).rejects.toThrow("Index is disposed");
    expect(() => index.memory()).toThrow("Index is disposed");
    expect(() => index.rowsAt([0])).toThrow("Index is disposed");
    expect(() => index.fitGaussian({})).toThrow("Index is disposed");
    index.dispose(); // idempotent
  });
});

// ---- CUDA against the CPU --------------------------------------------------------------------------------

const cuda = addon().cudaInfo();
const cudaSuffix = cuda.usable ? "" : ` (skipped: no CUDA device: ${cuda.reason})`;

describe.skipIf(!cuda.usable)(`VocabIndex (CUDA) equals the CPU index${cudaSuffix}`, () => {
  async function both(vocab: Float32Array, queries: Float32Array, dim: number, k: number, metric: KnnMetric) {
    const cpu = await VocabIndex.create(vocab, { dim, metric, backend: "cpu" });
    const gpu = await VocabIndex.create(vocab, { dim, metric, backend: "cuda" });
    try {
      return { cpu: await cpu.search(queries, { k }), gpu: await gpu.search(queries, { k }) };
    } finally {
      cpu.dispose();
      gpu.dispose();
    }
  }

  for (const metric of METRICS) {
    for (const k of [1, 10, 1024]) {
      it(`${metric}, k = ${k}, 2000 x 300`, async () => {
        const dim = 300;
        const vocab = gaussian(2000 * dim, 30);
        const queries = gaussian(70 * dim, 31);
        const { cpu, gpu } = await both(vocab, queries, dim, k, metric);
        // Both are exact: identical indices, and scores equal (both the fp32 rounding of one float64 value,
        // whose float64 sums may differ in the last bits: 2^-23 relative).
        expect(Array.from(gpu.indices)).toEqual(Array.from(cpu.indices));
        // The device time of the kernels is reported on CUDA only.
        expect(gpu.deviceMs).toBeGreaterThan(0);
        expect(gpu.deviceScreenMs).toBeGreaterThan(0);
        expect(gpu.deviceScreenMs).toBeLessThanOrEqual(gpu.deviceMs);
        expect(cpu.deviceMs).toBe(0);
        expect(cpu.deviceScreenMs).toBe(0);
        for (let i = 0; i < cpu.scores.length; i++)
          expect(Math.abs(gpu.scores[i] - cpu.scores[i])).toBeLessThanOrEqual(
            Math.abs(cpu.scores[i]) * 2 ** -22 + 1e-12,
          );
      });
    }
  }

  for (const select of ["radix", "filter"])
    it(`the matrix screening path (PRIORTUNE_CUDA_KNN=matrix: bf16 GEMM + ${select} selection) too, every metric`, async () => {
      const dim = 300;
      const vocab = gaussian(2000 * dim, 40);
      const queries = gaussian(50 * dim, 41);
      await withEnv("PRIORTUNE_CUDA_KNN", "matrix", () =>
        withEnv("PRIORTUNE_CUDA_KNN_SELECT", select, async () => {
          for (const metric of METRICS) {
            const { cpu, gpu } = await both(vocab, queries, dim, 10, metric);
            expect(Array.from(gpu.indices)).toEqual(Array.from(cpu.indices));
          }
        }),
      );
    });

  for (const variable of ["PRIORTUNE_CUDA_KNN", "PRIORTUNE_CUDA_KNN_SELECT"])
    it(`a bad ${variable} is an error naming it`, async () => {
      const dim = 16;
      const index = await VocabIndex.create(gaussian(300 * dim, 42), { dim, backend: "cuda" });
      try {
        await withEnv(variable, "bogus", () =>
          expect(index.search(gaussian(2 * dim, 43), { k: 3 })).rejects.toThrow(
            new RegExp(`${variable} must be`),
          ),
        );
      } finally {
        index.dispose();
      }
    });

  it("large shapes: 262144 rows (d 64) and d 8192 (3000 rows)", async () => {
    for (const [V, dim, metric] of [
      [262144, 64, "cosine"],
      [3000, 8192, "l2"],
    ] as const) {
      const vocab = gaussian(V * dim, 33);
      const queries = gaussian(33 * dim, 34);
      const { cpu, gpu } = await both(vocab, queries, dim, 10, metric);
      expect(Array.from(gpu.indices)).toEqual(Array.from(cpu.indices));
    }
  });

  it("rejects a non-finite or huge row in the vocabulary, naming the first (the index's own check)", async () => {
    const dim = 8;
    const v = gaussian(40 * dim, 35);
    v[17 * dim + 3] = Number.NaN;
    v.fill(1e30, 25 * dim, 26 * dim);
    await expect(VocabIndex.create(v, { dim, backend: "cuda" })).rejects.toThrow(
      "vocab: row 17 has a non-finite value (NaN) at column 3",
    );
    v[17 * dim + 3] = 0;
    await expect(VocabIndex.create(v, { dim, backend: "cuda" })).rejects.toThrow(
      "vocab: row 25 has a norm of 1e18 or more",
    );
  });

  it("duplicated rows, near-ties, zero rows and self-search", async () => {
    const dim = 64;
    const v = gaussian(3000 * dim, 32);
    for (let c = 0; c < 200; c++) v.set(v.subarray(7 * dim, 8 * dim), (2500 + c) * dim);
    v.fill(0, 11 * dim, 12 * dim);
    const q = new Float32Array(v.subarray(0, 40 * dim));
    for (const metric of METRICS) {
      const { cpu, gpu } = await both(v, q, dim, 10, metric);
      expect(Array.from(gpu.indices)).toEqual(Array.from(cpu.indices));
    }
    const cpu = await VocabIndex.create(v, { dim, backend: "cpu" });
    const gpu = await VocabIndex.create(v, { dim, backend: "cuda" });
    const a = await cpu.selfSearch({ k: 5, chunkRows: 1000 });
    const b = await gpu.selfSearch({ k: 5, chunkRows: 1000 });
    expect(Array.from(b.indices)).toEqual(Array.from(a.indices));
    expect(b.deviceMs).toBeGreaterThan(0);
    // The CUDA index serves its rows from its host copy, as the CPU index does.
    const ids = [2999, 7, 11, 2500];
    expect(gpu.rowsAt(ids)).toEqual(cpu.rowsAt(ids));
    cpu.dispose();
    gpu.dispose();
  });
});
