// Greedy generation on the CPU (evaluation's task metrics), beside Transformers' generate() measured in the
// same run (bench/peers/torch_generate.py): a GPT-2-124M-shaped random model, a soft prompt of P=20 in front
// of B sequences of T=100 tokens, 16 new tokens (no early stop), B = 2 (the default batch) and 16 (the
// default generationBatchSize). Figures: ms per example (tinybench's median), and the decoding steps' own cost
// (the 16-token call less the 1-token call, over 15 steps).
//   npx tsx bench/generate.bench.ts      (PRIORTUNE_PYTHON=/path/to/python with torch+transformers for the peer)
import { availableParallelism } from "node:os";
import { loadModel } from "../lib/index.js";
import { machine, medianMs, runPythonPeer, table } from "./common.js";
import { benchModelDir } from "./models.js";

const threads = Number(process.env.PRIORTUNE_THREADS ?? availableParallelism());
const T = 100;
const P = 20;
const NEW = 16;
const batches = [2, 16];

async function main() {
  console.log(`machine: ${machine()}; threads ${threads}`);
  const model = await loadModel(benchModelDir("gpt2-124M"), { backend: "cpu", threads });
  const prompt = new Float32Array(P * model.config.hiddenSize).map(() => (Math.random() - 0.5) * 0.04);
  const ours: Record<number, { ms: number; stepMs: number }> = {};
  for (const B of batches) {
    const inputIds = new Int32Array(B * T).map((_, i) => (i * 7919 + 13) % 50257);
    const call = (maxNewTokens: number) => () =>
      model.generate({ inputIds, batch: B, seqLen: T, prompt, maxNewTokens, eosId: -1 });
    const ms = await medianMs(`generate B=${B}`, call(NEW), 3);
    const first = await medianMs(`generate B=${B}, 1 token`, call(1), 3);
    ours[B] = { ms, stepMs: (ms - first) / (NEW - 1) };
  }
  model.dispose();
  const peer = runPythonPeer("torch_generate.py", [String(threads), String(T), batches.join(",")]);
  const rows = batches.map((B) => {
    const p = peer?.find((r) => r.what === "gpt2_124M_generate" && r.B === B);
    const mine = ours[B]!.ms / B;
    return {
      workload: `GPT-2 124M generate, P=20, B=${B} x ${T}, ${NEW} new (ms per example)`,
      priortune: mine,
      pytorch: (p?.ms_per_example as number) ?? "n/a",
      ratio: p ? (p.ms_per_example as number) / mine : "n/a",
      note: `decoding step ${ours[B]!.stepMs.toFixed(1)} ms for the batch`,
    };
  });
  console.log(table(rows));
  console.log("ratio: speed-up of priortune over PyTorch (>1 = faster)");
}

await main();
