// Tasks: train and validation examples for prompt-tuning, from local data files or seeded generators.
// A task is described by a JSON spec; `task.describe()` returns the spec with every default filled in
// (and the data files' SHA-256), which `loadTask` turns back into the same examples.
//
// Examples are prompt/completion pairs: the prompt is the filled template up to "Answer:", the
// completion is the gold answer as trained (with its leading space). Paper defaults (paper.md, Setup):
// 1000 train / 1000 validation examples, the SQuAD and MATH templates below.
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import {
  type ArithmeticOptions,
  type ClozeOptions,
  generateArithmetic,
  generateClozeRecords,
  generateQaFacts,
  type QaFactsOptions,
} from "./data/generators.js";
import {
  parseJsonLines,
  parseMathematics,
  parseSquad,
  parseTextRecords,
  readSource,
  readSourceLines,
  type SquadRecord,
} from "./data/loaders.js";
import {
  CLOZE_TEMPLATE,
  checkTemplate,
  completionAfter,
  fillTemplate,
  JSONL_TEMPLATE,
  MATH_TEMPLATE,
  SQUAD_TEMPLATE,
  templateFields,
} from "./data/templates.js";
import { readJsonFile } from "./files.js";
import { Rng } from "./rng.js";
import { suggestKey } from "./validate.js";

export * from "./data/encoding.js";
export * from "./data/generators.js";
export * from "./data/loaders.js";
export * from "./data/templates.js";

export interface Example {
  /** The filled template, up to and including "Answer:". */
  prompt: string;
  /** The gold answer as trained, with a leading space where the template needs one. */
  completion: string;
  /** Every gold answer, for exact match / F1 (SQuAD dev sets have several); absent for plain text. */
  answers?: string[];
  /** The source's identifier (SQuAD question id), when it has one. */
  id?: string;
}

/** qa: exact match + token F1; accuracy: arithmetic (numeric compare); none: loss only. */
export type TaskMetric = "qa" | "accuracy" | "none";

export interface Task {
  name: string;
  metric: TaskMetric;
  train: Example[];
  validation: Example[];
  /** The resolved spec (defaults filled in, absolute paths, file hashes): loadTask reproduces the task. */
  describe(): Record<string, unknown>;
}

export type TaskKind = "squad" | "mathematics" | "c4" | "jsonl" | "arithmetic" | "qa-facts" | "cloze";

interface TaskSpecBase {
  /** Shown in logs and run records; default the kind (and the file name for file tasks). */
  name?: string;
  /** Overrides the metric of the kind (see TaskMetric). */
  metric?: TaskMetric;
  /** At most this many train examples (fewer when a file has fewer). Default 1000. */
  trainCount?: number;
  /**
   * At most this many validation examples. Default 1000. From one source they are held out first, so
   * runs that differ only in trainCount are scored on the same examples (see `split`); a source with
   * fewer than trainCount + validationCount examples gives train its count and validation the rest.
   */
  validationCount?: number;
  /** Sampling seed for file tasks, generator seed for generated ones. Default 0. */
  seed?: number;
  /**
   * How one source (a file without validationPath, or a generator) is divided. "validation-first"
   * (default): the first validationCount examples (after the shuffle) are the validation set, so runs
   * that differ in trainCount are scored on the same examples, and the train examples are drawn from
   * the rest; SQuAD questions are held out a whole paragraph at a time (train never sees a validation
   * question's paragraph; only the last held paragraph's other questions go unused). "train-first": the
   * first trainCount then the next validationCount, as earlier versions did (run directories they
   * wrote have no `split` and reload this way).
   */
  split?: SplitOrder;
}

export type SplitOrder = "validation-first" | "train-first";

interface FileTaskSpecBase extends TaskSpecBase {
  /** The data file (gzipped files are read transparently). */
  path: string;
  /**
   * A second file for validation (e.g. SQuAD dev next to train). Without it, train and validation are
   * disjoint samples of `path`.
   */
  validationPath?: string;
  /** Sample at random (default) or take the first examples in file order. */
  shuffle?: boolean;
  /** Expected SHA-256 of `path` / `validationPath`; loading fails if the file changed. */
  sha256?: string;
  validationSha256?: string;
}

