import { describe, expect, it } from "vitest";
import {
  answerText,
  arithmeticAccuracy,
  arithmeticCorrect,
  exactMatch,
  f1Score,
  normalizeAnswer,
  parseFirstNumber,
  qaScores,
  scoreTask,
} from "../lib/metrics.js";

// Expected values are those of the official SQuAD v2.0 evaluation script (normalize_answer,
// compute_exact, compute_f1, max over the golds that normalise to something), worked out by hand and
// checked against the script under Python 3.11.
describe("normalizeAnswer (SQuAD official)", () => {
  it.each([
    ["The Theater", "theater"], // article removed, but not the "the" inside "theater"
    ["theater", "theater"],
    ["An apple and THE pear", "apple and pear"],
    ["a", ""],
    ["...!?", ""], // punctuation only
    ["  Hello,\u00a0  World  ", "hello world"], // NBSP is whitespace to Python's split()
    ["Mr. Smith's car", "mr smiths car"],
    ["the-end", "theend"], // punctuation goes first, so the article is glued on and stays
    ["a_the b", "athe b"], // "_" is ASCII punctuation
    ["the2", "the2"], // digits are word characters
    ["x\u2003the\u3000y", "x y"], // Unicode spaces around an article
    ["\x1cthe\x1d", ""], // \x1c-\x1f are whitespace to Python's split()
    ["\ufeffthe", "\ufeff"], // BOM: neither whitespace nor a word character
  ])("%j -> %j", (input, expected) => {
    expect(normalizeAnswer(input)).toBe(expected);
  });

  it("is Unicode-aware like Python 3's re: letters and numbers are word characters", () => {
    expect(normalizeAnswer("éthe a")).toBe("éthe"); // JavaScript's ASCII \b would remove this "the"
    expect(normalizeAnswer("²the")).toBe("²the");
    expect(normalizeAnswer("the\u0301")).toBe("\u0301"); // a combining mark is not a word character
    expect(normalizeAnswer("ÉCOLE Normale")).toBe("école normale");
    expect(normalizeAnswer("ǅthe")).toBe("ǆthe"); // title-case letter
  });

  it("removes ASCII punctuation only, as string.punctuation does", () => {
    expect(normalizeAnswer("“Paris”")).toBe("“paris”");
    expect(normalizeAnswer("Paris — France")).toBe("paris — france");
  });

  it("names a wrong argument", () => {
    expect(() => normalizeAnswer(3 as unknown as string)).toThrow(/text: expected a string/);
  });
});

describe("exactMatch and f1Score", () => {
  it.each([
    ["the cat sat", ["a cat sat on the mat"], 0, 2 / 3], // p = 2/2, r = 2/4 (articles gone)
    ["cat cat", ["cat"], 0, 2 / 3], // Counter semantics: "cat" counts once in common
    ["a b a b", ["b a b b"], 0, 0.8], // tokens "b b" vs "b b b": common 2, p 1, r 2/3
    ["Paris", ["paris!", "Paris, France"], 1, 1], // max over golds
    ["New York City", ["new york", "NYC"], 0, 0.8],
    ["in the 2nd century", ["in the 2nd century", "the 2nd century"], 1, 1],
    ["2nd century AD", ["the 2nd century"], 0, 0.8],
    ["the", ["a"], 1, 1], // both normalise to empty
    ["x", ["a", "x y"], 0, 2 / 3], // "a" normalises to nothing and is dropped from the golds
  ] as const)("%j vs %j", (prediction, golds, em, f1) => {
    expect(exactMatch(prediction, golds)).toBe(em);
    expect(f1Score(prediction, golds)).toBeCloseTo(f1, 12);
  });

  it("empty strings follow the v2 script: both empty 1, one empty 0", () => {
    expect([exactMatch("", [""]), f1Score("", [""])]).toEqual([1, 1]);
    expect([exactMatch("", ["the"]), f1Score("", ["the"])]).toEqual([1, 1]);
    expect([exactMatch("x", [""]), f1Score("x", [""])]).toEqual([0, 0]);
    expect([exactMatch("", ["x"]), f1Score("", ["x"])]).toEqual([0, 0]);
    // An answerable question's empty gold is dropped: "" does not match ["", "x"].
    expect([exactMatch("", ["", "x"]), f1Score("", ["", "x"])]).toEqual([0, 0]);
    // No golds at all is an unanswerable question.
    expect([exactMatch("", []), f1Score("nothing", [])]).toEqual([1, 0]);
  });

  it("accepts a single gold string", () => {
    expect(exactMatch("The Eiffel Tower", "eiffel tower")).toBe(1);
    expect(f1Score("Eiffel", "eiffel tower")).toBeCloseTo(2 / 3, 12);
  });

  it("names wrong arguments", () => {
    expect(() => exactMatch("x", [1 as unknown as string])).toThrow(/golds\[0\]: expected a string/);
  });
});

