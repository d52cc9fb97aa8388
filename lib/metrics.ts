// Evaluation metrics on generated answers: SQuAD exact match and token F1, and arithmetic accuracy.
//
// The SQuAD functions reproduce the official evaluation script for SQuAD v2.0 (`evaluate-v2.0.py`),
// which differs from the v1.1 script only for empty answers: when the gold or the prediction has no
// tokens, F1 is 1 if both are empty and 0 otherwise (v1.1 gave 0 for both empty), and gold answers that
// normalise to nothing are dropped unless all of them do (an unanswerable question's gold is then "").
//
// Every score here is a fraction in [0, 1], never a percentage: the official script prints
// 100 × these numbers.

/**
 * Python's `string.punctuation`: ASCII only. The official script removes exactly these characters, so
 * typographic quotes, dashes and other Unicode punctuation survive normalisation ("“Paris”" does not
 * exactly match "Paris"); we keep that behaviour to report numbers comparable with published ones.
 */
const PUNCTUATION = new Set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~");

/**
 * `re.sub(r'\b(a|an|the)\b', ' ', text)` under Python 3, where `\b` is Unicode-aware: a word character
 * is any letter or number (`\p{L}`, `\p{N}`) or "_". JavaScript's `\b` only knows ASCII word characters
 * and would remove "the" from "éthe", which Python keeps.
 */
const ARTICLES = /(?<![\p{L}\p{N}_])(?:a|an|the)(?![\p{L}\p{N}_])/gu;

/** The characters Python's `str.split()` splits on (Unicode whitespace; JavaScript's `\s` differs). */
// biome-ignore lint/suspicious/noControlCharactersInRegex: \x1c-\x1f are whitespace to Python's str.split().
const PY_WHITESPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u;

function pySplit(text: string): string[] {
  return text.split(PY_WHITESPACE).filter((t) => t.length > 0);
}

/**
 * SQuAD's official answer normalisation: lower-case, remove ASCII punctuation, remove the articles
 * "a", "an", "the" as whole words, collapse whitespace. Order matters and follows the script:
 * punctuation goes before articles, so "the-end" becomes "theend" and keeps its article.
 */
export function normalizeAnswer(text: string): string {
  if (typeof text !== "string") throw new TypeError(`text: expected a string, got ${typeof text}`);
  let s = text.toLowerCase();
  let out = "";
  for (const ch of s) if (!PUNCTUATION.has(ch)) out += ch;
  s = out.replace(ARTICLES, " ");
  return pySplit(s).join(" ");
}

function answerTokens(text: string): string[] {
  return text.length === 0 ? [] : pySplit(normalizeAnswer(text));
}

/** The gold answers the v2 script scores against: those that normalise to something, else [""]. */
function scoringGolds(golds: string | readonly string[]): string[] {
  const list = typeof golds === "string" ? [golds] : golds;
  if (!Array.isArray(list)) throw new TypeError("golds: expected a string or an array of strings");
  for (const [i, g] of list.entries()) {
    if (typeof g !== "string") throw new TypeError(`golds[${i}]: expected a string, got ${typeof g}`);
  }
  const kept = list.filter((g) => normalizeAnswer(g).length > 0);
  return kept.length > 0 ? kept : [""];
}

/** 1 when the normalised prediction equals some normalised gold answer, else 0. */
export function exactMatch(prediction: string, golds: string | readonly string[]): number {
  const p = normalizeAnswer(prediction);
  return scoringGolds(golds).some((g) => normalizeAnswer(g) === p) ? 1 : 0;
}

function tokenF1(predictionTokens: string[], goldTokens: string[]): number {
  if (predictionTokens.length === 0 || goldTokens.length === 0) {
    return predictionTokens.length === goldTokens.length ? 1 : 0;
  }
  // Counter(prediction) & Counter(gold): the multiset intersection.
  const goldCounts = new Map<string, number>();
  for (const t of goldTokens) goldCounts.set(t, (goldCounts.get(t) ?? 0) + 1);
  let same = 0;
  for (const t of predictionTokens) {
    const left = goldCounts.get(t) ?? 0;
    if (left > 0) {
      same++;
      goldCounts.set(t, left - 1);
    }
  }
  if (same === 0) return 0;
  const precision = same / predictionTokens.length;
  const recall = same / goldTokens.length;
  return (2 * precision * recall) / (precision + recall);
}