export interface SquadTaskSpec extends FileTaskSpecBase {
  kind: "squad";
  /** Default SQUAD_TEMPLATE; fields {context}, {question}, {title}. */
  template?: string;
  /** SQuAD v2 unanswerable questions: "skip" (default) or "keep" with the empty answer. */
  unanswerable?: "skip" | "keep";
}

export interface MathematicsTaskSpec extends FileTaskSpecBase {
  kind: "mathematics";
  /** Default MATH_TEMPLATE; field {question}. */
  template?: string;
}

export interface C4TaskSpec extends FileTaskSpecBase {
  kind: "c4";
  /**
   * 0 (default): the whole text is the completion after an empty prompt. n > 0: the first n words are
   * the prompt and the rest the continuation; texts with no more than n words are skipped.
   */
  prefixWords?: number;
}

export interface JsonlTaskSpec extends FileTaskSpecBase {
  kind: "jsonl";
  /** Default "{prompt}"; any string field of the records. The completion is used as written. */
  template?: string;
}

export interface ArithmeticTaskSpec extends TaskSpecBase, Omit<ArithmeticOptions, "count" | "seed"> {
  kind: "arithmetic";
  /** Default MATH_TEMPLATE. */
  template?: string;
}

export interface QaFactsTaskSpec extends TaskSpecBase, Omit<QaFactsOptions, "count" | "seed"> {
  kind: "qa-facts";
  /** Default SQUAD_TEMPLATE. */
  template?: string;
  /** Needed as "keep" when unanswerableFraction > 0. */
  unanswerable?: "skip" | "keep";
}

export interface ClozeTaskSpec extends TaskSpecBase, Omit<ClozeOptions, "text" | "count" | "seed"> {
  kind: "cloze";
  /** The text file to mask words in. */
  path: string;
  sha256?: string;
}

export type TaskSpec =
  | SquadTaskSpec
  | MathematicsTaskSpec
  | C4TaskSpec
  | JsonlTaskSpec
  | ArithmeticTaskSpec
  | QaFactsTaskSpec
  | ClozeTaskSpec;

// ---------------------------------------------------------------------------------------------------
// Spec validation: every option is checked by name, and unknown options (typos) are errors.

type Check = (v: unknown, name: string) => void;
const isInt =
  (min: number, max = Number.MAX_SAFE_INTEGER): Check =>
  (v, name) => {
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      throw new RangeError(
        `${name}: expected an integer >= ${min}${max < Number.MAX_SAFE_INTEGER ? ` and <= ${max}` : ""}, got ${JSON.stringify(v)}`,
      );
    }
  };
const isString: Check = (v, name) => {
  if (typeof v !== "string") throw new TypeError(`${name}: expected a string, got ${JSON.stringify(v)}`);
};
const isBool: Check = (v, name) => {
  if (typeof v !== "boolean") throw new TypeError(`${name}: expected a boolean, got ${JSON.stringify(v)}`);
};
const isOneOf =
  (...values: string[]): Check =>
  (v, name) => {
    if (typeof v !== "string" || !values.includes(v)) {
      throw new RangeError(
        `${name}: expected one of ${values.map((x) => `"${x}"`).join(", ")}, got ${JSON.stringify(v)}`,
      );
    }
  };
const isFraction: Check = (v, name) => {
  if (typeof v !== "number" || !(v >= 0 && v <= 1)) {
    throw new RangeError(`${name}: expected a number in [0, 1], got ${JSON.stringify(v)}`);
  }
};
const isOperations: Check = (v, name) => {
  if (!Array.isArray(v) || v.length === 0) throw new TypeError(`${name}: expected a non-empty array`);
  v.forEach((op, i) => {
    isOneOf("add", "sub", "mul")(op, `${name}[${i}]`);
  });
};