describe("arithmetic accuracy", () => {
  it("parses the first number: integers, decimals, fractions, signs", () => {
    const value = (s: string) => {
      const r = parseFirstNumber(s);
      return r && Number(r.numerator) / Number(r.denominator);
    };
    expect(value(" -7")).toBe(-7);
    expect(value("The answer is 0.25, I think 3")).toBe(0.25);
    expect(value("-2/7")).toBeCloseTo(-2 / 7, 15);
    expect(value("3/-4")).toBe(-0.75);
    expect(value("\u22125")).toBe(-5); // Unicode minus sign
    expect(value("1,234 apples")).toBe(1234);
    expect(value("1,2345")).toBe(1); // not a thousands group
    expect(value(".5")).toBe(0.5);
    expect(value("12.")).toBe(12); // a full stop, not a decimal point
    expect(value("x-3")).toBe(-3);
    expect(value("no digits")).toBeNull();
    expect(value("1/0")).toBeNull();
  });

  it.each([
    [" -2.3", "-2.3", true],
    [" -2.30\nQuestion: What is 1 + 1?", "-2.3", true],
    ["11", "11.0", true],
    ["-4/2", "-2", true],
    ["1/3", "0.333", false], // exact comparison, no rounding
    ["0.1", "0.1", true], // compared as rationals, not 0.1 + 0.2-style floats
    ["7", "-7", false],
    ["seventeen", "17", false],
    ["", "3", false],
    [" True.", "True", true], // non-numeric gold: first word, case-folded
    ["False", "True", false],
    // Golds with digits that are not one number match as a whole (the first number alone accepted these):
    ["3*t**3", "3*t**2", false],
    [" 3*t**2.", "3*t**2", true], // case, surrounding space and a final full stop aside
    ["3:15 PM", "3:45 PM", false],
    ["-2", "-2, 5", false],
    ["-2, 5", "-2, 5", true],
    ["3*t**2 is the answer", "3*t**2", true], // the gold's pieces first, then other words
    ["3*t**2+1", "3*t**2", false],
  ] as const)("%j vs gold %j -> %s", (prediction, gold, correct) => {
    expect(arithmeticCorrect(prediction, gold)).toBe(correct);
  });

  it("takes numeric golds", () => {
    expect(arithmeticCorrect("42", 42)).toBe(true);
    expect(arithmeticCorrect("0.5", 0.5)).toBe(true);
  });
});

describe("aggregates (fractions in [0, 1])", () => {
  it("qaScores averages EM and F1", () => {
    const s = qaScores(["Paris", "cat cat", ""], [["paris"], ["cat"], ["x"]]);
    expect(s.count).toBe(3);
    expect(s.exactMatch).toBeCloseTo(1 / 3, 12);
    expect(s.f1).toBeCloseTo((1 + 2 / 3 + 0) / 3, 12);
    expect(qaScores([], [])).toEqual({ exactMatch: 0, f1: 0, count: 0 });
    expect(() => qaScores(["a"], [])).toThrow(/lengths differ \(1 vs 0\)/);
  });

  it("arithmeticAccuracy counts correct first numbers", () => {
    expect(arithmeticAccuracy(["3", "x", "-1"], ["3", "4", "-1.0"])).toEqual({ accuracy: 2 / 3, count: 3 });
  });

  it("scoreTask cuts generations at the first line break and uses the task's metric", () => {
    const qa = [
      { completion: " Paris", answers: ["Paris", "Paris, France"] },
      { completion: " Rome" }, // no answers: the completion without its space
    ];
    const generations = [" Paris\nQuestion: Where is Rome?", " Milan"];
    expect(scoreTask("qa", qa, generations)).toEqual({ count: 2, exactMatch: 0.5, f1: 0.5 });
    expect(scoreTask("qa", qa, generations, { wholeText: true }).exactMatch).toBe(0);
    const math = [{ completion: " -7", answers: ["-7"] }, { completion: " 2" }];
    expect(scoreTask("accuracy", math, [" -7\n", "3"])).toEqual({ count: 2, accuracy: 0.5 });
    expect(scoreTask("none", math, ["", ""])).toEqual({ count: 2 });
    expect(answerText("  42 \r\nmore")).toBe("42");
  });
});
