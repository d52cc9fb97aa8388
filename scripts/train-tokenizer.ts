#!/usr/bin/env -S npx tsx
// Trains the byte-level BPE tokenizer of priortune's small model on the public-domain corpus.
//
//   node scripts/build-corpus.mjs                 # first: corpus/build/*.jsonl (see corpus/README.md)
//   npx tsx scripts/train-tokenizer.ts            # writes models/priortune-small/tokenizer{,_config}.json
//   npx tsx scripts/train-tokenizer.ts --check    # retrains; exits 1 unless it equals the committed files
//   options: --vocab-size N (8192)  --corpus DIR (corpus/build)  --out DIR (models/priortune-small)
//
// The merges are learned by Hugging Face's own BPE trainer (the Rust `tokenizers` crate), through its
// official Node binding, the `tokenizers` npm package (a devDependency; it ships prebuilt binaries, so it
// installs offline with no install script). That binding exposes `Tokenizer.train(files)` but no way to
// configure the trainer: it always runs BpeTrainer's defaults (30000 tokens, no special tokens, an alphabet
// of the characters seen). We run it that way and keep the first merges, which is exact, because BPE
// training is greedy: the trainer picks merge k+1 from the counts left by merges 1..k whatever the target
// size, and its ties are broken by token ids whose relative order does not depend on the alphabet's extra
// characters. So the result equals BpeTrainer(vocab_size, special_tokens=["<|endoftext|>"],
// initial_alphabet=ByteLevel.alphabet()), and test/fixtures/bpe/make_fixture.py checks exactly that
// against the Python binding of the same crate.
//
// Layout (as that trainer writes it): id 0 is <|endoftext|>, ids 1..256 the 256 byte symbols sorted by
// code point, then one token per merge. Pre-tokenizer, post-processor and decoder are GPT-2's ByteLevel
// ones, so any UTF-8 text (any byte string, in fact) encodes and decodes back exactly.
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { BPE, byteLevelAlphabet, byteLevelPreTokenizer, Tokenizer as HfTrainerTokenizer } from "tokenizers";
import { loadTokenizer } from "../lib/tokenizer.js";

export const END_OF_TEXT = "<|endoftext|>";
/** Context length of the small model (issue 7); recorded as model_max_length in tokenizer_config.json. */
export const MODEL_MAX_LENGTH = 256;
export const DEFAULT_VOCAB_SIZE = 8192;

export interface TrainBpeOptions {
  /** Size of the vocabulary, special tokens and the 256 byte symbols included. */
  vocabSize: number;
  /** Special tokens, given ids 0, 1, ... in this order. Default [END_OF_TEXT]. */
  specialTokens?: string[];
}

export interface TrainedBpe {
  /** The tokenizer.json object, in the key order that Hugging Face's `save` writes. */
  tokenizer: Record<string, unknown>;
  /** Merges kept (the vocabulary size minus specials, byte symbols and duplicate-string merges). */
  merges: number;
  /** Merges the untruncated trainer learned (at most 30000 minus its alphabet). */
  mergesLearned: number;
}

/**
 * Learns byte-level BPE merges from text files with Hugging Face's trainer and returns a GPT-2 style
 * tokenizer.json. The trainer reads each file line by line (its `train_from_files`), so a pre-token
 * never spans a newline during training; the same files always give the same tokenizer.
 */
