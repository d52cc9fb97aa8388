// `priortune make-data ...`: write the seeded synthetic datasets in the formats the task loaders read.
import { existsSync, readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { gunzipSync } from "node:zlib";
import { type Command, InvalidArgumentError, Option } from "commander";
import { integerArg, seedArg } from "./cli-args.js";
import {
  ARITHMETIC_OPERATIONS,
  type ArithmeticOperation,
  generateArithmetic,
  generateCloze,
  generateQaFacts,
  writeArithmetic,
  writeCloze,
  writeQaFacts,
} from "./data/generators.js";
import { isGzip } from "./data/loaders.js";
import { CLOZE_TEMPLATE } from "./data/templates.js";
import { ensureDir } from "./files.js";

const fraction = (value: string) => {
  const x = Number(value);
  if (value.trim() === "" || !(x >= 0 && x <= 1))
    throw new InvalidArgumentError("expected a number in [0, 1]");
  return x;
};

const operationList = (value: string): ArithmeticOperation[] => {
  const ops = value.split(",").map((s) => s.trim());
  for (const op of ops) {
    if (!ARITHMETIC_OPERATIONS.includes(op as ArithmeticOperation)) {
      throw new InvalidArgumentError(
        `unknown operation "${op}" (expected a comma-separated list of add, sub, mul)`,
      );
    }
  }
  return ops as ArithmeticOperation[];
};

interface OutputOptions {
  out: string;
  force?: boolean;
}

function outputOptions(cmd: Command, what: string): Command {
  return cmd
    .requiredOption(
      "-o, --out <path>",
      `file to write ${what} to ("-" for standard output; gzipped if it ends in .gz)`,
    )
    .option("--force", "overwrite --out if it exists");
}

/** Writes through `write` unless --out exists (and no --force); "-" prints `text()` instead. */
function emit(o: OutputOptions, what: string, text: () => string, write: () => { count: number }): void {
  if (o.out === "-") {
    process.stdout.write(text());
    return;
  }
  if (existsSync(o.out) && !o.force) throw new Error(`--out: ${o.out} exists; pass --force to overwrite it`);
  ensureDir(dirname(resolve(o.out))); // e.g. data/ in a fresh checkout
  const { count } = write();
  process.stderr.write(`wrote ${count} ${what} to ${o.out}\n`);
}

function readText(path: string): string {
  let bytes: Buffer;
  try {
    bytes = readFileSync(path);
  } catch (e) {
    throw new Error(`--input: cannot read ${path} (${(e as Error).message})`);
  }
  return (isGzip(bytes) ? gunzipSync(bytes) : bytes).toString("utf8");
}

/** Adds `make-data arithmetic|qa|cloze` to the program. */
export function registerDataCommands(program: Command): Command {
  const makeData = program
    .command("make-data")
    .description(
      "write seeded synthetic datasets in the formats the task loaders read (same seed, same file)",
    );

  const arithmetic = makeData
    .command("arithmetic")
    .description(
      "arithmetic questions as a DeepMind Mathematics file (question line, answer line); load it with task kind " +
        '"mathematics", or generate the same in memory with kind "arithmetic"',
    )
    .requiredOption("-n, --count <n>", "number of question/answer pairs", integerArg(0))
    .option("--seed <n>", "random seed", seedArg, 0)
    .option(
      "--operations <list>",
      "comma-separated operations drawn uniformly: add, sub, mul",
      operationList,
      ["add", "sub"] as ArithmeticOperation[],
    )
    .option("--digits <n>", "difficulty level: digits in each operand's integer part", integerArg(1), 2)
    .option("--decimals <n>", "decimal places of each operand", integerArg(0), 0)
    .option("--negative", "allow negative operands (each negated with probability 1/2)")
    .addOption(
      new Option(
        "--phrasing <style>",
        'wordings: "mathematics" (varied, as in DeepMind Mathematics) or "plain"',
      )
        .choices(["mathematics", "plain"])
        .default("mathematics"),
    )
    .option(
      "--allow-duplicates",
      "allow the same question text more than once (by default all are distinct)",
    );
  outputOptions(arithmetic, "the questions").action(
    (
      o: OutputOptions & {
        count: number;
        seed: number;
        operations: ArithmeticOperation[];
        digits: number;
        decimals: number;
        negative?: boolean;
        phrasing: "mathematics" | "plain";
        allowDuplicates?: boolean;
      },
    ) => {
      const options = {
        count: o.count,
        seed: o.seed,
        operations: o.operations,
        digits: o.digits,
        decimals: o.decimals,
        negative: o.negative === true,
        phrasing: o.phrasing,
        unique: !o.allowDuplicates,
      };
      // The generator's advice names its option (unique: false); here it is a flag.
      const flagged = <T>(run: () => T): T => {
        try {
          return run();
        } catch (e) {
          if (e instanceof Error)
            e.message = e.message.replace("set unique: false", "pass --allow-duplicates");
          throw e;
        }
      };
      emit(
        o,
        "arithmetic questions",
        () => flagged(() => generateArithmetic(options)),
        () => flagged(() => writeArithmetic(o.out, options)),
      );
    },
  );

  const qa = makeData
    .command("qa")
    .description(
      "extractive QA over templated facts about invented people, as SQuAD JSON (v1.1, or v2.0 with unanswerable " +
        'questions) with exact answer_start offsets; load it with task kind "squad", or generate in memory with "qa-facts"',
    )
    .requiredOption("-n, --count <n>", "number of questions", integerArg(0))
    .option("--seed <n>", "random seed", seedArg, 0)
    .option("--people-per-context <n>", "people described in each paragraph (1-10)", integerArg(1), 2)
    .option(
      "--questions-per-context <n>",
      "questions asked about each paragraph (at most 5 per person)",
      integerArg(1),
      2,
    )
    .option(
      "--unanswerable-fraction <x>",
      "fraction of questions about someone absent from the paragraph (SQuAD v2 is_impossible); 0 writes v1.1",
      fraction,
      0,
    );
  outputOptions(qa, "the SQuAD JSON").action(
    (
      o: OutputOptions & {
        count: number;
        seed: number;
        peoplePerContext: number;
        questionsPerContext: number;
        unanswerableFraction: number;
      },
    ) => {
      const options = {
        count: o.count,
        seed: o.seed,
        peoplePerContext: o.peoplePerContext,
        questionsPerContext: o.questionsPerContext,
        unanswerableFraction: o.unanswerableFraction,
      };
      emit(
        o,
        "questions",
        () => generateQaFacts(options),
        () => writeQaFacts(o.out, options),
      );
    },
  );

  const cloze = makeData
    .command("cloze")
    .description(
      "cloze (masked-word) items over any text file, as JSON lines {prompt, completion, context, answer}: one content " +
        'word per sentence replaced by the mask; load it with task kind "jsonl", or generate in memory with "cloze"',
    )
    .requiredOption("-i, --input <path>", "the text to mask words in (UTF-8, optionally gzipped)")
    .option("-n, --count <n>", "number of items (default: one per eligible sentence)", integerArg(0))
    .option("--seed <n>", "random seed (sentence order and the masked word)", seedArg, 0)
    .option("--min-words <n>", "skip sentences with fewer words", integerArg(1), 6)
    .option("--max-words <n>", "skip sentences with more words", integerArg(1), 80)
    .option("--min-word-length <n>", "mask only words with at least this many letters", integerArg(1), 4)
    .option("--mask <text>", "what replaces the masked word", "____")
    .option("--template <text>", "prompt template over {context} and {mask}", CLOZE_TEMPLATE);
  outputOptions(cloze, "the JSON lines").action(
    (
      o: OutputOptions & {
        input: string;
        count?: number;
        seed: number;
        minWords: number;
        maxWords: number;
        minWordLength: number;
        mask: string;
        template: string;
      },
    ) => {
      const options = {
        text: readText(o.input),
        count: o.count,
        seed: o.seed,
        minWords: o.minWords,
        maxWords: o.maxWords,
        minWordLength: o.minWordLength,
        mask: o.mask,
        template: o.template,
      };
      emit(
        o,
        "cloze items",
        () => generateCloze(options),
        () => writeCloze(o.out, options),
      );
    },
  );
  return makeData;
}