/** Token-level F1 between the normalised prediction and each gold answer; the maximum over golds. */
export function f1Score(prediction: string, golds: string | readonly string[]): number {
  const p = answerTokens(prediction);
  let best = 0;
  for (const g of scoringGolds(golds)) best = Math.max(best, tokenF1(p, answerTokens(g)));
  return best;
}

/** An exact rational number: numerator / denominator with denominator > 0. */
export interface Rational {
  numerator: bigint;
  denominator: bigint;
}

// Optional sign (ASCII hyphen-minus or U+2212), then an integer with optional thousands groups or a
// decimal, then optionally "/" and a second integer or decimal: the forms DeepMind Mathematics answers
// take ("-7", "0.3", "-2/7") plus "1,234" and ".5", which models sometimes write.
const NUMBER =
  /([-\u2212]?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)(?:\/([-\u2212]?)(\d+(?:\.\d+)?))?/u;

function decimalToRational(text: string): Rational {
  const plain = text.replace(/,/g, "");
  const dot = plain.indexOf(".");
  if (dot < 0) return { numerator: BigInt(plain), denominator: 1n };
  const fraction = plain.slice(dot + 1);
  return {
    numerator: BigInt(plain.slice(0, dot) + fraction),
    denominator: 10n ** BigInt(fraction.length),
  };
}

/**
 * The first number in `text` as an exact rational, or null when there is none (or it divides by zero).
 * "The answer is -2/7." gives -2/7; "0.50" gives 1/2 after comparison (not reduced here).
 */
export function parseFirstNumber(text: string): Rational | null {
  if (typeof text !== "string") throw new TypeError(`text: expected a string, got ${typeof text}`);
  const m = NUMBER.exec(text);
  if (!m) return null;
  const value = decimalToRational(m[2]!);
  if (m[1]) value.numerator = -value.numerator;
  if (m[4] !== undefined) {
    const divisor = decimalToRational(m[4]);
    if (m[3]) divisor.numerator = -divisor.numerator;
    if (divisor.numerator === 0n) return null;
    value.numerator *= divisor.denominator;
    value.denominator *= divisor.numerator;
    if (value.denominator < 0n) {
      value.numerator = -value.numerator;
      value.denominator = -value.denominator;
    }
  }
  return value;
}

/** A gold answer that is one number and nothing else (a trailing full stop allowed). */
const WHOLE_NUMBER = new RegExp(`^\\s*(?:${NUMBER.source})\\s*\\.?\\s*$`, "u");

/** Whitespace removed, case-folded, trailing full stops and commas dropped: "3 * t**2." -> "3*t**2". */
function compactAnswer(text: string): string {
  return text
    .replace(/\s+/gu, "")
    .toLowerCase()
    .replace(/[.,;]+$/u, "");
}

/**
 * Whether the first number in a generated answer equals the gold answer, compared exactly as rationals
 * ("0.30" = "0.3", "-4/2" = "-2"; no floating-point rounding), where the gold is a number. A gold that holds
 * digits but is not one number (a polynomial "3*t**2", a time "3:45 PM", a list "-2, 5") must equal the
 * prediction's first as many whitespace-separated pieces (case and a final full stop aside); a gold without digits (e.g. "True" in other Mathematics modules) is
 * compared as the first whitespace-separated word, case-folded and stripped of trailing punctuation.
 */
export function arithmeticCorrect(prediction: string, gold: string | number): boolean {
  if (typeof prediction !== "string") {
    throw new TypeError(`prediction: expected a string, got ${typeof prediction}`);
  }
  const goldText = typeof gold === "number" ? String(gold) : gold;
  if (typeof goldText !== "string")
    throw new TypeError(`gold: expected a string or number, got ${typeof gold}`);
  // A number only where the whole gold is one: "3*t**2", "3:45 PM" or "-2, 5" compare as text, not by
  // their first number (which would accept "3*t**3").
  const g = WHOLE_NUMBER.test(goldText) ? parseFirstNumber(goldText) : null;
  if (g === null && /\d/u.test(goldText)) {
    // As many whitespace-separated pieces of the prediction as the gold has: "3*t**2 is the answer" counts
    // for "3*t**2", "3*t**2+1" does not.
    const pieces = goldText.trim().split(/\s+/u).length;
    const head = prediction.trim().split(/\s+/u).slice(0, pieces).join(" ");
    return compactAnswer(head) === compactAnswer(goldText);
  }
  if (g === null) {
    const word = (s: string) => (s.trim().split(/\s+/u)[0] ?? "").toLowerCase().replace(/[.,;:!?]+$/u, "");
    return word(goldText) !== "" && word(prediction) === word(goldText);
  }
  const p = parseFirstNumber(prediction);
  return p !== null && p.numerator * g.denominator === g.numerator * p.denominator;
}

