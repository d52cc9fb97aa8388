// The GPU check, run on a machine with an NVIDIA GPU (see scripts/gpu-check.sh, which bundles this file with
// esbuild so it needs no node_modules there): the CUDA probe, the CUDA kNN kernel against the CPU reference
// on the shapes (exact: identical indices, scores within fp32 rounding), and its timings (medians
// of CUDA-event-free wall clock over repeated searches, transfers of the queries and results included).
// Prints JSON lines and a Markdown table. Exits non-zero when a comparison fails.

import { VocabIndex } from "../lib/knn.js";
import { addon } from "../lib/native.js";

const info = addon().cudaInfo();
console.log(JSON.stringify({ what: "cuda", ...info }));
if (!info.usable) {
  console.log(`no usable CUDA device: ${info.reason}`);
  process.exit(2);
}

function random(n: number, seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = s / 4294967296 - 0.5;
  }
  return out;
}

async function median(fn: () => Promise<unknown>, runs: number): Promise<number> {
  await fn();
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)]!;
}

const workloads = [
  { name: "160 x 50257 x 768", Q: 160, V: 50257, d: 768, goalMs: 0.06 },
  { name: "4096 x 50257 x 768", Q: 4096, V: 50257, d: 768, goalMs: 1.5 },
  { name: "20 x 128256 x 2048", Q: 20, V: 128256, d: 2048, goalMs: 0.15 },
  { name: "160 x 262144 x 256 (V = 256k)", Q: 160, V: 262144, d: 256, goalMs: Number.NaN },
  { name: "16 x 8192 x 8192 (d = 8192)", Q: 16, V: 8192, d: 8192, goalMs: Number.NaN },
];
const rows: string[] = [];
let failed = false;
for (const w of workloads) {
  const vocab = random(w.V * w.d, 1 + w.V);
  const queries = random(w.Q * w.d, 2 + w.Q);
  for (const metric of ["cosine", "l2"] as const) {
    const gpu = await VocabIndex.create(vocab, { dim: w.d, metric, backend: "cuda" });
    const cpu = await VocabIndex.create(vocab, { dim: w.d, metric, backend: "cpu" });
    const a = await gpu.search(queries, { k: 10 });
    const b = await cpu.search(queries, { k: 10 });
    let same = true;
    let worst = 0;
    for (let i = 0; i < a.indices.length; i++) {
      if (a.indices[i] !== b.indices[i]) same = false;
      worst = Math.max(worst, Math.abs(a.scores[i]! - b.scores[i]!) / (1e-30 + Math.abs(b.scores[i]!)));
    }
    const ok = same && worst < 1e-5;
    failed ||= !ok;
    const ms = await median(() => gpu.search(queries, { k: 10 }), 20);
    const cpuMs = await median(() => cpu.search(queries, { k: 10 }), 3);
    console.log(
      JSON.stringify({
        what: "knn",
        workload: w.name,
        metric,
        identicalIndices: same,
        maxRelScoreError: worst,
        cudaMs: ms,
        cpuMs,
        goalMs: w.goalMs,
      }),
    );
    rows.push(
      `| ${w.name} | ${metric} | ${same ? "yes" : "NO"} | ${worst.toExponential(1)} | ${ms.toFixed(3)} | ${Number.isNaN(w.goalMs) ? "" : w.goalMs} | ${cpuMs.toFixed(1)} |`,
    );
    gpu.dispose();
    cpu.dispose();
  }
}
console.log(`\n${info.name}, compute capability ${info.computeCapability}\n`);
console.log(
  "| workload (Q x V x d, top-10) | metric | same indices as CPU | max rel. score error | CUDA ms | goal ms | CPU ms |",
);
console.log("|---|---|---|---|---|---|---|");
for (const r of rows) console.log(r);
process.exit(failed ? 1 : 0);
