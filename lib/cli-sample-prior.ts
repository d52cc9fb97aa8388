// `priortune sample-prior`: draw prompt vectors from a prior and write them to a safetensors file, with the
// prior's record (createPrior rebuilds it), the seed and the prior's statistics in the file's metadata.
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, resolve } from "node:path";
import { type Command, InvalidArgumentError, Option } from "commander";
import { defaultLogger } from "./backend.js";
import { type BackendFlags, integerArg, numberArg, seedArg, withBackend } from "./cli-args.js";
import { ensureWritableDir } from "./files.js";
import { describeModel, loadModel, type Model, readTokenEmbeddings } from "./model.js";
import { createPrior, PRIOR_KINDS, type PriorContext, type PriorKind, type PriorRecord } from "./priors.js";
import { Rng } from "./rng.js";
import { writeSafetensorsAtomic } from "./safetensors.js";
import { findTokenizer, type Tokenizer } from "./tokenizer.js";

function words(value: string, previous: string[] = []): string[] {
  return [...previous, ...value.split(",")];
}

/** The flags of sample-prior that set prior options (the rest: count, seed, out, threads, backend, json). */
export interface PriorCliOptions {
  prior?: string;
  spec?: string;
  sigma?: number;
  mean?: number;
  range?: number;
  gain?: number;
  select?: "frequent" | "uniform";
  top?: number;
  corpus?: string;
  replace?: boolean;
  words?: string[];
  fill?: string;
  source?: "vocab" | "activations" | "tensor";
  rows?: number;
  fitSeed?: number;
  layer?: number;
  texts?: string;
  secondTexts?: string;
  pooling?: "mean" | "token";
  maxLength?: number;
  batchSize?: number;
  specialTokens?: boolean;
  jitter?: number;
  jitterMode?: "relative" | "absolute";
  shrinkage?: number;
  base?: "gaussian" | "fitted-gaussian";
  c?: number;
  maxTries?: number;
  alpha?: string;
  percentile?: number;
  neighbor?: number;
  sampleRows?: string;
  path?: string;
  tensor?: string;
  noise?: number;
}

/** Which flags each kind takes (exclusion and interpolation take their Gaussians' flags too). */
const FIT_FLAGS = [
  "source",
  "rows",
  "fitSeed",
  "layer",
  "texts",
  "pooling",
  "maxLength",
  "batchSize",
  "specialTokens",
  "jitter",
  "jitterMode",
  "shrinkage",
  "path",
  "tensor",
] as const;
const KIND_FLAGS: Record<PriorKind, readonly (keyof PriorCliOptions)[]> = {
  gaussian: ["sigma", "mean"],
  xavier: ["gain"],
  uniform: ["range"],
  vocab: ["select", "top", "corpus", "replace"],
  "class-label": ["words", "fill", "sigma", "range", "gain"],
  "fitted-gaussian": FIT_FLAGS,
  exclusion: ["base", "c", "maxTries", "sigma", "mean", ...FIT_FLAGS],
  interpolation: ["alpha", "secondTexts", ...FIT_FLAGS],
  knn: ["percentile", "neighbor", "sampleRows", "fitSeed"],
  posterior: ["path", "tensor", "noise"],
};

const FLAG_NAMES: Record<keyof PriorCliOptions, string> = {
  prior: "--prior",
  spec: "--spec",
  sigma: "--sigma",
  mean: "--mean",
  range: "--range",
  gain: "--gain",
  select: "--select",
  top: "--top",
  corpus: "--corpus",
  replace: "--replace",
  words: "--words",
  fill: "--fill",
  source: "--source",
  rows: "--rows",
  fitSeed: "--fit-seed",
  layer: "--layer",
  texts: "--texts",
  secondTexts: "--second-texts",
  pooling: "--pooling",
  maxLength: "--max-length",
  batchSize: "--batch-size",
  specialTokens: "--no-special-tokens",
  jitter: "--jitter",
  jitterMode: "--jitter-mode",
  shrinkage: "--shrinkage",
  base: "--base",
  c: "--c",
  maxTries: "--max-tries",
  alpha: "--alpha",
  percentile: "--percentile",
  neighbor: "--neighbor",
  sampleRows: "--sample-rows",
  path: "--path",
  tensor: "--tensor",
  noise: "--noise",
};