const COMMON: Record<string, Check> = {
  kind: isString,
  name: isString,
  metric: isOneOf("qa", "accuracy", "none"),
  trainCount: isInt(0),
  validationCount: isInt(0),
  seed: isInt(0, 2 ** 32 - 1),
  split: isOneOf("validation-first", "train-first"),
};
const FILE: Record<string, Check> = {
  path: isString,
  validationPath: isString,
  shuffle: isBool,
  sha256: isString,
  validationSha256: isString,
};
const OPTIONS: Record<TaskKind, Record<string, Check>> = {
  squad: { ...COMMON, ...FILE, template: isString, unanswerable: isOneOf("skip", "keep") },
  mathematics: { ...COMMON, ...FILE, template: isString },
  c4: { ...COMMON, ...FILE, prefixWords: isInt(0) },
  jsonl: { ...COMMON, ...FILE, template: isString },
  arithmetic: {
    ...COMMON,
    template: isString,
    operations: isOperations,
    digits: isInt(1, 40),
    decimals: isInt(0, 20),
    negative: isBool,
    phrasing: isOneOf("mathematics", "plain"),
    unique: isBool,
  },
  "qa-facts": {
    ...COMMON,
    template: isString,
    peoplePerContext: isInt(1, 10),
    questionsPerContext: isInt(1),
    unanswerableFraction: isFraction,
    unanswerable: isOneOf("skip", "keep"),
  },
  cloze: {
    ...COMMON,
    path: isString,
    sha256: isString,
    template: isString,
    minWords: isInt(1),
    maxWords: isInt(1),
    minWordLength: isInt(1),
    mask: isString,
  },
};
const REQUIRED: Partial<Record<TaskKind, string[]>> = {
  squad: ["path"],
  mathematics: ["path"],
  c4: ["path"],
  jsonl: ["path"],
  cloze: ["path"],
};

/** The task kinds loadTask reads or generates. */
export const TASK_KINDS = Object.keys(OPTIONS) as TaskKind[];

/** Checks a task spec (e.g. parsed from JSON) option by option and returns it typed. */
export function parseTaskSpec(spec: unknown): TaskSpec {
  if (typeof spec !== "object" || spec === null || Array.isArray(spec)) {
    throw new TypeError(`task spec: expected an object, got ${spec === null ? "null" : typeof spec}`);
  }
  const s = spec as Record<string, unknown>;
  const kind = s["kind"];
  if (typeof kind !== "string" || !(kind in OPTIONS)) {
    throw new RangeError(
      `kind: expected one of ${TASK_KINDS.map((k) => `"${k}"`).join(", ")}, got ${JSON.stringify(kind)}`,
    );
  }
  const known = OPTIONS[kind as TaskKind];
  for (const [key, value] of Object.entries(s)) {
    if (value === undefined) continue;
    const check = known[key];
    if (!check) {
      const hint = suggestKey(key, Object.keys(known));
      throw new RangeError(
        `task spec: unknown option "${key}" for kind "${kind}"${hint ? ` (did you mean "${hint}"?)` : ""} (known: ${Object.keys(known).join(", ")})`,
      );
    }
    check(value, key);
  }
  for (const key of REQUIRED[kind as TaskKind] ?? []) {
    if (s[key] === undefined) throw new TypeError(`${key}: required for kind "${kind}"`);
  }
  return s as unknown as TaskSpec;
}

// ---------------------------------------------------------------------------------------------------
// Loading

const DEFAULT_COUNT = 1000;

const DEFAULT_METRIC: Record<TaskKind, TaskMetric> = {
  squad: "qa",
  mathematics: "accuracy",
  c4: "none",
  jsonl: "qa",
  arithmetic: "accuracy",
  "qa-facts": "qa",
  cloze: "qa",
};

function fileName(path: string): string {
  return path.split(/[\\/]/u).pop() ?? path;
}

function checkHash(path: string, expected: string | undefined, option: string, sha256: string): void {
  if (expected !== undefined && expected.trim().toLowerCase() !== sha256) {
    throw new Error(
      `${path}: the file changed since the task was described (${option} ${expected.slice(0, 12)}…, ` +
        `file ${sha256.slice(0, 12)}…); point the spec at the original data or drop ${option}`,
    );
  }
}

async function readChecked(path: string, expected: string | undefined, option: string) {
  const source = await readSource(path);
  checkHash(path, expected, option, source.sha256);
  return source;
}

/** A file of a line format (JSON lines), read line by line: see readSourceLines. */
async function readCheckedLines(path: string, expected: string | undefined, option: string) {
  const source = await readSourceLines(path);
  checkHash(path, expected, option, source.sha256);
  return { text: source.lines, sha256: source.sha256 };
}