export function trainByteLevelBpe(files: string[], options: TrainBpeOptions): TrainedBpe {
  const specialTokens = options.specialTokens ?? [END_OF_TEXT];
  const alphabet = [...byteLevelAlphabet()].sort((a, b) => a.codePointAt(0)! - b.codePointAt(0)!);
  const minSize = specialTokens.length + alphabet.length;
  if (!Number.isInteger(options.vocabSize) || options.vocabSize < minSize)
    throw new RangeError(
      `vocabSize: expected an integer >= ${minSize} (special tokens + 256 byte symbols), got ${options.vocabSize}`,
    );
  if (new Set(specialTokens).size !== specialTokens.length || specialTokens.some((t) => t.length === 0))
    throw new TypeError(
      `specialTokens: expected distinct non-empty strings, got ${JSON.stringify(specialTokens)}`,
    );

  const trainer = new HfTrainerTokenizer(BPE.empty());
  trainer.setPreTokenizer(byteLevelPreTokenizer(false, true));
  trainer.train(files);
  const scratch = mkdtempSync(join(tmpdir(), "priortune-bpe-"));
  let learned: Array<[string, string]>;
  try {
    const saved = join(scratch, "trained.json");
    trainer.save(saved, false);
    const model = JSON.parse(readFileSync(saved, "utf8")).model as {
      merges: Array<[string, string] | string>;
    };
    // Older files write a merge as "a b"; byte-level symbols never contain a plain space.
    learned = model.merges.map((m) => (typeof m === "string" ? (m.split(" ") as [string, string]) : m));
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }

  const vocab: Record<string, number> = {};
  let size = 0;
  for (const token of [...specialTokens, ...alphabet]) {
    if (token in vocab) throw new Error(`special token ${JSON.stringify(token)} is also a byte symbol`);
    vocab[token] = size++;
  }
  // The trainer's own loop: stop once the vocabulary is full; a merge whose string already exists (two
  // pairs spelling the same token) is kept as a merge but adds no entry.
  const merges: Array<[string, string]> = [];
  for (const [a, b] of learned) {
    if (size >= options.vocabSize) break;
    merges.push([a, b]);
    if (!(a + b in vocab)) vocab[a + b] = size++;
  }
  if (size < options.vocabSize)
    throw new RangeError(
      `vocabSize: the training text supports at most ${size} tokens (${learned.length} merges), asked for ${options.vocabSize}`,
    );

  const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
  const tokenizer = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: specialTokens.map((content) => ({
      id: vocab[content],
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: byteLevel,
    // GPT-2's: adds no tokens; trim_offsets false keeps the offsets of the leading "Ġ" in each token.
    post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
  return { tokenizer, merges: merges.length, mergesLearned: learned.length };
}

/** tokenizer_config.json for Transformers' GPT2TokenizerFast and @huggingface/tokenizers. */
export function tokenizerConfig(): Record<string, unknown> {
  return {
    add_bos_token: false,
    add_prefix_space: false,
    bos_token: END_OF_TEXT,
    // Decoding is the exact inverse of encoding only without the legacy " ," -> "," clean-up.
    clean_up_tokenization_spaces: false,
    eos_token: END_OF_TEXT,
    model_max_length: MODEL_MAX_LENGTH,
    pad_token: END_OF_TEXT,
    tokenizer_class: "GPT2Tokenizer",
    unk_token: END_OF_TEXT,
  };
}

/** JSON with two-space indents, but each merge on one line, so that a retrained tokenizer diffs readably. */
export function formatJson(value: unknown): string {
  return `${JSON.stringify(value, null, 2).replace(
    /\[\n\s+("(?:[^"\\]|\\.)*"),\n\s+("(?:[^"\\]|\\.)*")\n\s+\]/g,
    "[$1, $2]",
  )}\n`;
}

const sha256 = (data: string | Buffer) => createHash("sha256").update(data).digest("hex");

interface CorpusDocument {
  id: string;
  text: string;
}

function readSplit(corpusDir: string, split: string): { docs: CorpusDocument[]; sha256: string } {
  const path = join(corpusDir, `${split}.jsonl`);
  let raw: Buffer;
  try {
    raw = readFileSync(path);
  } catch {
    throw new Error(`${path}: not found; build the corpus first with \`node scripts/build-corpus.mjs\``);
  }
  const docs = raw
    .toString("utf8")
    .split("\n")
    .filter((line) => line.length > 0)
    .map((line) => JSON.parse(line) as CorpusDocument);
  return { docs, sha256: sha256(raw) };
}

function parseArgs(argv: string[]) {
  const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
  const args = {
    root,
    check: false,
    vocabSize: DEFAULT_VOCAB_SIZE,
    corpus: join(root, "corpus", "build"),
    manifest: join(root, "corpus", "manifest.json"),
    out: join(root, "models", "priortune-small"),
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a}: expected a value`);
      return v;
    };
    if (a === "--check") args.check = true;
    else if (a === "--vocab-size") {
      const v = value();
      args.vocabSize = Number(v);
      if (!/^\d+$/.test(v))
        throw new Error(`--vocab-size: expected a positive integer, got ${JSON.stringify(v)}`);
    } else if (a === "--corpus") args.corpus = resolve(value());
    else if (a === "--out") args.out = resolve(value());
    else if (a === "--help" || a === "-h") {
      console.log(
        readFileSync(fileURLToPath(import.meta.url), "utf8")
          .split("\n")
          .slice(1, 7)
          .join("\n")
          .replace(/^\/\/ ?/gm, ""),
      );
      process.exit(0);
    } else throw new Error(`unknown argument ${JSON.stringify(a)} (try --help)`);
  }
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const train = readSplit(args.corpus, "train");
  const validation = readSplit(args.corpus, "validation");
  // Train only on the corpus the manifest describes: a stale corpus/build would silently give another model.
  const manifest = JSON.parse(readFileSync(args.manifest, "utf8")) as {
    outputs: Record<string, { sha256: string }>;
  };
  for (const [split, digest] of [
    ["train", train.sha256],
    ["validation", validation.sha256],
  ] as const) {
    if (manifest.outputs[split]?.sha256 !== digest)
      throw new Error(
        `${relative(args.root, args.corpus)}/${split}.jsonl does not match ${relative(args.root, args.manifest)}: rebuild it with \`node scripts/build-corpus.mjs\``,
      );
  }

  const scratch = mkdtempSync(join(tmpdir(), "priortune-tokenizer-"));
  let trained: TrainedBpe;
  let seconds: number;
  try {
    const trainText = join(scratch, "train.txt");
    writeFileSync(trainText, train.docs.map((d) => `${d.text}\n`).join(""));
    const start = process.hrtime.bigint();
    trained = trainByteLevelBpe([trainText], { vocabSize: args.vocabSize });
    seconds = Number(process.hrtime.bigint() - start) / 1e9;
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
  const outputs = {
    "tokenizer.json": formatJson(trained.tokenizer),
    "tokenizer_config.json": formatJson(tokenizerConfig()),
  };
  console.log(
    `trained on ${train.docs.length} documents (${(train.docs.reduce((s, d) => s + Buffer.byteLength(d.text), 0) / 1e6).toFixed(2)} MB) in ${seconds.toFixed(1)} s: ` +
      `${args.vocabSize} tokens, ${trained.merges} merges kept of ${trained.mergesLearned} learned`,
  );

  const target = args.check ? mkdtempSync(join(tmpdir(), "priortune-tokenizer-check-")) : args.out;
  try {
    mkdirSync(target, { recursive: true });
    for (const [name, text] of Object.entries(outputs)) writeFileSync(join(target, name), text);
    // Through the package's own loader (@huggingface/tokenizers), as the model will use it.
    const tokenizer = loadTokenizer(target);
    if (tokenizer.vocabSize !== args.vocabSize)
      throw new Error(`loaded vocabulary has ${tokenizer.vocabSize} entries, expected ${args.vocabSize}`);
    let bytes = 0;
    let tokens = 0;
    for (const doc of validation.docs) {
      const ids = tokenizer.encode(doc.text);
      if (tokenizer.decode(ids) !== doc.text)
        throw new Error(`${doc.id}: decode(encode(text)) differs from the text`);
      bytes += Buffer.byteLength(doc.text);
      tokens += ids.length;
    }
    console.log(
      `validation: ${validation.docs.length} documents round-trip exactly; ${bytes} bytes -> ${tokens} tokens, ${(bytes / tokens).toFixed(3)} bytes/token`,
    );
    if (args.check) {
      const differing = Object.entries(outputs)
        .filter(([name, text]) => {
          try {
            return readFileSync(join(args.out, name), "utf8") !== text;
          } catch {
            return true;
          }
        })
        .map(([name]) => name);
      if (differing.length > 0) {
        console.error(`differs from ${relative(args.root, args.out)}: ${differing.join(", ")}`);
        process.exit(1);
      }
      console.log(`matches ${relative(args.root, args.out)}/`);
    } else {
      for (const [name, text] of Object.entries(outputs))
        console.log(
          `wrote ${relative(args.root, join(args.out, name))} (sha256 ${sha256(text).slice(0, 16)}...)`,
        );
    }
  } finally {
    if (args.check) rmSync(target, { recursive: true, force: true });
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    main();
  } catch (e) {
    console.error(`train-tokenizer: ${(e as Error).message}`);
    process.exit(1);
  }
}