function defined(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

function fittedGaussianRecord(o: PriorCliOptions, texts: string | undefined): PriorRecord {
  const source =
    o.source ?? (texts !== undefined ? "activations" : o.path !== undefined ? "tensor" : "vocab");
  return defined({
    kind: "fitted-gaussian",
    source,
    rows: o.rows,
    seed: o.fitSeed,
    layer: o.layer,
    textsFile: texts,
    pooling: o.pooling,
    maxLength: o.maxLength,
    batchSize: o.batchSize,
    addSpecialTokens: o.specialTokens === false ? false : undefined,
    path: o.path,
    tensor: o.tensor,
    jitter: o.jitter,
    jitterMode: o.jitterMode,
    shrinkage: o.shrinkage,
  }) as PriorRecord;
}

/** A flag's value parsed by `parse`, its error prefixed with the flag's name. */
function named<T>(flag: string, parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    throw new InvalidArgumentError(`${flag}: ${(e as Error).message}`);
  }
}

/**
 * The prior record that sample-prior's flags describe: `--spec` (a JSON record, or @file holding one, e.g. the
 * "prior" of a run.json), or `--prior <kind>` with that kind's flags. A flag the kind does not take is an
 * error that names it. Option checks beyond the flags' types are createPrior's.
 */
export function priorRecordFromOptions(o: PriorCliOptions): PriorRecord {
  const given = (Object.keys(FLAG_NAMES) as (keyof PriorCliOptions)[]).filter(
    (k) => k !== "prior" && k !== "spec" && o[k] !== undefined && !(k === "specialTokens" && o[k] === true),
  );
  if (o.spec !== undefined) {
    if (o.prior !== undefined || given.length > 0)
      throw new InvalidArgumentError(
        `--spec gives the whole prior; leave out ${[o.prior !== undefined ? "--prior" : "", ...given.map((k) => FLAG_NAMES[k])].filter(Boolean).join(", ")}`,
      );
    const text = o.spec.startsWith("@") ? readFileSync(o.spec.slice(1), "utf8") : o.spec;
    let record: unknown;
    try {
      record = JSON.parse(text);
    } catch (e) {
      throw new InvalidArgumentError(`--spec: not valid JSON (${(e as Error).message})`);
    }
    // A run.json holds the record under "prior".
    if (typeof record === "object" && record !== null && !("kind" in record) && "prior" in record)
      record = (record as { prior: unknown }).prior;
    if (typeof record !== "object" || record === null || typeof (record as PriorRecord).kind !== "string")
      throw new InvalidArgumentError('--spec: expected a JSON object with a string "kind"');
    return record as PriorRecord;
  }
  const kind = o.prior;
  if (kind === undefined) throw new InvalidArgumentError("give --prior <kind> or --spec <json>");
  if (!(PRIOR_KINDS as readonly string[]).includes(kind))
    throw new InvalidArgumentError(`--prior: expected one of ${PRIOR_KINDS.join(", ")}, got ${kind}`);
  const allowed = KIND_FLAGS[kind as PriorKind];
  const extra = given.filter((k) => !allowed.includes(k));
  if (extra.length > 0)
    throw new InvalidArgumentError(
      `${extra.map((k) => FLAG_NAMES[k]).join(", ")}: not an option of --prior ${kind} (its options: ${allowed.map((k) => FLAG_NAMES[k]).join(", ")})`,
    );
  // Flags of the kind that the chosen --fill / --base does not use: an error too (they were dropped).
  const unusedWith = (flags: readonly (keyof PriorCliOptions)[], choice: string) => {
    const dropped = given.filter((k) => flags.includes(k));
    if (dropped.length > 0)
      throw new InvalidArgumentError(
        `${dropped.map((k) => FLAG_NAMES[k]).join(", ")}: not used with ${choice} (use --spec for other combinations)`,
      );
  };
  switch (kind as PriorKind) {
    case "gaussian":
      return defined({ kind, sigma: o.sigma, mean: o.mean }) as PriorRecord;
    case "xavier":
      return defined({ kind, gain: o.gain }) as PriorRecord;
    case "uniform":
      return defined({ kind, range: o.range }) as PriorRecord;
    case "vocab":
      return defined({
        kind,
        select: o.select,
        top: o.top,
        corpus: o.corpus,
        replace: o.replace,
      }) as PriorRecord;
    case "class-label": {
      if (!o.words) throw new InvalidArgumentError("--prior class-label needs --words");
      const fillKind = o.fill ?? "vocab";
      const fill: Record<string, PriorRecord> = {
        vocab: { kind: "vocab" },
        gaussian: defined({ kind: "gaussian", sigma: o.sigma }) as PriorRecord,
        uniform: defined({ kind: "uniform", range: o.range }) as PriorRecord,
        xavier: defined({ kind: "xavier", gain: o.gain }) as PriorRecord,
      };
      if (!fill[fillKind])
        throw new InvalidArgumentError(
          `--fill: expected vocab, gaussian, uniform or xavier (or use --spec), got ${fillKind}`,
        );
      const fillFlag: Record<string, keyof PriorCliOptions> = {
        gaussian: "sigma",
        uniform: "range",
        xavier: "gain",
      };
      unusedWith(
        (["sigma", "range", "gain"] as const).filter((k) => k !== fillFlag[fillKind]),
        `--fill ${fillKind}`,
      );
      return { kind, words: o.words, fill: fill[fillKind] };
    }
    case "fitted-gaussian":
      return fittedGaussianRecord(o, o.texts);
    case "exclusion": {
      const baseKind = o.base ?? "fitted-gaussian";
      if (baseKind === "gaussian") unusedWith(FIT_FLAGS, "--base gaussian");
      else unusedWith(["sigma", "mean"], "--base fitted-gaussian");
      const base =
        baseKind === "gaussian"
          ? (defined({ kind: "gaussian", sigma: o.sigma, mean: o.mean }) as PriorRecord)
          : fittedGaussianRecord(o, o.texts);
      return defined({ kind, base, c: o.c, maxTries: o.maxTries }) as PriorRecord;
    }
    case "interpolation": {
      if (o.texts === undefined)
        throw new InvalidArgumentError(
          "--prior interpolation needs --texts (the new domain; --second-texts defaults to the vocabulary)",
        );
      const alpha =
        o.alpha === undefined || o.alpha === "uniform"
          ? "uniform"
          : named("--alpha", () => numberArg(o.alpha!));
      const second =
        o.secondTexts === undefined
          ? (defined({
              kind: "fitted-gaussian",
              source: "vocab",
              rows: o.rows,
              seed: o.fitSeed,
              jitter: o.jitter,
              jitterMode: o.jitterMode,
              shrinkage: o.shrinkage,
            }) as PriorRecord)
          : fittedGaussianRecord(o, o.secondTexts);
      return { kind, alpha, first: fittedGaussianRecord(o, o.texts), second };
    }
    case "knn":
      return defined({
        kind,
        percentile: o.percentile,
        neighbor: o.neighbor,
        sampleRows:
          o.sampleRows === undefined || o.sampleRows === "all"
            ? o.sampleRows
            : named("--sample-rows", () => integerArg(1)(o.sampleRows!)),
        seed: o.fitSeed,
      }) as PriorRecord;
    case "posterior":
      if (o.path === undefined)
        throw new InvalidArgumentError("--prior posterior needs --path <file.safetensors>");
      return defined({ kind, path: o.path, tensor: o.tensor, noise: o.noise }) as PriorRecord;
  }
}

