// One prompt-tuning step on the CPU (loss + prompt gradient + AdamW, P=20, labels on every token, fp32),
// beside PyTorch measured in the same run (bench/peers/torch_step.py), with each side's peak memory.
// Each case runs in a fresh process of its own (for a clean peak RSS), as does the peer.
//   npx tsx bench/step.bench.ts [gpt2-124M|llama-5M ...]
import { execFileSync } from "node:child_process";
import { availableParallelism } from "node:os";
import { fileURLToPath } from "node:url";
import { AdamW, loadModel } from "../lib/index.js";
import { machine, medianMs, runPythonPeer, table } from "./common.js";
import { type BenchModel, benchModelDir } from "./models.js";

const threads = Number(process.env.PRIORTUNE_THREADS ?? availableParallelism());
const cases: { model: BenchModel; B: number; positions: number }[] = [
  { model: "gpt2-124M", B: 4, positions: 128 },
  { model: "llama-5M", B: 8, positions: 128 },
  { model: "gpt2-124M", B: 8, positions: 256 },
];

interface CaseResult {
  ms: number;
  peakMiB: number;
  afterLoadMiB: number;
  weightsMiB: number;
}

async function runCase(index: number): Promise<CaseResult> {
  const c = cases[index]!;
  const model = await loadModel(benchModelDir(c.model), { backend: "cpu", threads });
  const afterLoadMiB = process.memoryUsage().rss / 2 ** 20;
  const P = 20;
  const T = c.positions - P;
  const V = model.config.vocabSize;
  const inputIds = new Int32Array(c.B * T).map((_, i) => (i * 7919 + 13) % V);
  const prompt = new Float32Array(P * model.config.hiddenSize).map((_, i) => Math.sin(i) * 0.02);
  const opt = new AdamW([prompt], { lr: 5e-3 });
  const step = async () => {
    const g = await model.lossAndGrad({ inputIds, labels: inputIds, batch: c.B, seqLen: T, prompt });
    opt.step([g.promptGrad!]);
  };
  const ms = await medianMs(`${c.model} step`, step, c.model === "llama-5M" ? 10 : 3, 1000);
  return {
    ms,
    peakMiB: process.resourceUsage().maxRSS / 1024,
    afterLoadMiB,
    weightsMiB: model.weightBytes() / 2 ** 20,
  };
}

async function main() {
  const caseArg = process.argv.indexOf("--case");
  if (caseArg >= 0) {
    console.log(JSON.stringify(await runCase(Number(process.argv[caseArg + 1]))));
    return;
  }
  console.log(`machine: ${machine()}; threads ${threads}`);
  const wanted = process.argv.slice(2);
  const rows: Record<string, string | number>[] = [];
  for (const [i, c] of cases.entries()) {
    if (wanted.length > 0 && !wanted.includes(c.model)) continue;
    benchModelDir(c.model); // written once, outside the timed child
    const out = execFileSync(
      process.execPath,
      ["--import", "tsx", fileURLToPath(import.meta.url), "--case", String(i)],
      {
        encoding: "utf8",
      },
    );
    const r = JSON.parse(out.trim().split("\n").pop()!) as CaseResult;
    const peer = runPythonPeer("torch_step.py", [
      String(threads),
      c.model,
      String(c.B),
      String(c.positions),
    ])?.[0];
    rows.push({
      workload: `${c.model} step, B=${c.B}, ${c.positions} pos`,
      "priortune ms": r.ms,
      "pytorch ms": (peer?.ms as number) ?? "n/a",
      speedup: peer ? (peer.ms as number) / r.ms : "n/a",
      "tok/s": (c.B * c.positions * 1e3) / r.ms,
      "peak RSS MiB": r.peakMiB,
      "step memory MiB": r.peakMiB - r.afterLoadMiB,
      "peer peak RSS MiB": peer ? (peer.max_rss_mib as number) : "n/a",
    });
  }
  console.log(table(rows));
  console.log(
    "step memory: peak RSS minus RSS after loading = saved activations + scratch (no weight gradients, no optimizer state for weights)",
  );
}

await main();