/**
 * Train and validation examples. From two lists: a sample of each. From one list, after a seeded
 * shuffle unless `rng` is null: "validation-first" takes validation first, whole `groups` (SQuAD
 * paragraphs) at a time in the order they first appear (fewer when the list has under train + validation
 * items: train's count is kept), and the train items from the other groups;
 * "train-first" takes the first train items then the next validation ones. The counts are upper
 * bounds: a source with fewer examples gives all it has.
 */
function split(
  items: Example[],
  validationItems: Example[] | null,
  counts: { train: number; validation: number },
  rng: Rng | null,
  order: SplitOrder,
  groups: readonly string[] | null = null,
): { train: Example[]; validation: Example[] } {
  const shuffled = (list: Example[]) => (rng ? rng.shuffle([...list]) : list);
  if (validationItems !== null) {
    return {
      train: shuffled(items).slice(0, counts.train),
      validation: shuffled(validationItems).slice(0, counts.validation),
    };
  }
  // Shuffling the positions draws the same permutation as shuffling the items (it depends on the length).
  const at = [...items.keys()];
  if (rng) rng.shuffle(at);
  const pick = (list: number[]) => list.map((i) => items[i]!);
  if (order === "train-first") {
    const train = at.slice(0, counts.train);
    return { train: pick(train), validation: pick(at.slice(train.length, train.length + counts.validation)) };
  }
  // Validation holds out whole groups (SQuAD paragraphs; without groups each item is its own), in the order
  // they first appear, until it has its count: only the last group's other items are lost to train. A
  // source too small for both counts keeps train's: validation gets what is left.
  const groupOf = (i: number): unknown => (groups ? groups[i] : i);
  const members = new Map<unknown, number[]>();
  for (const i of at) {
    const g = groupOf(i);
    const list = members.get(g);
    if (list) list.push(i);
    else members.set(g, [i]);
  }
  const wanted = Math.min(counts.validation, Math.max(0, at.length - counts.train));
  const validation: number[] = [];
  const held = new Set<unknown>();
  for (const [g, list] of members) {
    if (validation.length >= wanted) break;
    held.add(g);
    validation.push(...list.slice(0, wanted - validation.length));
  }
  const train: number[] = [];
  for (const i of at) {
    if (train.length >= counts.train) break;
    if (!held.has(groupOf(i))) train.push(i);
  }
  return { train: pick(train), validation: pick(validation) };
}

/** The examples with, for each, its paragraph (what the split keeps on one side). */
function squadExamples(
  records: SquadRecord[],
  template: string,
  unanswerable: "skip" | "keep",
): { examples: Example[]; groups: string[] } {
  const examples: Example[] = [];
  const groups: string[] = [];
  for (const r of records) {
    if (r.impossible && unanswerable === "skip") continue;
    const prompt = fillTemplate(template, { context: r.context, question: r.question, title: r.title });
    const answers = r.impossible ? [""] : r.answers;
    examples.push({ prompt, completion: completionAfter(prompt, answers[0]!), answers, id: r.id });
    groups.push(r.context);
  }
  return { examples, groups };
}

function mathematicsExamples(text: string, template: string, source: string): Example[] {
  return parseMathematics(text, source).map(({ question, answer }) => {
    const prompt = fillTemplate(template, { question });
    return { prompt, completion: completionAfter(prompt, answer), answers: [answer] };
  });
}

function jsonlExamples(text: string | readonly string[], template: string, source: string): Example[] {
  return parseJsonLines(text, source).map((r, i) => {
    const where = `${source}: record ${i + 1}`;
    if (typeof r["completion"] !== "string")
      throw new TypeError(`${where}: expected a string "completion" field`);
    let prompt: string;
    try {
      prompt = fillTemplate(template, r);
    } catch (e) {
      throw new RangeError(`${where}: ${(e as Error).message}`);
    }
    const given = r["answers"];
    if (given !== undefined && !(Array.isArray(given) && given.every((a) => typeof a === "string")))
      throw new TypeError(`${where}: "answers" must be an array of strings when present`);
    // Exact match and F1 need a gold answer: an unanswerable question is [""] (SQuAD v2's convention).
    if (Array.isArray(given) && given.length === 0)
      throw new RangeError(`${where}: "answers" is empty (give [""] for a question without an answer)`);
    const answers = given !== undefined ? [...(given as string[])] : [r["completion"].trim()];
    return { prompt, completion: r["completion"], answers };
  });
}

