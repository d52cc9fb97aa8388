// `priortune pretrain`: full-parameter training of a small model from scratch on text files, with the
// native weight-gradient engine (lib/pretrain.ts). Writes the model directory (Hugging Face layout), a loss
// curve with held-out perplexity against a unigram baseline, and checkpoints it can resume from.
import { existsSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { SingleBar } from "cli-progress";
import type { Command } from "commander";
import { integerArg, interruptible, numberArg, seedArg } from "./cli-args.js";
import { decodeUtf8 } from "./data/loaders.js";
import { atomicWrite, ensureWritableDir, fsyncFile, lockDirectory, readJsonFile } from "./files.js";
import type { Model } from "./model.js";
import type { NativeAdamState } from "./native.js";
import { COMPANION_FILES, createModel, loadTrainableModel, Pretrainer } from "./pretrain.js";
import { readTexts } from "./priors.js";
import { Rng, type RngState } from "./rng.js";
import { readTensors, type TensorToWrite, writeSafetensors } from "./safetensors.js";
import { endOfTextId, loadTokenizer, type Tokenizer } from "./tokenizer.js";

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
      : decodeUtf8(readFileSync(f), f)
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
  /** Replace a run already in `out` (without it, and without resume, that is refused). */
  force?: boolean;
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

/** What pretrain-state.json holds: where the run is, and the options it was started with. */
interface PretrainState {
  step: number;
  rng: RngState;
  curve: PretrainCurvePoint[];
  unigramPerplexity: number;
  options: Partial<PretrainCliOptions>;
  /** Training tokens and seconds so far (runs saved before these were kept restart them at 0). */
  tokens?: number;
  seconds?: number;
  /**
   * The token between documents (null: none). Runs saved before it was recorded used the token named
   * <|endoftext|>, and resume so: another separator would change the batches and the held-out set.
   */
  separator?: number | null;
}

type PretrainCurvePoint = {
  step: number;
  loss?: number;
  lr?: number;
  validationLoss?: number;
  validationPerplexity?: number;
  tokens?: number;
  seconds?: number;
};

/** Cosine decay from lr to minLr after a linear warm-up. */
function schedule(o: PretrainCliOptions) {
  return (step: number) => {
    if (step <= o.warmup) return (o.lr * step) / Math.max(1, o.warmup);
    const p = Math.min(1, (step - o.warmup) / Math.max(1, o.steps - o.warmup));
    return o.minLr + 0.5 * (o.lr - o.minLr) * (1 + Math.cos(Math.PI * p));
  };
}

const STATE_FILE = "pretrain-state.json";
// A save's side directory, inside --out: on its file system (renames work where --out is a mount point) and
// writable where --out is (its parent need not be). Saves before this version used `${out}.saving`.
const SAVING_DIR = ".saving";

/**
 * Moves a whole save from its side directory into `out`: the optimizer state first and the run state last
 * (a resume refuses a directory whose two steps differ), then removes the side directory. Safe to repeat
 * after a stop part way: each file still in `tmp` is newer than the one in `out`.
 */
function finishSave(tmp: string, out: string): void {
  const rank = (f: string) => (f === "optimizer.safetensors" ? 0 : f === STATE_FILE ? 2 : 1);
  const files = readdirSync(tmp).sort((a, b) => rank(a) - rank(b));
  for (const f of files) renameSync(join(tmp, f), join(out, f));
  rmSync(tmp, { recursive: true, force: true });
}

// Options a resumed run keeps from its first start (they shape its schedule, batches and weights; given again,
// they must be equal): evalBatches too, since it sets what the held-out loss measures. evalEvery, saveEvery
// and steps come from the run when left out, and may change; the run's files must be its own.
const RUN_OPTIONS = [
  "batchSize",
  "seqLen",
  "lr",
  "minLr",
  "warmup",
  "weightDecay",
  "seed",
  "evalBatches",
] as const;
const SCHEDULE_OPTIONS = ["steps", "evalEvery", "saveEvery"] as const;
const FILE_OPTIONS = ["train", "validation", "tokenizer"] as const;

/** Refuses option values that would fail mid-run or mean nothing, before any work. */
function checkOptions(o: PretrainCliOptions): void {
  const int = (name: string, v: number, min: number) => {
    if (!Number.isInteger(v) || v < min)
      throw new RangeError(`--${name}: expected an integer >= ${min}, got ${v}`);
  };
  int("steps", o.steps, 1);
  int("batch-size", o.batchSize, 1);
  int("seq-len", o.seqLen, 1);
  int("warmup", o.warmup, 0);
  int("eval-every", o.evalEvery, 1);
  int("eval-batches", o.evalBatches, 1);
  int("save-every", o.saveEvery, 1);
  if (!(Number.isFinite(o.lr) && o.lr >= 0))
    throw new RangeError(`--lr: expected a number >= 0, got ${o.lr}`);
  if (!(Number.isFinite(o.minLr) && o.minLr >= 0))
    throw new RangeError(`--min-lr: expected a number >= 0, got ${o.minLr}`);
  if (!(Number.isFinite(o.weightDecay) && o.weightDecay >= 0))
    throw new RangeError(`--weight-decay: expected a number >= 0, got ${o.weightDecay}`);
}

/**
 * Pretrains (or, with `resume`, continues) a model in `o.out`. `given` names the options the user set (the
 * rest are defaults): a resumed run takes its saved values for the others, and refuses a given value that
 * differs from the run's for an option in RUN_OPTIONS. Without `given`, every option counts as given.
 */
export async function pretrain(
  options: PretrainCliOptions,
  log: (line: string) => void = (l) => process.stderr.write(`${l}\n`),
  given?: ReadonlySet<string>,
  signal?: AbortSignal,
) {
  // One process at a time (a second, with the first not dead yet, would interleave saves). An existing
  // directory is locked before anything in it is read or moved (the save recovery renames and deletes
  // what a live run may be writing); a new one as soon as it is made.
  const out = resolve(options.out);
  const what = "the pretraining run";
  let release = existsSync(out) ? lockDirectory(out, what) : null;
  try {
    return await pretrainLocked(options, log, given, signal, () => {
      ensureWritableDir(out); // before the work: saves go through out/.saving, renamed into out
      release ??= lockDirectory(out, what);
    });
  } finally {
    release?.();
  }
}

async function pretrainLocked(
  options: PretrainCliOptions,
  log: (line: string) => void,
  given: ReadonlySet<string> | undefined,
  signal: AbortSignal | undefined,
  makeOut: () => void,
) {
  let o = options;
  const out = resolve(o.out);
  const statePath = join(out, STATE_FILE);
  if (o.resume)
    for (const pending of [join(out, SAVING_DIR), `${out}.saving`]) {
      if (!existsSync(pending) || !statSync(pending).isDirectory()) continue;
      if (existsSync(join(pending, STATE_FILE))) {
        finishSave(pending, out); // a whole save stopped among its renames: finish it
        log(`completed the save that was interrupted in ${pending}`);
      } else rmSync(pending, { recursive: true, force: true }); // stopped before its renames: --out is whole
    }
  const resuming = !!o.resume && existsSync(statePath);
  if (!o.resume && !o.force && existsSync(statePath))
    throw new Error(
      `${out} holds a pretraining run (${STATE_FILE}): --resume continues it, --force replaces it (or choose another --out)`,
    );
  const state = resuming ? (readJsonFile(statePath) as PretrainState) : undefined;
  if (state) {
    const saved = state.options ?? {};
    const merged = { ...o };
    for (const key of RUN_OPTIONS) {
      const was = saved[key];
      if (was === undefined) continue;
      if (given && !given.has(key)) (merged as Record<string, unknown>)[key] = was;
      else if (merged[key] !== was)
        throw new Error(
          `--resume: ${key} ${merged[key]} differs from the run's ${was}; a resumed run keeps its options (leave it out)`,
        );
    }
    // The run's data and tokenizer: other files would continue another run under this one's name (the
    // recorded separator, batches and held-out set are those of its own). Compared as resolved paths.
    for (const key of FILE_OPTIONS) {
      const was = saved[key];
      if (was === undefined) continue;
      const paths = (v: unknown) => JSON.stringify([v].flat().map((p) => resolve(String(p))));
      if (given && !given.has(key)) (merged as Record<string, unknown>)[key] = was;
      else if (paths(merged[key]) !== paths(was))
        throw new Error(
          `--resume: --${key} ${[merged[key]].flat().join(" ")} is not the run's (${[was].flat().join(" ")}); a resumed run reads its own files`,
        );
    }
    // --steps may be given to extend (or shorten) a run, which re-spans its cosine decay; --eval-every and
    // --save-every to evaluate or save at another rhythm; left out, the run's own.
    for (const key of SCHEDULE_OPTIONS)
      if (given && !given.has(key) && saved[key] !== undefined)
        (merged as Record<string, unknown>)[key] = saved[key];
    o = merged;
  }
  checkOptions(o);
  makeOut();
  const tokenizer = loadTokenizer(o.tokenizer);
  log(`tokenizing ${[...o.train, ...o.validation].join(", ")}`);
  // The document separator: eos_token of tokenizer_config, else the usual names; a resumed run keeps its own.
  const eos = !state
    ? endOfTextId(tokenizer)
    : state.separator !== undefined
      ? (state.separator ?? undefined)
      : tokenizer.tokenToId("<|endoftext|>");
  const train = tokenizeFiles(tokenizer, o.train, eos);
  const validation = tokenizeFiles(tokenizer, o.validation, eos);
  if (train.length < o.seqLen + 1)
    throw new Error(`--train: ${train.length} tokens, fewer than one sequence of ${o.seqLen + 1}`);
  if (validation.length < o.seqLen + 1)
    throw new Error(`--validation: ${validation.length} tokens, fewer than one sequence of ${o.seqLen + 1}`);
  let model: Model;
  let curve: PretrainCurvePoint[] = [];
  let start = 0;
  let rng = new Rng(o.seed);
  let adam: NativeAdamState | undefined;
  let tokens = 0;
  let secondsBefore = 0;
  if (state) {
    model = await loadTrainableModel(out, { threads: o.threads });
    curve = state.curve;
    start = state.step;
    rng = new Rng(state.rng);
    tokens = state.tokens ?? 0;
    secondsBefore = state.seconds ?? 0;
    const optimizerPath = join(out, "optimizer.safetensors");
    if (existsSync(optimizerPath)) {
      const { tensors, metadata } = readTensors(optimizerPath);
      // Written first of a save's files, the state last: different steps mean a save that stopped half way.
      if (metadata.step !== String(start))
        throw new Error(
          `--resume: ${out} holds the optimizer state of step ${metadata.step} and the run state of step ${start} ` +
            "(a save stopped half way); its weights may be of either: start the run again",
        );
      adam = { step: Number(metadata.adamStep ?? metadata.step), m: {}, v: {} };
      for (const [name, t] of tensors)
        (name.startsWith("m.") ? adam.m : adam.v)[name.slice(2)] = t.data as Float32Array;
      log(`resuming at step ${start} (AdamW state restored)`);
    } else log(`resuming at step ${start} (no optimizer.safetensors: AdamW moments restart from zero)`);
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
  if (adam) trainer.setOptimizerState(adam);
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
  // Whether the tokenizer is its own, not the --config model directory's (the run's first --config on resume,
  // when the model is read from --out).
  const config = state?.options.config ?? o.config;
  const configDir =
    config && existsSync(config) && statSync(config).isDirectory() ? resolve(config) : undefined;
  const ownTokenizer = resolve(o.tokenizer) !== configDir;
  // A save: every file written and flushed in a side directory, then renamed into --out (the optimizer
  // state first, the run state last: a resume refuses a directory whose two steps differ).
  const save = (step: number) => {
    const tmp = join(out, SAVING_DIR);
    rmSync(tmp, { recursive: true, force: true });
    try {
      writeSave(tmp, step);
    } catch (e) {
      // Nothing in --out was touched (a full disk, say): its last save stays whole; the partial one goes.
      rmSync(tmp, { recursive: true, force: true });
      if (e instanceof Error)
        e.message += ` (the save of step ${step} failed; ${out} keeps its last save: make room, then rerun with --resume)`;
      throw e;
    }
    // A file of another tokenizer left in --out by an earlier run (--force) would survive the renames.
    for (const f of COMPANION_FILES) if (!existsSync(join(tmp, f))) rmSync(join(out, f), { force: true });
    finishSave(tmp, out);
  };
  const writeSave = (tmp: string, step: number) => {
    // The tokenizer trained with, when it is not the --config directory's: its files and its bos/eos ids
    // (a --config directory's own tokenizer keeps that directory's files and ids, on resume too, when the
    // model's source is --out).
    trainer.save(tmp, { tokenizer, tokenizerDir: ownTokenizer ? o.tokenizer : undefined });
    const adamState = trainer.optimizerState();
    const tensors: TensorToWrite[] = [];
    for (const name of Object.keys(adamState.m).sort())
      for (const kind of ["m", "v"] as const) {
        const data = adamState[kind][name]!;
        tensors.push({ name: `${kind}.${name}`, dtype: "F32", shape: [data.length], data });
      }
    // step: the run's (checked against pretrain-state.json); adamStep: AdamW's t, which differs after a
    // resume from a save without optimizer state (its moments restarted at t = 0).
    writeSafetensors(join(tmp, "optimizer.safetensors"), tensors, {
      step: String(step),
      adamStep: String(adamState.step),
    });
    const seconds = secondsBefore + (performance.now() - t0) / 1e3;
    const record: PretrainState = {
      step,
      rng: rng.state(),
      curve,
      unigramPerplexity: unigram,
      options: o,
      tokens,
      seconds,
      separator: eos ?? null,
    };
    // The run state is the save's last file: with it in the side directory, the save is whole and a resume
    // can finish moving it (finishSave) if this process stops among the renames.
    // Written aside and renamed: a torn state file would pass for a whole save.
    for (const f of readdirSync(tmp)) fsyncFile(join(tmp, f));
    atomicWrite(join(tmp, STATE_FILE), JSON.stringify(record, null, 1));
  };
  const bar = process.stderr.isTTY
    ? new SingleBar({
        format: "pretrain [{bar}] {value}/{total} | loss {loss} | val {val} | ETA {eta_formatted}",
        stream: process.stderr,
      })
    : undefined;
  bar?.start(o.steps, start, { loss: "-", val: "-" });
  const t0 = performance.now();
  let lastLine = t0;
  try {
    let saved = start;
    for (let step = start + 1; step <= o.steps; step++) {
      if (signal?.aborted) {
        // The steps since the last save are saved (the same command with --resume goes on from there).
        if (step - 1 > saved) {
          log(`${bar ? "\n" : ""}saving step ${step - 1} before stopping`);
          save(step - 1);
        }
        throw new Error(
          `pretrain: stopped at step ${step - 1}; ${out} holds it: rerun with --resume to go on`,
        );
      }
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
        point.seconds = secondsBefore + (performance.now() - t0) / 1e3;
        if (bar) bar.update(step, { loss: s.loss.toFixed(3), val: v.toFixed(3) });
        log(
          `${bar ? "\n" : ""}step ${step}: loss ${s.loss.toFixed(4)}, held-out loss ${v.toFixed(4)} (perplexity ${Math.exp(v).toFixed(1)} vs unigram ${unigram.toFixed(1)}), ${(tokens / point.seconds).toFixed(0)} tok/s`,
        );
      } else if (bar) bar.update(step, { loss: s.loss.toFixed(3) });
      else if (performance.now() - lastLine > 30_000) {
        // No terminal (a log file, CI): a line at least every 30 s between evaluations.
        lastLine = performance.now();
        log(`step ${step}/${o.steps}: loss ${s.loss.toFixed(4)}, lr ${s.lr.toExponential(2)}`);
      }
      curve.push(point);
      if (step % o.saveEvery === 0 || step === o.steps) {
        save(step);
        saved = step;
      }
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
    .option("--force", "replace a pretraining run already in --out (without --resume or this, refused)")
    .requiredOption("--tokenizer <dir>", "directory with tokenizer.json")
    .requiredOption(
      "--train <files...>",
      'training files: text (documents separated by blank lines), or JSON lines / JSON with a "text" field per document (.jsonl, .json, .gz)',
    )
    .requiredOption("--validation <files...>", "held-out text files")
    .requiredOption(
      "--out <dir>",
      "model directory to write (config.json, model.safetensors, tokenizer, curve)",
    )
    .option("--steps <n>", "optimizer steps", integerArg(1), 1000)
    .option("--batch-size <n>", "sequences per step", integerArg(1), 8)
    .option("--seq-len <n>", "tokens per sequence", integerArg(1), 256)
    .option("--lr <x>", "peak learning rate", numberArg, 3e-3)
    .option("--min-lr <x>", "learning rate at the end of the cosine decay", numberArg, 3e-4)
    .option("--warmup <n>", "linear warm-up steps", integerArg(0), 100)
    .option("--weight-decay <x>", "decoupled weight decay on linear-layer weights", numberArg, 0.1)
    .option("--eval-every <n>", "held-out evaluation every n steps", integerArg(1), 100)
    .option("--eval-batches <n>", "held-out batches per evaluation", integerArg(1), 8)
    .option("--save-every <n>", "save the model every n steps", integerArg(1), 200)
    .option("--seed <n>", "seed of the initialisation and the batch draws", seedArg, 0)
    .option("--threads <n>", "CPU threads (default: all cores)", integerArg(1))
    .action(async (o: PretrainCliOptions, cmd: Command) => {
      const given = new Set(Object.keys(o).filter((k) => cmd.getOptionValueSource(k) === "cli"));
      const result = await interruptible("saving the steps done, then stopping", (signal) =>
        pretrain(o, undefined, given, signal),
      );
      const last = result.curve.filter((p) => p.validationLoss !== undefined).at(-1);
      atomicWrite(
        join(o.out, "loss-curve.json"),
        `${JSON.stringify({ unigramPerplexity: result.unigramPerplexity, curve: result.curve }, null, 1)}\n`,
      );
      process.stdout.write(
        `done: held-out perplexity ${last ? Math.exp(last.validationLoss!).toFixed(1) : "n/a"} (unigram ${result.unigramPerplexity.toFixed(1)})\n`,
      );
    });
}