/** The part of a generated continuation that counts as the answer: up to the first line break, trimmed. */
export function answerText(generated: string): string {
  const nl = generated.search(/[\r\n]/u);
  return (nl < 0 ? generated : generated.slice(0, nl)).trim();
}

export interface QaScores {
  /** Mean exact match, a fraction in [0, 1]. */
  exactMatch: number;
  /** Mean token F1, a fraction in [0, 1]. */
  f1: number;
  count: number;
}

function requireSameLength(a: readonly unknown[], b: readonly unknown[], names: [string, string]): void {
  if (!Array.isArray(a)) throw new TypeError(`${names[0]}: expected an array`);
  if (!Array.isArray(b)) throw new TypeError(`${names[1]}: expected an array`);
  if (a.length !== b.length) {
    throw new RangeError(`${names[0]} and ${names[1]}: lengths differ (${a.length} vs ${b.length})`);
  }
}

/** Mean exact match and F1 over a set of predictions (fractions in [0, 1]; 0 for an empty set). */
export function qaScores(
  predictions: readonly string[],
  golds: readonly (string | readonly string[])[],
): QaScores {
  requireSameLength(predictions, golds, ["predictions", "golds"]);
  let em = 0;
  let f1 = 0;
  for (let i = 0; i < predictions.length; i++) {
    em += exactMatch(predictions[i]!, golds[i]!);
    f1 += f1Score(predictions[i]!, golds[i]!);
  }
  const n = predictions.length;
  return { exactMatch: n ? em / n : 0, f1: n ? f1 / n : 0, count: n };
}

export interface AccuracyScores {
  /** Fraction of correct answers in [0, 1]. */
  accuracy: number;
  count: number;
}

/** Fraction of predictions whose first number equals the gold answer (0 for an empty set). */
export function arithmeticAccuracy(
  predictions: readonly string[],
  golds: readonly (string | number)[],
): AccuracyScores {
  requireSameLength(predictions, golds, ["predictions", "golds"]);
  let correct = 0;
  for (let i = 0; i < predictions.length; i++) if (arithmeticCorrect(predictions[i]!, golds[i]!)) correct++;
  const n = predictions.length;
  return { accuracy: n ? correct / n : 0, count: n };
}

/** The scores of a task's metric; fields present depend on the metric (all fractions in [0, 1]). */
export interface TaskScores {
  count: number;
  exactMatch?: number;
  f1?: number;
  accuracy?: number;
}

/**
 * Scores generated continuations against examples, by the task's metric. Each continuation is cut to
 * its first line (`answerText`) unless `wholeText` is set: a greedy decoder that does not stop at EOS
 * goes on with "\nQuestion: ..." after the answer. Gold answers are `example.answers`, else the
 * completion without its leading space. For metric "none" only the count is returned.
 */
export function scoreTask(
  metric: "qa" | "accuracy" | "none",
  examples: readonly { completion: string; answers?: string[] }[],
  generations: readonly string[],
  options: { wholeText?: boolean } = {},
): TaskScores {
  requireSameLength(examples, generations, ["examples", "generations"]);
  const predictions = options.wholeText ? [...generations] : generations.map(answerText);
  const golds = examples.map((ex) => ex.answers ?? [ex.completion.trim()]);
  switch (metric) {
    case "qa": {
      const s = qaScores(predictions, golds);
      return { count: s.count, exactMatch: s.exactMatch, f1: s.f1 };
    }
    case "accuracy": {
      const s = arithmeticAccuracy(
        predictions,
        golds.map((g) => g[0] ?? ""),
      );
      return { count: s.count, accuracy: s.accuracy };
    }
    case "none":
      return { count: examples.length };
    default:
      throw new RangeError(`metric: expected "qa", "accuracy" or "none", got ${String(metric)}`);
  }
}
