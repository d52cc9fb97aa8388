// `priortune pretrain`: full-parameter training of a small model from scratch on text files, with the
// native weight-gradient engine (lib/pretrain.ts). Writes the model directory (Hugging Face layout), a loss
// curve with held-out perplexity against a unigram baseline, and checkpoints it can resume from.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { SingleBar } from "cli-progress";
import type { Command } from "commander";
import { integerArg, numberArg } from "./cli-args.js";
import { atomicWrite } from "./files.js";
import type { Model } from "./model.js";
import { createModel, loadTrainableModel, Pretrainer } from "./pretrain.js";
import { readTexts } from "./priors.js";
import { Rng } from "./rng.js";
import { loadTokenizer, type Tokenizer } from "./tokenizer.js";

/**
 * Token stream of text files, each document followed by end-of-text: JSON lines / JSON (optionally .gz) with a
 * "text" field give one document per record (the corpus format, read by readTexts); plain text files are
 * split into documents at blank lines.
 */
export function tokenizeFiles(tokenizer: Tokenizer, files: string[], eos: number | undefined): Int32Array {
  const ids: number[] = [];
  for (const f of files) {
    const docs = /\.jsonl?(\.gz)?$/.test(f)
      ? readTexts(f)
      : readFileSync(f, "utf8")
          .replace(/\r\n?/g, "\n")
          .split(/\n{2,}/);
    for (const doc of docs) {
      const d = doc.trim();
      if (!d) continue;
      for (const id of tokenizer.encode(d)) ids.push(id);
      if (eos !== undefined) ids.push(eos);
    }
  }
  return Int32Array.from(ids);
}

/** Held-out perplexity of an add-one-smoothed unigram model counted on the training stream. */
export function unigramPerplexity(train: Int32Array, heldOut: Int32Array, vocabSize: number): number {
  const counts = new Float64Array(vocabSize).fill(1);
  for (const id of train) counts[id]! += 1;
  const total = train.length + vocabSize;
  let nll = 0;
  for (const id of heldOut) nll -= Math.log(counts[id]! / total);
  return Math.exp(nll / heldOut.length);
}

export interface PretrainCliOptions {
  config?: string;
  resume?: boolean;
  tokenizer: string;
  train: string[];
  validation: string[];
  out: string;
  steps: number;
  batchSize: number;
  seqLen: number;
  lr: number;
  minLr: number;
  warmup: number;
  weightDecay: number;
  evalEvery: number;
  evalBatches: number;
  saveEvery: number;
  seed: number;
  threads?: number;
}

/** Cosine decay from lr to minLr after a linear warm-up. */
function schedule(o: PretrainCliOptions) {
  return (step: number) => {
    if (step <= o.warmup) return (o.lr * step) / Math.max(1, o.warmup);
    const p = Math.min(1, (step - o.warmup) / Math.max(1, o.steps - o.warmup));
    return o.minLr + 0.5 * (o.lr - o.minLr) * (1 + Math.cos(Math.PI * p));
  };
}

