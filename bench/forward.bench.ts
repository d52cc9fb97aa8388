// Forward pass and GEMM on the CPU, beside PyTorch measured in the same run (bench/peers/torch_forward.py).
//   npx tsx bench/forward.bench.ts      (PRIORTUNE_PYTHON=/path/to/python with torch+transformers for the peer)
// Figures: fp32 GEMM 1024^3 GFLOP/s against the measured FMA peak; forward tokens/s of a GPT-2-124M-shaped
// random model (soft prompt P=20, B=4, 128 positions); peak resident memory while loading vs the weights.
import { execFileSync } from "node:child_process";
import { availableParallelism } from "node:os";
import { loadModel } from "../lib/index.js";
import { addon } from "../lib/native.js";
import { machine, medianMs, runPythonPeer, table } from "./common.js";
import { benchModelDir } from "./models.js";

const threads = Number(process.env.PRIORTUNE_THREADS ?? availableParallelism());

async function loadMemory(dir: string): Promise<{ maxRssMiB: number; weightMiB: number; baseMiB: number }> {
  // A fresh process, so the peak RSS is the load's alone.
  const code = `
    import { loadModel } from "./lib/index.ts";
    const base = process.memoryUsage().rss;
    const m = await loadModel(${JSON.stringify(dir)}, { backend: "cpu", threads: 1 });
    console.log(JSON.stringify({ maxRssMiB: process.resourceUsage().maxRSS / 1024, weightMiB: m.weightBytes() / 2 ** 20, baseMiB: base / 2 ** 20 }));`;
  const out = execFileSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code], {
    encoding: "utf8",
  });
  return JSON.parse(out.trim().split("\n").pop()!);
}

async function main() {
  console.log(`machine: ${machine()}; threads ${threads}`);
  const native = addon();
  const peak = native.fmaPeakGflops(threads);
  const n = 1024;
  const A = new Float32Array(n * n).map(() => Math.random() - 0.5);
  const B = new Float32Array(n * n).map(() => Math.random() - 0.5);
  const C = new Float32Array(n * n);
  const gemmMs = await medianMs(
    "gemm 1024",
    () => native.gemm(false, false, n, n, n, 1, A, n, B, n, 0, C, n, threads),
    20,
  );
  const gemmGflops = (2 * n ** 3) / gemmMs / 1e6;

  const dir = benchModelDir("gpt2-124M");
  const mem = await loadMemory(dir);
  const model = await loadModel(dir, { backend: "cpu", threads });
  const Bsz = 4;
  const P = 20;
  const positions = 128;
  const T = positions - P;
  const inputIds = new Int32Array(Bsz * T).map((_, i) => (i * 7919) % 50257);
  const prompt = new Float32Array(P * 768).map(() => (Math.random() - 0.5) * 0.04);
  const fwdMs = await medianMs(
    "forward",
    () => model.forward({ inputIds, batch: Bsz, seqLen: T, prompt }),
    5,
  );
  model.dispose();
  const tokS = ((Bsz * positions) / fwdMs) * 1e3;

  const peer = runPythonPeer("torch_forward.py", [String(threads)]);
  const pg = peer?.find((r) => r.what === "gemm_fp32_1024");
  const pf = peer?.find((r) => r.what === "gpt2_124M_forward");
  const rows = [
    {
      workload: "fp32 GEMM 1024^3 (GFLOP/s)",
      priortune: gemmGflops,
      pytorch: (pg?.gflops as number) ?? "n/a",
      ratio: pg ? gemmGflops / (pg.gflops as number) : "n/a",
      note: `${((100 * gemmGflops) / peak).toFixed(0)}% of measured FMA peak ${peak.toFixed(0)} GFLOP/s`,
    },
    {
      workload: "GPT-2 124M forward, P=20, B=4, 128 pos (ms)",
      priortune: fwdMs,
      pytorch: (pf?.ms as number) ?? "n/a",
      ratio: pf ? (pf.ms as number) / fwdMs : "n/a",
      note: `${tokS.toFixed(0)} tok/s (peer ${pf ? (pf.tok_s as number).toFixed(0) : "n/a"})`,
    },
    {
      workload: "load peak RSS (MiB)",
      priortune: mem.maxRssMiB,
      pytorch: "",
      ratio: "",
      note: `weights ${mem.weightMiB.toFixed(0)} MiB fp32 + process baseline ${mem.baseMiB.toFixed(0)} MiB`,
    },
  ];
  console.log(table(rows));
  console.log("ratio: speed-up of priortune over PyTorch (>1 = faster)");
}

await main();
