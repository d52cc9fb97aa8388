// Exact top-k nearest-neighbour search, CPU, beside its peers measured in the same run: PyTorch (matmul + topk)
// and FAISS (bench/peers/knn_torch.py, when a Python with torch is available: PRIORTUNE_PYTHON), usearch
// exactSearch and hnswlib-node BruteforceSearch (dev dependencies). Prints the machine, the backend, medians
// and peer/ours ratios (> 1: we are faster).
//   npx tsx bench/knn.bench.ts [gpt2] [llama3] [small] [gpt2-l2] [self]; only when named: [gpt2-k100]
//   [gpt2-k1024] [small-k1024]
// Environment: PRIORTUNE_THREADS (default: all), KNN_BENCH_SELF_ROWS (rows of the vocabulary self-search;
// default all 50257, which takes about a minute here).
import { createRequire } from "node:module";
import { availableParallelism } from "node:os";
import { type KnnMetric, nearestNeighbors, VocabIndex } from "../lib/knn.js";
import { addon } from "../lib/native.js";
import { machine, medianMs, runPythonPeer, table } from "./common.js";

const require = createRequire(import.meta.url);
const threads = Number(process.env.PRIORTUNE_THREADS ?? availableParallelism());
const cuda = addon().cudaInfo();

interface Workload {
  name: string;
  Q: number;
  V: number;
  d: number;
  k: number;
  metric: KnnMetric;
  hnswlib: boolean;
  /** Run only when named on the command line. */
  optIn?: boolean;
}

const workloads: Workload[] = [
  { name: "gpt2", Q: 160, V: 50257, d: 768, k: 10, metric: "cosine", hnswlib: true },
  { name: "llama3", Q: 20, V: 128256, d: 2048, k: 10, metric: "cosine", hnswlib: true },
  { name: "small", Q: 160, V: 8192, d: 256, k: 10, metric: "cosine", hnswlib: true },
  { name: "gpt2-l2", Q: 160, V: 50257, d: 768, k: 10, metric: "l2", hnswlib: false },
  { name: "gpt2-k100", Q: 160, V: 50257, d: 768, k: 100, metric: "cosine", hnswlib: false, optIn: true },
  { name: "gpt2-k1024", Q: 160, V: 50257, d: 768, k: 1024, metric: "cosine", hnswlib: false, optIn: true },
  { name: "small-k1024", Q: 160, V: 8192, d: 256, k: 1024, metric: "cosine", hnswlib: false, optIn: true },
];

/** Deterministic N(0, 1) data (Box-Muller over a 32-bit LCG); the peers use their own N(0, 1) data. */
function gaussian(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  const u = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s + 0.5) / 4294967296;
  };
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(u()));
    const t = 2 * Math.PI * u();
    out[i] = r * Math.cos(t);
    if (i + 1 < n) out[i + 1] = r * Math.sin(t);
  }
  return out;
}

function loadPeer<T>(name: string): T | null {
  try {
    return require(name) as T;
  } catch (e) {
    console.log(`peer ${name} not available: ${(e as Error).message.split("\n")[0]}`);
    return null;
  }
}

interface USearch {
  exactSearch(
    dataset: Float32Array,
    queries: Float32Array,
    dimensions: number,
    count: number,
    metric: string,
    threads?: number,
  ): unknown;
  MetricKind: Record<string, string>;
}
interface HnswlibNode {
  BruteforceSearch: new (
    space: string,
    dim: number,
  ) => {
    initIndex(maxElements: number): void;
    addPoint(point: number[], label: number): void;
    searchKnn(query: number[], k: number): { neighbors: number[]; distances: number[] };
  };
}

const fmt = (x: number | undefined) => (x === undefined ? "n/a" : x);
const ratio = (peer: number | undefined, ours: number) => (peer === undefined ? "n/a" : peer / ours);

