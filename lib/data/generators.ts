// Seeded synthetic data, written in the same formats the loaders read so that a generated file and an
// in-memory task are the same data: arithmetic as DeepMind Mathematics question/answer lines, extractive
// QA over templated facts as SQuAD JSON, cloze (masked-word) items over any text as JSON lines.
import { gzipSync } from "node:zlib";
import { atomicWrite } from "../files.js";
import { Rng } from "../rng.js";
import { checkOptions, type OptionKeys } from "../validate.js";
import { CLOZE_TEMPLATE, checkTemplate, completionAfter, fillTemplate } from "./templates.js";

function requireInt(v: unknown, name: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in [${min}, ${max}]`;
    throw new RangeError(
      `${name}: expected an integer ${range}, got ${typeof v === "number" ? v : typeof v}`,
    );
  }
  return v;
}

function requireFraction(v: unknown, name: string): number {
  if (typeof v !== "number" || !(v >= 0 && v <= 1)) {
    throw new RangeError(`${name}: expected a number in [0, 1], got ${typeof v === "number" ? v : typeof v}`);
  }
  return v;
}

/** atomicWrite (a reader never sees half a file), gzipped for ".gz". */
function writeAtomic(path: string, text: string): void {
  atomicWrite(path, path.endsWith(".gz") ? gzipSync(Buffer.from(text, "utf8")) : text);
}

// ---------------------------------------------------------------------------------------------------
// Arithmetic

export type ArithmeticOperation = "add" | "sub" | "mul";
export const ARITHMETIC_OPERATIONS: readonly ArithmeticOperation[] = ["add", "sub", "mul"];

export interface ArithmeticOptions {
  /** Number of question/answer pairs. */
  count: number;
  seed?: number;
  /** Operations to draw from, uniformly. Default ["add", "sub"] (the paper's `arithmetic__add_or_sub`). */
  operations?: ArithmeticOperation[];
  /** Difficulty level: digits of each operand's integer part (exactly this many; 1 allows 0). Default 2. */
  digits?: number;
  /** Decimal places of each operand (Mathematics mixes in "0.3"-style numbers). Default 0. */
  decimals?: number;
  /** Allow negative operands (each is negated with probability 1/2). Default false. */
  negative?: boolean;
  /** "mathematics": the varied wordings of DeepMind Mathematics; "plain": "What is p + q?" only. */
  phrasing?: "mathematics" | "plain";
  /** No question text twice in the file (Mathematics files have none). Default true. */
  unique?: boolean;
}

const ARITHMETIC_KEYS = {
  count: true,
  seed: true,
  operations: true,
  digits: true,
  decimals: true,
  negative: true,
  phrasing: true,
  unique: true,
} satisfies OptionKeys<ArithmeticOptions>;

// Wordings in the style of DeepMind Mathematics' arithmetic modules. `value` gives the answer from p and q.
interface Wording {
  text: string;
  value: (p: bigint, q: bigint) => bigint;
}
const add = (p: bigint, q: bigint) => p + q;
const sub = (p: bigint, q: bigint) => p - q;
const mul = (p: bigint, q: bigint) => p * q;
const WORDINGS: Record<ArithmeticOperation, { mathematics: Wording[]; plain: Wording[] }> = {
  add: {
    plain: [{ text: "What is {p} + {q}?", value: add }],
    mathematics: [
      "{p} + {q}",
      "{p}+{q}",
      "Work out {p} + {q}.",
      "Add {p} and {q}.",
      "Put together {p} and {q}.",
      "Sum {p} and {q}.",
      "Total of {p} and {q}.",
      "Add together {p} and {q}.",
      "What is {p} plus {q}?",
      "Calculate {p} + {q}.",
      "What is {p} + {q}?",
    ].map((text) => ({ text, value: add })),
  },
  sub: {
    plain: [{ text: "What is {p} - {q}?", value: sub }],
    mathematics: [
      ...[
        "{p} - {q}",
        "{p}-{q}",
        "Work out {p} - {q}.",
        "What is {p} minus {q}?",
        "What is {p} take away {q}?",
        "Subtract {q} from {p}.",
        "Calculate {p} - {q}.",
        "What is {p} - {q}?",
        "What is the difference between {p} and {q}?",
      ].map((text) => ({ text, value: sub })),
      { text: "What is {p} less than {q}?", value: (p, q) => q - p },
    ],
  },
  mul: {
    plain: [{ text: "What is {p} * {q}?", value: mul }],
    mathematics: [
      "{p}*{q}",
      "{p} * {q}",
      "Calculate {p}*{q}.",
      "Work out {p} * {q}.",
      "Multiply {p} and {q}.",
      "Product of {p} and {q}.",
      "What is the product of {p} and {q}?",
      "{p} times {q}",
      "What is {p} times {q}?",
    ].map((text) => ({ text, value: mul })),
  },
};

/** A decimal number stored as an integer scaled by 10^scale, printed Mathematics-style ("-2.3", "4"). */
function formatScaled(value: bigint, scale: number): string {
  const negative = value < 0n;
  const digits = (negative ? -value : value).toString().padStart(scale + 1, "0");
  const intPart = digits.slice(0, digits.length - scale);
  const fracPart = digits.slice(digits.length - scale).replace(/0+$/u, "");
  return `${negative ? "-" : ""}${intPart}${fracPart ? `.${fracPart}` : ""}`;
}

function randomOperand(rng: Rng, digits: number, decimals: number, negative: boolean): bigint {
  let s = digits === 1 ? String(rng.int(10)) : String(1 + rng.int(9));
  for (let i = 1; i < digits + decimals; i++) s += String(rng.int(10));
  const v = BigInt(s);
  return negative && rng.uniform() < 0.5 ? -v : v;
}

function arithmeticDefaults(opts: ArithmeticOptions): Required<ArithmeticOptions> {
  if (typeof opts !== "object" || opts === null) throw new TypeError("options: expected an object");
  checkOptions(opts, "arithmetic options", ARITHMETIC_KEYS);
  const operations = opts.operations ?? ["add", "sub"];
  if (!Array.isArray(operations) || operations.length === 0) {
    throw new RangeError(`operations: expected a non-empty array of ${ARITHMETIC_OPERATIONS.join("/")}`);
  }
  for (const op of operations) {
    if (!ARITHMETIC_OPERATIONS.includes(op)) {
      throw new RangeError(`operations: unknown operation ${JSON.stringify(op)} (expected add, sub or mul)`);
    }
  }
  const phrasing = opts.phrasing ?? "mathematics";
  if (phrasing !== "mathematics" && phrasing !== "plain") {
    throw new RangeError(`phrasing: expected "mathematics" or "plain", got ${JSON.stringify(phrasing)}`);
  }
  for (const key of ["negative", "unique"] as const) {
    if (opts[key] !== undefined && typeof opts[key] !== "boolean") {
      throw new TypeError(`${key}: expected a boolean, got ${typeof opts[key]}`);
    }
  }
  return {
    count: requireInt(opts.count, "count", 0),
    seed: requireInt(opts.seed ?? 0, "seed", 0, 2 ** 32 - 1),
    operations: [...operations],
    digits: requireInt(opts.digits ?? 2, "digits", 1, 40),
    decimals: requireInt(opts.decimals ?? 0, "decimals", 0, 20),
    negative: opts.negative ?? false,
    phrasing,
    unique: opts.unique ?? true,
  };
}

/**
 * Arithmetic questions as a DeepMind Mathematics module file: question line, answer line, repeated.
 * Answers are exact (big-integer arithmetic on scaled decimals). Same options and seed, same text.
 */
export function generateArithmetic(options: ArithmeticOptions): string {
  const o = arithmeticDefaults(options);
  const rng = new Rng(o.seed);
  const seen = new Set<string>();
  const lines: string[] = [];
  // Enough tries for any count the problem space allows; tiny spaces (1 digit, one wording) end in a
  // clear error instead of a loop that never finishes.
  const maxTries = o.count * 50 + 1000;
  let tries = 0;
  while (lines.length < 2 * o.count) {
    if (++tries > maxTries) {
      throw new RangeError(
        `count: could not draw ${o.count} distinct questions at digits=${o.digits} ` +
          `(got ${seen.size}); raise digits, add operations or set unique: false`,
      );
    }
    const op = o.operations[rng.int(o.operations.length)]!;
    const wordings = WORDINGS[op][o.phrasing];
    const wording = wordings[rng.int(wordings.length)]!;
    const p = randomOperand(rng, o.digits, o.decimals, o.negative);
    const q = randomOperand(rng, o.digits, o.decimals, o.negative);
    const question = wording.text
      .replace("{p}", formatScaled(p, o.decimals))
      .replace("{q}", formatScaled(q, o.decimals));
    if (o.unique) {
      if (seen.has(question)) continue;
      seen.add(question);
    }
    const answer = formatScaled(wording.value(p, q), op === "mul" ? 2 * o.decimals : o.decimals);
    lines.push(question, answer);
  }
  return lines.length ? `${lines.join("\n")}\n` : "";
}

/** Writes `generateArithmetic(options)` to `path` (gzipped when it ends in ".gz"). */
export function writeArithmetic(path: string, options: ArithmeticOptions): { path: string; count: number } {
  writeAtomic(path, generateArithmetic(options));
  return { path, count: options.count };
}

// ---------------------------------------------------------------------------------------------------
// Extractive QA over templated facts

export interface QaFactsOptions {
  /** Number of questions. */
  count: number;
  seed?: number;
  /** People described in each paragraph (the others are distractors). Default 2. */
  peoplePerContext?: number;
  /** Questions asked about each paragraph (the last paragraph may have fewer). Default 2. */
  questionsPerContext?: number;
  /**
   * Fraction of questions about someone the paragraph does not mention: SQuAD v2 `is_impossible` with
   * no answers. 0 (default) writes a v1.1 file; anything else a v2.0 file.
   */
  unanswerableFraction?: number;
}

const QA_FACTS_KEYS = {
  count: true,
  seed: true,
  peoplePerContext: true,
  questionsPerContext: true,
  unanswerableFraction: true,
} satisfies OptionKeys<QaFactsOptions>;

const FIRST_NAMES = (
  "Ada Boris Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kiri Lena Mateo Nadia Oskar Priya " +
  "Quentin Rosa Samir Tilda Umar Vera Wendell Xenia Yusuf Zofia Anton Beatrix Cyril Delia"
).split(" ");
const SURNAMES = (
  "Abbott Brandt Castillo Dubois Eriksen Fischer Gallo Hartmann Ivanova Jensen Kowalski " +
  "Lindqvist Moreau Novak Okafor Petrov Quinn Rossi Sato Tanaka Ueda Varga Weber Xu Yilmaz " +
  "Zimmermann Alves Berg Costa Dahl"
).split(" ");
const CITIES = (
  "Lisbon Oslo Kraków Nairobi Lyon Osaka Porto Tbilisi Valparaíso Zagreb Hobart Leipzig Quito " +
  "Riga Seville Tallinn Utrecht Vilnius Windhoek Yerevan Bergen Cork Dakar Gdańsk Hanoi Izmir " +
  "Kazan Lagos Malmö Nantes"
).split(" ");
const PROFESSIONS = (
  "architect baker carpenter dentist engineer florist geologist historian illustrator " +
  "journalist librarian mechanic nurse optician pharmacist pilot surveyor translator " +
  "veterinarian watchmaker"
).split(" ");
const INSTRUMENTS =
  "cello clarinet drums flute guitar harp oboe piano saxophone trumpet ukulele violin".split(" ");

type Attribute = "birthCity" | "birthYear" | "profession" | "instrument" | "homeCity";
const ATTRIBUTES: readonly Attribute[] = ["birthCity", "birthYear", "profession", "instrument", "homeCity"];
const QUESTIONS: Record<Attribute, string[]> = {
  birthCity: ["Where was {name} born?", "In which city was {name} born?"],
  birthYear: ["In what year was {name} born?", "When was {name} born?"],
  profession: ["What does {name} do for a living?", "What is {name}'s profession?"],
  instrument: ["Which instrument does {name} play?", "What instrument does {name} play?"],
  homeCity: ["Where does {name} live now?", "In which city does {name} live today?"],
};

interface Person {
  first: string;
  last: string;
  birthCity: string;
  birthYear: string;
  profession: string;
  instrument: string;
  homeCity: string;
}

const pick = <T>(rng: Rng, items: readonly T[]): T => items[rng.int(items.length)]!;

/** Builds a paragraph and remembers where each answer was written, so answer_start is exact. */
class ContextBuilder {
  text = "";
  readonly spans = new Map<string, { text: string; start: number }>();
  add(...parts: (string | [key: string, value: string])[]): void {
    if (this.text) this.text += " ";
    for (const part of parts) {
      if (typeof part === "string") this.text += part;
      else {
        this.spans.set(part[0], { text: part[1], start: this.text.length });
        this.text += part[1];
      }
    }
  }
}

function describePerson(b: ContextBuilder, p: Person, i: number, rng: Rng): void {
  const full = `${p.first} ${p.last}`;
  const key = (a: Attribute) => [`${i}.${a}`, p[a]] as [string, string];
  if (rng.uniform() < 0.5) b.add(`${full} was born in `, key("birthCity"), " in ", key("birthYear"), ".");
  else b.add(`${full} was born in `, key("birthYear"), " in ", key("birthCity"), ".");
  const article = /^[aeiou]/u.test(p.profession) ? "an" : "a";
  const rest: (() => void)[] = [
    () =>
      rng.uniform() < 0.5
        ? b.add(`${p.first} works as ${article} `, key("profession"), ".")
        : b.add(`By profession, ${p.first} is ${article} `, key("profession"), "."),
    () =>
      rng.uniform() < 0.5
        ? b.add(`${p.first} plays the `, key("instrument"), ".")
        : b.add(`In the evenings, ${p.first} plays the `, key("instrument"), "."),
    () => b.add(`${p.first} now lives in `, key("homeCity"), "."),
  ];
  for (const say of rng.shuffle(rest)) say();
}

function qaFactsDefaults(opts: QaFactsOptions): Required<QaFactsOptions> {
  if (typeof opts !== "object" || opts === null) throw new TypeError("options: expected an object");
  checkOptions(opts, "qa-facts options", QA_FACTS_KEYS);
  return {
    count: requireInt(opts.count, "count", 0),
    seed: requireInt(opts.seed ?? 0, "seed", 0, 2 ** 32 - 1),
    peoplePerContext: requireInt(opts.peoplePerContext ?? 2, "peoplePerContext", 1, 10),
    // Each person has five facts; more questions than facts would repeat a question.
    questionsPerContext: requireInt(
      opts.questionsPerContext ?? 2,
      "questionsPerContext",
      1,
      ATTRIBUTES.length * (opts.peoplePerContext ?? 2),
    ),
    unanswerableFraction: requireFraction(opts.unanswerableFraction ?? 0, "unanswerableFraction"),
  };
}

/**
 * Extractive QA in SQuAD's official JSON format: each paragraph states facts about a few invented
 * people (birthplace, birth year, profession, instrument, home city), each question asks one of them,
 * and `answer_start` is the exact character offset of the answer in the paragraph. Unanswerable
 * questions (optional) ask about someone absent from the paragraph.
 */
export function generateQaFacts(options: QaFactsOptions): string {
  const o = qaFactsDefaults(options);
  const rng = new Rng(o.seed);
  const data: unknown[] = [];
  let asked = 0;
  for (let paragraph = 0; asked < o.count; paragraph++) {
    // Distinct first and last names inside a paragraph, so a first name refers to one person.
    const firsts = rng.shuffle([...FIRST_NAMES]).slice(0, o.peoplePerContext);
    const lasts = rng.shuffle([...SURNAMES]).slice(0, o.peoplePerContext);
    const people: Person[] = firsts.map((first, i) => {
      const birthCity = pick(rng, CITIES);
      let homeCity = pick(rng, CITIES);
      while (homeCity === birthCity) homeCity = pick(rng, CITIES);
      return {
        first,
        last: lasts[i]!,
        birthCity,
        birthYear: String(1900 + rng.int(110)),
        profession: pick(rng, PROFESSIONS),
        instrument: pick(rng, INSTRUMENTS),
        homeCity,
      };
    });
    const b = new ContextBuilder();
    people.forEach((p, i) => {
      describePerson(b, p, i, rng);
    });
    const pairs = people.flatMap((_, i) => ATTRIBUTES.map((a) => [i, a] as const));
    rng.shuffle(pairs);
    const qas: unknown[] = [];
    const n = Math.min(o.questionsPerContext, o.count - asked);
    for (let k = 0; k < n; k++) {
      const id = `qa-facts-${o.seed}-${asked + k}`;
      const attribute = pairs[k]![1];
      const wording = pick(rng, QUESTIONS[attribute]);
      if (o.unanswerableFraction > 0 && rng.uniform() < o.unanswerableFraction) {
        let first = pick(rng, FIRST_NAMES);
        let last = pick(rng, SURNAMES);
        while (people.some((p) => p.first === first && p.last === last)) {
          first = pick(rng, FIRST_NAMES);
          last = pick(rng, SURNAMES);
        }
        qas.push({
          id,
          question: wording.replace("{name}", `${first} ${last}`),
          answers: [],
          is_impossible: true,
        });
        continue;
      }
      const i = pairs[k]![0];
      const span = b.spans.get(`${i}.${attribute}`)!;
      const question = wording.replace("{name}", `${people[i]!.first} ${people[i]!.last}`);
      const answers = [{ text: span.text, answer_start: span.start }];
      qas.push(
        o.unanswerableFraction > 0
          ? { id, question, answers, is_impossible: false }
          : { id, question, answers },
      );
    }
    asked += n;
    data.push({ title: `qa-facts-${o.seed}-${paragraph}`, paragraphs: [{ context: b.text, qas }] });
  }
  return `${JSON.stringify({ version: o.unanswerableFraction > 0 ? "v2.0" : "1.1", data })}\n`;
}

/** Writes `generateQaFacts(options)` to `path` (gzipped when it ends in ".gz"). */
export function writeQaFacts(path: string, options: QaFactsOptions): { path: string; count: number } {
  writeAtomic(path, generateQaFacts(options));
  return { path, count: options.count };
}

// ---------------------------------------------------------------------------------------------------
// Cloze

export interface ClozeOptions {
  /** The source text, any prose. */
  text: string;
  /** Items to write; default: one per eligible sentence. */
  count?: number;
  seed?: number;
  /** Sentences with fewer words are skipped. Default 6. */
  minWords?: number;
  /** Sentences with more words are skipped (text without sentence punctuation). Default 80. */
  maxWords?: number;
  /** Only words at least this long are masked. Default 4. */
  minWordLength?: number;
  /** What replaces the masked word. Default "____". */
  mask?: string;
  /** Prompt template over {context} (the masked sentence) and {mask}. Default CLOZE_TEMPLATE. */
  template?: string;
}

const CLOZE_KEYS = {
  text: true,
  count: true,
  seed: true,
  minWords: true,
  maxWords: true,
  minWordLength: true,
  mask: true,
  template: true,
} satisfies OptionKeys<ClozeOptions>;

/** One line of a cloze JSONL file; `prompt`/`completion` make it readable as a generic JSONL task. */
export interface ClozeRecord {
  prompt: string;
  completion: string;
  context: string;
  answer: string;
}

// Function words long enough to pass minWordLength: masking them tests grammar, not content.
const STOPWORDS = new Set(
  (
    "that this with from have were they their there which would could should about into than then them " +
    "these those what when where will been being also only such some very your more most other each over " +
    "just shall upon does here after before while because through"
  ).split(" "),
);

function clozeDefaults(opts: ClozeOptions): Required<Omit<ClozeOptions, "count">> & { count?: number } {
  if (typeof opts !== "object" || opts === null) throw new TypeError("options: expected an object");
  checkOptions(opts, "cloze options", CLOZE_KEYS);
  if (typeof opts.text !== "string") throw new TypeError(`text: expected a string, got ${typeof opts.text}`);
  const template = opts.template ?? CLOZE_TEMPLATE;
  checkTemplate(template, ["context", "mask"], "cloze");
  const mask = opts.mask ?? "____";
  if (typeof mask !== "string" || mask.length === 0) throw new TypeError("mask: expected a non-empty string");
  const minWords = requireInt(opts.minWords ?? 6, "minWords", 1);
  return {
    text: opts.text,
    count: opts.count === undefined ? undefined : requireInt(opts.count, "count", 0),
    seed: requireInt(opts.seed ?? 0, "seed", 0, 2 ** 32 - 1),
    minWords,
    maxWords: requireInt(opts.maxWords ?? 80, "maxWords", minWords),
    minWordLength: requireInt(opts.minWordLength ?? 4, "minWordLength", 1),
    mask,
    template,
  };
}

/** Sentences of prose: blank lines and ., ! or ? followed by whitespace end a sentence; line wraps do not. */
export function splitSentences(text: string): string[] {
  return text
    .split(/\n\s*\n/u)
    .flatMap((para) =>
      para
        .replace(/\s+/gu, " ")
        .trim()
        .split(/(?<=[.!?]["'”’)]?)\s+/u),
    )
    .filter((s) => s.length > 0);
}

/**
 * Cloze items: from each chosen sentence one content word (letters, at least minWordLength long, not a
 * function word) is replaced by the mask. Sentences are chosen in a seeded random order.
 */
export function generateClozeRecords(options: ClozeOptions): ClozeRecord[] {
  const o = clozeDefaults(options);
  const rng = new Rng(o.seed);
  const eligible: { sentence: string; words: RegExpExecArray[] }[] = [];
  // A sentence the text repeats is one item (its copies would put a validation answer, unmasked, in the
  // training prompts), and only a word the sentence holds once is masked (another occurrence would show
  // the answer in the prompt).
  const seen = new Set<string>();
  for (const sentence of splitSentences(o.text)) {
    if (seen.has(sentence)) continue;
    seen.add(sentence);
    const wordCount = sentence.split(" ").length;
    if (wordCount < o.minWords || wordCount > o.maxWords) continue;
    const all = [...sentence.matchAll(/\p{L}+(?:['’]\p{L}+)*/gu)];
    const times = new Map<string, number>();
    for (const m of all) times.set(m[0].toLowerCase(), (times.get(m[0].toLowerCase()) ?? 0) + 1);
    const words = all.filter(
      (m) =>
        [...m[0]].length >= o.minWordLength &&
        !STOPWORDS.has(m[0].toLowerCase()) &&
        times.get(m[0].toLowerCase()) === 1,
    );
    if (words.length > 0) eligible.push({ sentence, words });
  }
  const count = o.count ?? eligible.length;
  if (count > eligible.length) {
    throw new RangeError(
      `count: asked for ${count} cloze items, the text has ${eligible.length} eligible sentences ` +
        `(${o.minWords}-${o.maxWords} words with a maskable word)`,
    );
  }
  rng.shuffle(eligible);
  return eligible.slice(0, count).map(({ sentence, words }) => {
    const w = words[rng.int(words.length)]!;
    const context = sentence.slice(0, w.index) + o.mask + sentence.slice(w.index + w[0].length);
    const prompt = fillTemplate(o.template, { context, mask: o.mask });
    return { prompt, completion: completionAfter(prompt, w[0]), context, answer: w[0] };
  });
}

/** Cloze items as JSON lines (see `generateClozeRecords`). */
export function generateCloze(options: ClozeOptions): string {
  return generateClozeRecords(options)
    .map((r) => `${JSON.stringify(r)}\n`)
    .join("");
}

/** Writes `generateCloze(options)` to `path` (gzipped when it ends in ".gz"). */
export function writeCloze(path: string, options: ClozeOptions): { path: string; count: number } {
  const records = generateClozeRecords(options);
  writeAtomic(path, records.map((r) => `${JSON.stringify(r)}\n`).join(""));
  return { path, count: records.length };
}