function c4Examples(text: string | readonly string[], prefixWords: number, source: string): Example[] {
  const out: Example[] = [];
  for (const doc of parseTextRecords(text, source)) {
    if (prefixWords === 0) {
      if (doc.trim() !== "") out.push({ prompt: "", completion: doc }); // an empty document has nothing to learn
      continue;
    }
    // Split before the (prefixWords + 1)-th word; the continuation keeps its leading whitespace.
    const words = [...doc.matchAll(/\S+/gu)];
    if (words.length <= prefixWords) continue;
    const cut = words[prefixWords - 1]!.index! + words[prefixWords - 1]![0].length;
    out.push({ prompt: doc.slice(0, cut), completion: doc.slice(cut) });
  }
  return out;
}

/**
 * A task description a run recorded (run.json's `task`) with its split: descriptions written before `split`
 * existed divided their source train first.
 */
export function withRecordedSplit(description: Record<string, unknown>): Record<string, unknown> {
  return "split" in description ? description : { ...description, split: "train-first" };
}

/**
 * The spec to resume run directories with: one whose run.json was written before `split` existed (its task
 * has none) divided its source as withRecordedSplit says, so the spec does too unless it names a split.
 */
export function specForRunDirs<T extends TaskSpec>(spec: T, runDirs: readonly (string | undefined)[]): T {
  if (spec.split !== undefined) return spec;
  for (const dir of runDirs) {
    const path = dir ? join(dir, "run.json") : "";
    if (!path || !existsSync(path)) continue;
    const task = (readJsonFile(path) as { task?: unknown }).task;
    if (typeof task === "object" && task !== null && !("split" in task))
      return { ...spec, split: withRecordedSplit(task as Record<string, unknown>)["split"] as SplitOrder };
  }
  return spec;
}

/** loadTask for a description a run recorded, divided as it was (withRecordedSplit). */
export function loadRecordedTask(description: Record<string, unknown>): Promise<Task> {
  return loadTask(withRecordedSplit(description));
}

/**
 * Loads (or generates) a task from its spec. File kinds read `path` (and `validationPath`); generator
 * kinds draw trainCount + validationCount examples from their seed, divided as `split` says (validation
 * first by default). Errors name the offending option.
 */