async function runWorkload(w: Workload, rows: Record<string, string | number>[]) {
  const vocab = gaussian(w.V * w.d, 1);
  const queries = gaussian(w.Q * w.d, 2);
  const t0 = performance.now();
  const index = await VocabIndex.create(vocab, { dim: w.d, metric: w.metric, backend: "cpu", threads });
  const createMs = performance.now() - t0;
  // Per search (summing inside the timed function counted every warm-up and sample).
  const recovered = (await index.search(queries, { k: w.k })).recoveredQueries;
  const ours = await medianMs(`${w.name} priortune`, () => index.search(queries, { k: w.k }), 10, 1500);
  index.dispose();
  const oneShot = await medianMs(
    `${w.name} one-shot`,
    () => nearestNeighbors(queries, vocab, { dim: w.d, k: w.k, metric: w.metric, backend: "cpu", threads }),
    3,
    500,
  );

  // CUDA: measured only where a device is usable (never reported otherwise).
  let cudaMs: number | undefined;
  if (cuda.usable) {
    const gpu = await VocabIndex.create(vocab, { dim: w.d, metric: w.metric, backend: "cuda", threads });
    cudaMs = await medianMs(`${w.name} cuda`, () => gpu.search(queries, { k: w.k }), 20, 1000);
    gpu.dispose();
  }

  const peer = runPythonPeer("knn_torch.py", [
    String(threads),
    String(w.Q),
    String(w.V),
    String(w.d),
    String(w.k),
  ]);
  const torchMs = peer?.find((r) => r.what === (w.metric === "l2" ? "torch_l2" : "torch_cos"))?.ms as
    | number
    | undefined;
  const torchOnceMs = peer?.find((r) => r.what === (w.metric === "l2" ? "torch_l2_once" : "torch_cos_once"))
    ?.ms as number | undefined;
  const faissMs =
    w.metric === "cosine" ? (peer?.find((r) => r.what === "faiss_cos")?.ms as number | undefined) : undefined;

  let usearchMs: number | undefined;
  const usearch = loadPeer<USearch>("usearch");
  if (usearch) {
    const kind = w.metric === "l2" ? usearch.MetricKind.L2sq : usearch.MetricKind.Cos;
    usearchMs = await medianMs(
      `${w.name} usearch`,
      () => usearch.exactSearch(vocab, queries, w.d, w.k, kind!, threads),
      3,
      1000,
    );
  }
  let hnswMs: number | undefined;
  const hnsw = w.hnswlib ? loadPeer<HnswlibNode>("hnswlib-node") : null;
  if (hnsw) {
    const bf = new hnsw.BruteforceSearch(w.metric === "l2" ? "l2" : "cosine", w.d);
    bf.initIndex(w.V);
    for (let r = 0; r < w.V; r++) bf.addPoint(Array.from(vocab.subarray(r * w.d, (r + 1) * w.d)), r);
    const qs = Array.from({ length: w.Q }, (_, i) => Array.from(queries.subarray(i * w.d, (i + 1) * w.d)));
    hnswMs = await medianMs(
      `${w.name} hnswlib`,
      () => {
        for (const q of qs) bf.searchKnn(q, w.k);
      },
      3,
      1000,
    );
  }
  rows.push({
    workload: `${w.Q} x ${w.V} x ${w.d}, top-${w.k} ${w.metric}`,
    "priortune ms": ours,
    "one-shot ms": oneShot,
    "pt one-shot ms": fmt(torchOnceMs),
    "pt/ours one-shot": ratio(torchOnceMs, oneShot),
    "create ms": createMs,
    "pytorch ms": fmt(torchMs),
    "pt/ours": ratio(torchMs, ours),
    "faiss ms": fmt(faissMs),
    "faiss/ours": ratio(faissMs, ours),
    "usearch ms": fmt(usearchMs),
    "us/ours": ratio(usearchMs, ours),
    "hnswlib ms": fmt(hnswMs),
    "hn/ours": ratio(hnswMs, ours),
    GFLOPs: (2 * w.Q * w.V * w.d) / ours / 1e6,
    recovered,
    ...(cuda.usable ? { "cuda ms (incl. transfers)": fmt(cudaMs) } : {}),
  });
}

async function selfSearch(rows: Record<string, string | number>[]) {
  const V = 50257;
  const d = 768;
  const k = 10;
  const count = Number(process.env.KNN_BENCH_SELF_ROWS ?? V);
  const vocab = gaussian(V * d, 3);
  const index = await VocabIndex.create(vocab, { dim: d, metric: "cosine", backend: "cpu", threads });
  const list = Int32Array.from({ length: count }, (_, i) => i);
  const t0 = performance.now();
  await index.selfSearch({ k, rows: list, chunkRows: 4096 });
  const ms = performance.now() - t0;
  index.dispose();
  const full = (ms * V) / count;
  // PyTorch materialises a chunk x V score matrix; a chunk of 1024 rows, extrapolated to all rows.
  const chunk = 1024;
  const peer = runPythonPeer("knn_torch.py", [
    String(threads),
    "1",
    String(V),
    String(d),
    String(k),
    String(chunk),
  ]);
  const chunkMs = peer?.find((r) => r.what === "torch_self_chunk")?.ms as number | undefined;
  const torchFull = chunkMs === undefined ? undefined : (chunkMs * V) / chunk;
  rows.push({
    workload: `self-search ${V}^2 x ${d}, top-${k} cosine`,
    "priortune ms": full,
    "measured rows":
      count === V ? "all (measured once)" : `${count} (extrapolated x${(V / count).toFixed(1)})`,
    "pytorch ms": fmt(torchFull),
    "pytorch basis":
      chunkMs === undefined ? "n/a" : `${chunk} rows in ${chunkMs.toFixed(0)} ms, extrapolated`,
    "pt/ours": ratio(torchFull, full),
    GFLOPs: (2 * V * V * d) / full / 1e6,
  });
}

async function main() {
  const wanted = process.argv.slice(2);
  const pick = (name: string) => wanted.length === 0 || wanted.includes(name);
  console.log(`machine: ${machine()}`);
  console.log(`backend: cpu (fused GEMM + top-k, float64 re-scoring), threads ${threads}`);
  console.log(
    cuda.usable
      ? `cuda: ${cuda.name} (compute capability ${cuda.computeCapability}), measured below`
      : `cuda: not measured (${cuda.reason})`,
  );
  const rows: Record<string, string | number>[] = [];
  // The large-batch GPU workload, run only where CUDA is usable (it adds seconds per trial on the CPU).
  if (cuda.usable)
    workloads.push({ name: "gpt2-4096", Q: 4096, V: 50257, d: 768, k: 10, metric: "cosine", hnswlib: false });
  for (const w of workloads.filter((w) => (w.optIn ? wanted.includes(w.name) : pick(w.name))))
    await runWorkload(w, rows);
  if (rows.length) console.log(table(rows));
  if (pick("self")) {
    const selfRows: Record<string, string | number>[] = [];
    await selfSearch(selfRows);
    console.log(table(selfRows));
  }
}

await main();