// What building a record reads of the model, least to most: its hidden size only; its vocabulary matrix and
// tokenizer; activations (forward passes of the loaded model).
const NEEDS = ["size", "vocabulary", "model"] as const;
type ModelNeed = (typeof NEEDS)[number];

/** What building this record (and the priors inside it: base, first, second, fill) reads of the model. */
function modelNeed(record: unknown): ModelNeed {
  if (typeof record !== "object" || record === null) return "size";
  const r = record as PriorRecord;
  let own: ModelNeed = "size";
  // An exclusion record without a base gets the library's default, the vocabulary's Gaussian.
  if (r.kind === "vocab" || r.kind === "class-label" || r.kind === "knn") own = "vocabulary";
  else if (r.kind === "exclusion" && r.base === undefined) own = "vocabulary";
  else if (r.kind === "fitted-gaussian")
    own =
      r.source === "activations"
        ? "model"
        : r.source === undefined || r.source === "vocab"
          ? "vocabulary"
          : "size";
  const parts = [r.base, r.first, r.second, r.fill].map(modelNeed);
  return NEEDS[Math.max(...[own, ...parts].map((n) => NEEDS.indexOf(n)))]!;
}

/**
 * The vocabulary matrix, tokenizer and hidden size of a model directory without loading the model
 * (readTokenEmbeddings: the values a loaded model would give). The tokenizer is read only when a prior asks
 * for it.
 */
function vocabularyContext(dirArg: string, threads: number): PriorContext {
  const { dir, config, vocab } = readTokenEmbeddings(dirArg);
  let tokenizer: Tokenizer | null | undefined;
  return {
    dim: config.hiddenSize,
    vocab,
    threads,
    get tokenizer() {
      if (tokenizer === undefined) tokenizer = findTokenizer(dir, (m) => defaultLogger("warn", m));
      return tokenizer ?? undefined;
    },
  };
}

export interface SamplePriorOptions extends PriorCliOptions, BackendFlags {
  count: number;
  seed: number;
  out: string;
  threads?: number;
  json?: boolean;
}