export async function pretrain(
  o: PretrainCliOptions,
  log: (line: string) => void = (l) => process.stderr.write(`${l}\n`),
) {
  const out = resolve(o.out);
  mkdirSync(out, { recursive: true });
  const tokenizer = loadTokenizer(o.tokenizer);
  const eos = tokenizer.tokenToId("<|endoftext|>");
  const train = tokenizeFiles(tokenizer, o.train, eos);
  const validation = tokenizeFiles(tokenizer, o.validation, eos);
  if (train.length < o.seqLen + 1)
    throw new Error(`--train: ${train.length} tokens, fewer than one sequence of ${o.seqLen + 1}`);
  if (validation.length < o.seqLen + 1)
    throw new Error(`--validation: ${validation.length} tokens, fewer than one sequence of ${o.seqLen + 1}`);
  const statePath = join(out, "pretrain-state.json");
  let model: Model;
  let curve: {
    step: number;
    loss?: number;
    lr?: number;
    validationLoss?: number;
    validationPerplexity?: number;
    tokens?: number;
    seconds?: number;
  }[] = [];
  let start = 0;
  let rng = new Rng(o.seed);
  if (o.resume && existsSync(statePath)) {
    const state = JSON.parse(readFileSync(statePath, "utf8"));
    model = await loadTrainableModel(out, { threads: o.threads });
    curve = state.curve;
    start = state.step;
    rng = new Rng(state.rng);
    log(`resuming at step ${start} (AdamW moments restart from zero)`);
  } else {
    if (!o.config) throw new Error("--config: required for a new run (a config.json or a model directory)");
    model = await createModel(o.config, { seed: o.seed, threads: o.threads });
  }
  if (model.config.vocabSize < tokenizer.vocabSize) {
    throw new Error(
      `the model's vocabulary (${model.config.vocabSize}) is smaller than the tokenizer's (${tokenizer.vocabSize})`,
    );
  }
  const trainer = new Pretrainer(model, { lr: (s) => schedule(o)(start + s), weightDecay: o.weightDecay });
  const unigram = unigramPerplexity(train, validation, model.config.vocabSize);
  log(
    `train ${train.length} tokens, validation ${validation.length} tokens, unigram perplexity ${unigram.toFixed(1)}`,
  );
  const window = (stream: Int32Array, offset: number, ids: Int32Array, row: number) => {
    ids.set(stream.subarray(offset, offset + o.seqLen), row * o.seqLen);
  };
  // Fixed held-out windows, evenly spaced.
  const evalOffsets = Array.from({ length: o.evalBatches * o.batchSize }, (_, i) =>
    Math.floor((i * (validation.length - o.seqLen - 1)) / Math.max(1, o.evalBatches * o.batchSize - 1)),
  );
  const evaluate = async () => {
    let sum = 0;
    for (let b = 0; b < o.evalBatches; b++) {
      const ids = new Int32Array(o.batchSize * o.seqLen);
      for (let r = 0; r < o.batchSize; r++) window(validation, evalOffsets[b * o.batchSize + r]!, ids, r);
      sum += await trainer.evaluate({ inputIds: ids, batch: o.batchSize, seqLen: o.seqLen });
    }
    return sum / o.evalBatches;
  };
  const save = (step: number) => {
    const tmp = `${out}.saving`;
    rmSync(tmp, { recursive: true, force: true });
    trainer.save(tmp);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]) {
      if (existsSync(join(tmp, f))) renameSync(join(tmp, f), join(out, f));
    }
    rmSync(tmp, { recursive: true, force: true });
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
      const src = join(o.tokenizer, f);
      if (existsSync(src) && !existsSync(join(out, f))) writeFileSync(join(out, f), readFileSync(src));
    }
    atomicWrite(
      statePath,
      JSON.stringify({ step, rng: rng.state(), curve, unigramPerplexity: unigram, options: o }, null, 1),
    );
  };
  const bar = process.stderr.isTTY
    ? new SingleBar({
        format: "pretrain [{bar}] {value}/{total} | loss {loss} | val {val} | ETA {eta_formatted}",
        stream: process.stderr,
      })
    : undefined;
  bar?.start(o.steps, start, { loss: "-", val: "-" });
  const t0 = performance.now();
  let tokens = 0;
  try {
    for (let step = start + 1; step <= o.steps; step++) {
      const ids = new Int32Array(o.batchSize * o.seqLen);
      for (let r = 0; r < o.batchSize; r++) window(train, rng.int(train.length - o.seqLen), ids, r);
      const s = await trainer.step({ inputIds: ids, batch: o.batchSize, seqLen: o.seqLen });
      tokens += o.batchSize * o.seqLen;
      const point: (typeof curve)[number] = { step, loss: s.loss, lr: s.lr };
      if (step % o.evalEvery === 0 || step === o.steps) {
        const v = await evaluate();
        point.validationLoss = v;
        point.validationPerplexity = Math.exp(v);
        point.tokens = tokens;
        point.seconds = (performance.now() - t0) / 1e3;
        if (bar) bar.update(step, { loss: s.loss.toFixed(3), val: v.toFixed(3) });
        log(
          `${bar ? "\n" : ""}step ${step}: loss ${s.loss.toFixed(4)}, held-out loss ${v.toFixed(4)} (perplexity ${Math.exp(v).toFixed(1)} vs unigram ${unigram.toFixed(1)}), ${(tokens / point.seconds).toFixed(0)} tok/s`,
        );
      } else if (bar) bar.update(step, { loss: s.loss.toFixed(3) });
      curve.push(point);
      if (step % o.saveEvery === 0 || step === o.steps) save(step);
    }
  } finally {
    bar?.stop();
  }
  model.dispose();
  return { curve, unigramPerplexity: unigram };
}

export function registerPretrainCommand(program: Command): void {
  program
    .command("pretrain")
    .description("train a small language model from scratch on text files (full-parameter AdamW, native)")
    .option("--config <path>", "config.json (or a model directory holding one) of the model to create")
    .option("--resume", "continue the run in --out from its last save")
    .requiredOption("--tokenizer <dir>", "directory with tokenizer.json")
    .requiredOption("--train <files...>", "training text files (documents separated by blank lines)")
    .requiredOption("--validation <files...>", "held-out text files")
    .requiredOption(
      "--out <dir>",
      "model directory to write (config.json, model.safetensors, tokenizer, curve)",
    )
    .option("--steps <n>", "optimizer steps", integerArg(0), 1000)
    .option("--batch-size <n>", "sequences per step", integerArg(0), 8)
    .option("--seq-len <n>", "tokens per sequence", integerArg(0), 256)
    .option("--lr <x>", "peak learning rate", numberArg, 3e-3)
    .option("--min-lr <x>", "learning rate at the end of the cosine decay", numberArg, 3e-4)
    .option("--warmup <n>", "linear warm-up steps", integerArg(0), 100)
    .option("--weight-decay <x>", "decoupled weight decay on linear-layer weights", numberArg, 0.1)
    .option("--eval-every <n>", "held-out evaluation every n steps", integerArg(0), 100)
    .option("--eval-batches <n>", "held-out batches per evaluation", integerArg(0), 8)
    .option("--save-every <n>", "save the model every n steps", integerArg(0), 200)
    .option("--seed <n>", "seed of the initialisation and the batch draws", integerArg(0), 0)
    .option("--threads <n>", "CPU threads (default: all cores)", integerArg(0))
    .action(async (o: PretrainCliOptions) => {
      const result = await pretrain(o);
      const last = result.curve.filter((p) => p.validationLoss !== undefined).at(-1);
      writeFileSync(
        join(o.out, "loss-curve.json"),
        `${JSON.stringify({ unigramPerplexity: result.unigramPerplexity, curve: result.curve }, null, 1)}\n`,
      );
      process.stdout.write(
        `done: held-out perplexity ${last ? Math.exp(last.validationLoss!).toFixed(1) : "n/a"} (unigram ${result.unigramPerplexity.toFixed(1)})\n`,
      );
    });
}