export async function loadTask(spec: TaskSpec | Record<string, unknown>): Promise<Task> {
  const s = parseTaskSpec(spec);
  const kind = s.kind;
  const counts = { train: s.trainCount ?? DEFAULT_COUNT, validation: s.validationCount ?? DEFAULT_COUNT };
  const seed = s.seed ?? 0;
  const order = s.split ?? "validation-first";
  const resolved: Record<string, unknown> = {
    kind,
    name: s.name,
    metric: s.metric ?? DEFAULT_METRIC[kind],
    trainCount: counts.train,
    validationCount: counts.validation,
    seed,
    split: order,
  };
  let examples: { train: Example[]; validation: Example[] };

  switch (kind) {
    case "squad":
    case "mathematics":
    case "c4":
    case "jsonl": {
      const path = resolve(s.path);
      const validationPath = s.validationPath === undefined ? undefined : resolve(s.validationPath);
      const shuffle = s.shuffle ?? true;
      let template: string | undefined;
      // JSON lines are read line by line (a C4 shard may not fit one string); the others whole.
      const lineFormat = kind === "c4" || kind === "jsonl";
      let toExamples: (text: string | string[], source: string) => { examples: Example[]; groups?: string[] };
      if (kind === "squad") {
        template = s.template ?? SQUAD_TEMPLATE;
        checkTemplate(template, ["context", "question", "title"], "SQuAD");
        const unanswerable = s.unanswerable ?? "skip";
        resolved["unanswerable"] = unanswerable;
        toExamples = (text, source) =>
          squadExamples(parseSquad(text as string, source), template!, unanswerable);
      } else if (kind === "mathematics") {
        template = s.template ?? MATH_TEMPLATE;
        checkTemplate(template, ["question"], "Mathematics");
        toExamples = (text, source) => ({ examples: mathematicsExamples(text as string, template!, source) });
      } else if (kind === "jsonl") {
        template = s.template ?? JSONL_TEMPLATE;
        templateFields(template); // syntax only: the fields are whatever the records hold

        toExamples = (text, source) => ({ examples: jsonlExamples(text, template!, source) });
      } else {
        const prefixWords = s.prefixWords ?? 0;
        resolved["prefixWords"] = prefixWords;
        toExamples = (text, source) => ({ examples: c4Examples(text, prefixWords, source) });
      }
      const read = lineFormat ? readCheckedLines : readChecked;
      const train = await read(path, s.sha256, "sha256");
      const validation = validationPath
        ? await read(validationPath, s.validationSha256, "validationSha256")
        : null;
      const trainSet = toExamples(train.text, path);
      examples = split(
        trainSet.examples,
        validation && validationPath ? toExamples(validation.text, validationPath).examples : null,
        counts,
        shuffle ? new Rng(seed) : null,
        order,
        trainSet.groups,
      );
      Object.assign(resolved, { path, sha256: train.sha256, shuffle, template });
      if (validation) Object.assign(resolved, { validationPath, validationSha256: validation.sha256 });
      resolved["name"] ??= `${kind}:${fileName(path)}`;
      break;
    }
    case "arithmetic": {
      const template = s.template ?? MATH_TEMPLATE;
      checkTemplate(template, ["question"], "arithmetic");
      const options: Required<Omit<ArithmeticOptions, "count" | "seed">> = {
        operations: s.operations ?? ["add", "sub"],
        digits: s.digits ?? 2,
        decimals: s.decimals ?? 0,
        negative: s.negative ?? false,
        phrasing: s.phrasing ?? "mathematics",
        unique: s.unique ?? true,
      };
      // The generated text goes through the Mathematics parser: the same path as a file on disk.
      const text = generateArithmetic({ ...options, count: counts.train + counts.validation, seed });
      examples = split(mathematicsExamples(text, template, "arithmetic"), null, counts, null, order);
      Object.assign(resolved, options, { template });
      break;
    }
    case "qa-facts": {
      const template = s.template ?? SQUAD_TEMPLATE;
      checkTemplate(template, ["context", "question", "title"], "qa-facts");
      const unanswerable = s.unanswerable ?? "skip";
      const options: Required<Omit<QaFactsOptions, "count" | "seed">> = {
        peoplePerContext: s.peoplePerContext ?? 2,
        questionsPerContext: s.questionsPerContext ?? 2,
        unanswerableFraction: s.unanswerableFraction ?? 0,
      };
      if (options.unanswerableFraction > 0 && unanswerable === "skip") {
        throw new RangeError(
          'unanswerable: "skip" would drop the questions unanswerableFraction asks for; set unanswerable: "keep"',
        );
      }
      // Validation first: the paragraph it ends in may have up to questionsPerContext - 1 more questions,
      // which train leaves out, so that many more are drawn.
      const spare = order === "validation-first" ? options.questionsPerContext - 1 : 0;
      const text = generateQaFacts({ ...options, count: counts.train + counts.validation + spare, seed });
      const set = squadExamples(parseSquad(text, "qa-facts"), template, unanswerable);
      examples = split(set.examples, null, counts, null, order, set.groups);
      Object.assign(resolved, options, { unanswerable, template });
      break;
    }
    case "cloze": {
      const path = resolve(s.path);
      const source = await readChecked(path, s.sha256, "sha256");
      const options: Required<Omit<ClozeOptions, "text" | "count" | "seed">> = {
        minWords: s.minWords ?? 6,
        maxWords: s.maxWords ?? 80,
        minWordLength: s.minWordLength ?? 4,
        mask: s.mask ?? "____",
        template: s.template ?? CLOZE_TEMPLATE,
      };
      // All eligible sentences in seeded order; the first items do not depend on how many are drawn.
      const records = generateClozeRecords({ ...options, text: source.text, seed });
      const all = records.map((r) => ({ prompt: r.prompt, completion: r.completion, answers: [r.answer] }));
      examples = split(all, null, counts, null, order);
      Object.assign(resolved, { path, sha256: source.sha256 }, options);
      resolved["name"] ??= `cloze:${fileName(path)}`;
      break;
    }
  }
  resolved["name"] ??= kind;
  const description = JSON.parse(JSON.stringify(resolved)) as Record<string, unknown>;
  return {
    name: resolved["name"] as string,
    metric: resolved["metric"] as TaskMetric,
    train: examples.train,
    validation: examples.validation,
    describe: () => structuredClone(description),
  };
}