/** Adds `priortune sample-prior <model-dir> --prior <kind> [options] --count N --seed S --out file`. */
export function registerSamplePrior(program: Command): void {
  const fitHelp = "(fitted-gaussian, exclusion, interpolation)";
  withBackend(program.command("sample-prior"), "compute backend for activations")
    .description(
      'draw prompt vectors from a prior (paper, "Priors") and write them to a safetensors file: tensor "prompt" ' +
        "[count, hidden size] F32, with the prior's record (it rebuilds the prior), the seed and the prior's " +
        "statistics in the metadata. Only what the prior needs is read: the hidden size, the embedding tensor " +
        "and tokenizer (vocabulary priors), or the whole model (activation priors)",
    )
    .argument(
      "<model-dir>",
      "Hugging Face model directory (its hidden size, vocabulary, tokenizer and activations)",
    )
    .addOption(new Option("--prior <kind>", "the prior").choices([...PRIOR_KINDS]))
    .option(
      "--spec <json>",
      "the whole prior as a JSON record, or @file with one (a run.json's prior works); replaces --prior and its options",
    )
    .requiredOption("--out <file>", "output safetensors file")
    .option("--count <n>", "vectors to draw (the prompt length P)", integerArg(1), 20)
    .option("--seed <n>", "seed of the draw", seedArg, 0)
    .option(
      "--sigma <x>",
      "gaussian: standard deviation (default 0.02); also exclusion --base gaussian, class-label --fill gaussian",
      numberArg,
    )
    .option("--mean <x>", "gaussian: the mean of every coordinate (default 0)", numberArg)
    .option(
      "--range <a>",
      "uniform: draw from [-a, a] (default 0.5); also class-label --fill uniform",
      numberArg,
    )
    .option(
      "--gain <g>",
      "xavier: gain, bound gain * sqrt(6 / (P + d)) (default 1); also class-label --fill xavier",
      numberArg,
    )
    .addOption(
      new Option(
        "--select <how>",
        "vocab: the N most frequent tokens of --corpus, or the whole vocabulary uniformly",
      ).choices(["frequent", "uniform"]),
    )
    .option("--top <n>", "vocab: how many of the most frequent tokens (default 5000)", integerArg(1))
    .option(
      "--corpus <file>",
      'vocab: text whose token frequencies rank the vocabulary (.txt lines, or .jsonl/.json(.gz) with "text")',
    )
    .option("--replace", "vocab: draw tokens with replacement (default: distinct tokens)")
    .option("--words <list>", "class-label: comma-separated label words, used as given (repeatable)", words)
    .option(
      "--fill <kind>",
      "class-label: prior of the rows after the labels: vocab (default), gaussian, uniform, xavier",
    )
    .addOption(
      new Option(
        "--source <what>",
        `reference rows of the fitted Gaussian ${fitHelp}: vocabulary rows, activations of --texts, or a --path tensor`,
      ).choices(["vocab", "activations", "tensor"]),
    )
    .option(
      "--rows <n>",
      `reference rows fitted, chosen at random (default: vocab 20000, else all) ${fitHelp}`,
      integerArg(2),
    )
    .option(
      "--fit-seed <n>",
      "seed of the random reference rows (fitted Gaussians) or of the rows behind the kNN distances (default 0)",
      integerArg(0),
    )
    .option(
      "--layer <n>",
      `activations: hidden-state index 0..layers, 0 = embeddings ${fitHelp}`,
      integerArg(0),
    )
    .option(
      "--texts <file>",
      `activations: texts, one per line or .jsonl/.json(.gz) with "text" ${fitHelp}; interpolation: the new domain`,
    )
    .option(
      "--second-texts <file>",
      "interpolation: texts of the second Gaussian, e.g. pre-training text (default: the vocabulary Gaussian)",
    )
    .addOption(
      new Option(
        "--pooling <how>",
        "activations: one row per text (mean over its tokens) or per token (default mean)",
      ).choices(["mean", "token"]),
    )
    .option(
      "--max-length <n>",
      "activations: tokens per text, longer texts truncated (default 128)",
      integerArg(1),
    )
    .option("--batch-size <n>", "activations: texts per forward pass (default 8)", integerArg(1))
    .option("--no-special-tokens", "activations: do not let the tokenizer add special tokens (e.g. BOS)")
    .option("--jitter <x>", `ridge added to the covariance (default 1e-3) ${fitHelp}`, numberArg)
    .addOption(
      new Option(
        "--jitter-mode <mode>",
        "ridge jitter * (trace / d) (relative, default) or jitter (absolute, the paper's Sigma + 1e-3 I)",
      ).choices(["relative", "absolute"]),
    )
    .option(
      "--shrinkage <s>",
      `shrink the covariance towards (trace / d) I by s in [0, 1] (default 0) ${fitHelp}`,
      numberArg,
    )
    .addOption(
      new Option("--base <kind>", "exclusion: the Gaussian excluded (default fitted-gaussian)").choices([
        "gaussian",
        "fitted-gaussian",
      ]),
    )
    .option("--c <x>", "exclusion: c > 1 of c_dim = exp((2/d) ln c) (default 5)", numberArg)
    .option(
      "--max-tries <n>",
      "exclusion: draws allowed per sample on average before giving up (default 10000)",
      integerArg(1),
    )
    .option(
      "--alpha <a>",
      'interpolation: "uniform" (alpha ~ U[0, 1] per vector, default) or a fixed number in [0, 1]',
    )
    .option(
      "--percentile <p>",
      "knn: percentile 0..100 of the vocabulary's nearest-neighbour distances used as the radius (default 50)",
      numberArg,
    )
    .option(
      "--neighbor <k>",
      "knn: use the distance to the k-th nearest other row (default 1)",
      integerArg(1),
    )
    .option("--sample-rows <n>", 'knn: vocabulary rows whose distances are measured, or "all" (default 4096)')
    .option(
      "--path <file>",
      "posterior: an earlier run's prompt (safetensors); fitted Gaussian --source tensor: the reference rows",
    )
    .option(
      "--tensor <name>",
      'posterior / --source tensor: tensor name in --path (default "prompt", or the only tensor)',
    )
    .option("--noise <x>", "posterior: standard deviation of Gaussian noise added (default 0)", numberArg)
    .option("--threads <n>", "CPU threads (default: all cores)", integerArg(1))
    .option("--json", "print a JSON summary")
    .action(async (dir: string, o: SamplePriorOptions) => {
      try {
        await samplePrior(dir, o);
      } catch (e) {
        process.stderr.write(`priortune sample-prior: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}

/**
 * sample-prior's work. Priors that need only the vocabulary and tokenizer read just those
 * (vocabularyContext); `loadWholeModel` loads the model for them too (the reference the tests hold that
 * path's files to).
 */
export async function samplePrior(dir: string, o: SamplePriorOptions, loadWholeModel = false): Promise<void> {
  const record = priorRecordFromOptions(o);
  // Its directory made (as make-data does) and checked before the prior is fitted.
  ensureWritableDir(dirname(resolve(o.out)));
  const need = modelNeed(record);
  let model: Model | undefined;
  let context: PriorContext;
  if (need === "model" || (need === "vocabulary" && loadWholeModel)) {
    model = await loadModel(dir, { backend: o.backend, precision: o.precision, threads: o.threads });
    context = { model, dim: model.config.hiddenSize, threads: o.threads };
  } else if (need === "vocabulary") {
    // The loaded model's thread count, by the same default (loadModel's).
    context = vocabularyContext(dir, o.threads ?? availableParallelism());
  } else {
    context = { dim: describeModel(dir).config.hiddenSize, threads: o.threads };
  }
  const dim = context.dim!;
  try {
    // Set on the context, not spread into a copy (that would read the lazy tokenizer).
    context.onProgress = process.stderr.isTTY ? (m: string) => process.stderr.write(`${m}\n`) : undefined;
    const prior = await createPrior(record, context);
    // The library names the count n; here it is --count (other sampling errors pass as they are).
    let prompt: Float32Array;
    try {
      prompt = prior.sample(o.count, new Rng(o.seed));
    } catch (e) {
      if (e instanceof Error && e.message.startsWith("n: ")) e.message = `--count: ${e.message.slice(3)}`;
      throw e;
    }
    const stats = prior.stats?.() ?? {};
    const described = prior.describe();
    const out = resolve(o.out);
    writeSafetensorsAtomic(out, [{ name: "prompt", dtype: "F32", shape: [o.count, dim], data: prompt }], {
      format: "priortune-prior-sample",
      version: "1",
      prior: JSON.stringify(described),
      seed: String(o.seed),
      count: String(o.count),
      model: resolve(dir),
      stats: JSON.stringify(stats),
    });
    const summary = { out, count: o.count, dim, seed: o.seed, prior: described, stats };
    if (o.json) process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
    else {
      const figures = Object.entries(stats)
        .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : v.toPrecision(4)}`)
        .join(", ");
      process.stdout.write(
        `wrote ${o.count} x ${dim} ${described.kind} prior vectors (seed ${o.seed}) to ${out}${figures ? `\n${figures}` : ""}\n`,
      );
    }
  } finally {
    model?.dispose();
  }
}
