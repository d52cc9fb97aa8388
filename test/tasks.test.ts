import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gunzipSync, gzipSync } from "node:zlib";
import { Command } from "commander";
import { afterAll, describe, expect, it } from "vitest";
import { registerDataCommands } from "../lib/cli-data.js";
import { impliesLeadingSpace } from "../lib/data/encoding.js";
import { readSource, readSourceLines } from "../lib/data/loaders.js";
import { readTexts } from "../lib/priors.js";
import {
  CLOZE_TEMPLATE,
  encodeExample,
  fillTemplate,
  generateArithmetic,
  generateCloze,
  generateQaFacts,
  IGNORE_INDEX,
  loadRecordedTask,
  loadTask,
  MATH_TEMPLATE,
  parseMathematics,
  parseSquad,
  parseTaskSpec,
  SQUAD_TEMPLATE,
  specForRunDirs,
  splitSentences,
  writeArithmetic,
  writeCloze,
  writeQaFacts,
} from "../lib/tasks.js";
import { loadTokenizer, type Tokenizer } from "../lib/tokenizer.js";
import { fixtures, modelDir } from "./helpers.js";

const data = (name: string) => join(fixtures, "data", name);
const tmp = mkdtempSync(join(tmpdir(), "priortune-tasks-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("templates", () => {
  it("fills placeholders, with {{ }} as literal braces", () => {
    expect(fillTemplate(SQUAD_TEMPLATE, { context: "C.", question: "Q?" })).toBe("C.\nQuestion: Q?\nAnswer:");
    expect(fillTemplate(MATH_TEMPLATE, { question: "1+1" })).toBe("Question: 1+1\nAnswer:");
    expect(fillTemplate("{{x}} {x}", { x: "y" })).toBe("{x} y");
  });

  it("names bad templates and missing fields", () => {
    expect(() => fillTemplate("{x", { x: "y" })).toThrow(/template: bad placeholder at offset 0/);
    expect(() => fillTemplate("x}", {})).toThrow(/unmatched "}"/);
    expect(() => fillTemplate("{y}", { x: "1" })).toThrow(/no string value for placeholder \{y\}/);
  });
});

describe("SQuAD loader", () => {
  it("reads v1.1 with the paper's template and every gold answer", async () => {
    const task = await loadTask({
      kind: "squad",
      path: data("squad-v1.1.json"),
      trainCount: 2,
      validationCount: 2,
      shuffle: false,
      split: "train-first",
    });
    expect(task.metric).toBe("qa");
    expect(task.name).toBe("squad:squad-v1.1.json");
    expect(task.train[0]).toEqual({
      id: "lh-1",
      prompt:
        "The Tower of Hercules is a Roman lighthouse near A Coruña, in Spain. It was built in the 2nd " +
        "century and is still in use.\nQuestion: In which country is the Tower of Hercules?\nAnswer:",
      completion: " Spain",
      answers: ["Spain", "Spain", "in Spain"],
    });
    expect(task.validation.map((e) => e.id)).toEqual(["rv-1", "rv-2"]);
    expect(task.validation[0]!.completion).toBe(" the Black Sea");
  });

  it("stores offsets that point at the answers", () => {
    const records = parseSquad(readFileSync(data("squad-v1.1.json"), "utf8"));
    for (const r of records) {
      r.answers.forEach((a, i) => {
        expect(r.context.slice(r.answerStarts[i], r.answerStarts[i]! + a.length)).toBe(a);
      });
    }
  });

  it("v2: skips unanswerable questions by default, keeps them with an empty answer on request", async () => {
    const spec = { kind: "squad", path: data("squad-v2.0.json"), shuffle: false } as const;
    const skipped = await loadTask({ ...spec, trainCount: 5, validationCount: 0 });
    expect(skipped.train.map((e) => e.id)).toEqual(["ob-1", "ob-3"]);
    expect(skipped.train[1]!.answers).toEqual(["2,635 metres"]);
    const kept = await loadTask({ ...spec, unanswerable: "keep", trainCount: 5, validationCount: 0 });
    expect(kept.train.map((e) => e.id)).toEqual(["ob-1", "ob-2", "ob-3"]);
    expect(kept.train[1]).toMatchObject({ completion: "", answers: [""] });
  });

  it("takes a separate validation file and custom templates", async () => {
    const task = await loadTask({
      kind: "squad",
      path: data("squad-v1.1.json"),
      validationPath: data("squad-v2.0.json"),
      template: "{title}: {context}\nQ: {question}\nA: ",
      trainCount: 4,
      validationCount: 2,
      seed: 1,
    });
    expect(task.train).toHaveLength(4);
    expect(task.validation.map((e) => e.id).sort()).toEqual(["ob-1", "ob-3"]);
    // The template ends in a space, so the completion does not start with one.
    const ob1 = task.validation.find((e) => e.id === "ob-1")!;
    expect(ob1.prompt.startsWith("Observatories: The Paranal")).toBe(true);
    expect(ob1.completion).toBe("the Atacama Desert");
  });

  it("names malformed files", () => {
    expect(() => parseSquad('{"data": [{"paragraphs": [{"qas": []}]}]}', "f.json")).toThrow(
      "f.json: data[0].paragraphs[0].context: expected a string, got undefined",
    );
    expect(() => parseSquad("[]", "f.json")).toThrow(/f\.json: data: expected an array of articles/);
  });
});

describe("Mathematics loader", () => {
  it("reads question/answer line pairs with the paper's template", async () => {
    const task = await loadTask({
      kind: "mathematics",
      path: data("arithmetic__add_or_sub.txt"),
      trainCount: 6,
      validationCount: 2,
      shuffle: false,
      split: "train-first",
    });
    expect(task.metric).toBe("accuracy");
    expect(task.train[0]).toEqual({
      prompt: "Question: Work out -0.3 + -2.\nAnswer:",
      completion: " -2.3",
      answers: ["-2.3"],
    });
    expect(task.validation.map((e) => e.answers![0])).toEqual(["0.25", "1325"]);
  });

  it("samples at random by seed, disjoint train and validation, and caps counts at what the file has", async () => {
    const spec = { kind: "mathematics", path: data("arithmetic__add_or_sub.txt"), trainCount: 5 } as const;
    const a = await loadTask({ ...spec, seed: 7 });
    const b = await loadTask({ ...spec, seed: 7 });
    const c = await loadTask({ ...spec, seed: 8 });
    expect(a.train).toEqual(b.train);
    expect(a.train).not.toEqual(c.train);
    expect(a.validation).toHaveLength(3); // 8 pairs in the file: 5 train, the other 3 validation
    const prompts = [...a.train, ...a.validation].map((e) => e.prompt);
    expect(new Set(prompts).size).toBe(8);
  });

  it("names an odd number of lines", () => {
    expect(() => parseMathematics("1 + 1\n2\n3 + 3\n", "m.txt")).toThrow(/m\.txt: 3 lines, expected/);
    expect(parseMathematics("1 + 1\r\n2\r\n")).toEqual([{ question: "1 + 1", answer: "2" }]);
  });
});

describe("C4 loader", () => {
  it("reads gzipped JSON lines into empty-prompt examples, the same as the plain file", async () => {
    const gz = await loadTask({
      kind: "c4",
      path: data("c4-sample.json.gz"),
      trainCount: 2,
      validationCount: 1,
      shuffle: false,
      split: "train-first",
    });
    const plain = await loadTask({
      kind: "c4",
      path: data("c4-sample.json"),
      trainCount: 2,
      validationCount: 1,
      shuffle: false,
      split: "train-first",
    });
    expect(gz.metric).toBe("none");
    expect(gz.train[0]!.prompt).toBe("");
    expect(gz.train[0]!.completion.startsWith("Beginners BBQ Class Taking Place in Missoula!\nDo you")).toBe(
      true,
    );
    expect(gz.train[0]!.answers).toBeUndefined();
    expect(gz.train).toEqual(plain.train);
    expect(gz.validation).toEqual(plain.validation);
  });

  it("splits prefix and continuation by words, skipping texts too short to split", async () => {
    const task = await loadTask({
      kind: "c4",
      path: data("c4-sample.json.gz"),
      prefixWords: 10,
      shuffle: false,
      trainCount: 10,
      validationCount: 0,
    });
    // The third document has 9 words.
    expect(task.train).toHaveLength(2);
    expect(task.train[1]).toEqual({
      prompt: "Discussion in 'Mac OS X Lion (10.7)' started by axboi87,",
      completion: " Jan 20, 2012.",
    });
    const first = task.train[0]!;
    expect(first.prompt + first.completion).toBe(
      JSON.parse(readFileSync(data("c4-sample.json"), "utf8").split("\n")[0]!).text,
    );
  });

  it("reads line formats as a stream: the same lines and hash as the whole file, gzipped or not", async () => {
    // Multi-byte characters across the stream's 64 KiB chunks, CRLF and LF ends, no final newline.
    const docs = Array.from({ length: 3000 }, (_, i) =>
      JSON.stringify({ text: `ünï ${i} 日本語 ${"é".repeat(i % 50)}` }),
    );
    const text = docs
      .map((d, i) => d + (i % 3 === 0 ? "\r\n" : "\n"))
      .join("")
      .trimEnd();
    const plain = join(tmp, "stream.json");
    const gz = join(tmp, "stream.json.gz");
    writeFileSync(plain, text);
    writeFileSync(gz, gzipSync(text));
    const whole = await readSource(plain);
    const a = await readSourceLines(plain);
    const b = await readSourceLines(gz);
    expect(a.lines).toEqual(docs);
    expect(b.lines).toEqual(docs);
    expect(a.sha256).toBe(whole.sha256);
    expect(b.sha256).toBe((await readSource(gz)).sha256);
    const task = await loadTask({ kind: "c4", path: gz, trainCount: 5, validationCount: 5, seed: 1 });
    expect(task.train[0]!.completion).toMatch(/^ünï \d+ 日本語/);
    // A byte-order mark is dropped; zero padding after the gzip member is ignored (as gunzip does); a
    // one-line JSON array of several 64 KiB chunks reads whole (the partial line was rescanned per chunk).
    const bom = join(tmp, "bom.json");
    writeFileSync(bom, `\uFEFF${text}`);
    expect((await readSourceLines(bom)).lines).toEqual(docs);
    const padded = join(tmp, "padded.json.gz");
    writeFileSync(padded, Buffer.concat([gzipSync(text), Buffer.alloc(16)]));
    expect((await readSourceLines(padded)).lines).toEqual(docs);
    // Bytes that are not UTF-8 (Latin-1's "é") are refused, whole-file and streamed, plain and gzipped, and
    // a character split across stream chunks is not mistaken for one.
    const latin1 = join(tmp, "latin1.json");
    const latinBytes = Buffer.concat([
      Buffer.from(`${"x".repeat(70_000)}\n`),
      Buffer.from([0x63, 0x61, 0x66, 0xe9, 0x0a]),
    ]);
    writeFileSync(latin1, latinBytes);
    writeFileSync(`${latin1}.gz`, gzipSync(latinBytes));
    for (const f of [latin1, `${latin1}.gz`]) {
      expect(() => readTexts(f)).toThrow(/latin1\.json(\.gz)?: not valid UTF-8 text/); // priors' texts too
      await expect(readSource(f)).rejects.toThrow(/latin1\.json(\.gz)?: not valid UTF-8 text/);
      await expect(readSourceLines(f)).rejects.toThrow(/latin1\.json(\.gz)?: not valid UTF-8 text/);
    }
    const split = join(tmp, "split-char.json");
    writeFileSync(split, `${"y".repeat(65_535)}日本\n`); // 日 straddles the first 64 KiB chunk's end
    expect((await readSourceLines(split)).lines).toEqual([`${"y".repeat(65_535)}日本`]);
    const array = join(tmp, "array.json");
    writeFileSync(array, `\uFEFF[${docs.join(",")}]`);
    const [line] = (await readSourceLines(array)).lines;
    expect(JSON.parse(line!)).toHaveLength(docs.length);
    const fromArray = await loadTask({ kind: "c4", path: array, trainCount: 5, validationCount: 5, seed: 1 });
    expect(fromArray.train).toEqual(task.train);
    const bad = join(tmp, "bad.json.gz");
    writeFileSync(bad, gzipSync(text).subarray(0, 200));
    await expect(readSourceLines(bad)).rejects.toThrow(/bad\.json\.gz: not a valid gzip file/);
    await expect(readSourceLines(join(tmp, "missing.json"))).rejects.toThrow(/missing\.json: cannot read/);
  });

  it("rejects a template, which plain text has no use for", async () => {
    await expect(loadTask({ kind: "c4", path: data("c4-sample.json"), template: "{text}" })).rejects.toThrow(
      /unknown option "template" for kind "c4"/,
    );
  });
});

describe("JSONL loader", () => {
  it("reads {prompt, completion} records, blank lines skipped, answers optional", async () => {
    const task = await loadTask({
      kind: "jsonl",
      path: data("pairs.jsonl"),
      shuffle: false,
      trainCount: 3,
      validationCount: 0,
    });
    expect(task.metric).toBe("qa");
    expect(task.train).toEqual([
      { prompt: "Translate to French: cat\nAnswer:", completion: " chat", answers: ["chat"] },
      { prompt: "Translate to French: dog\nAnswer:", completion: " chien", answers: ["chien", "le chien"] },
      { prompt: "Translate to French: bird\nAnswer:", completion: " oiseau", answers: ["oiseau"] },
    ]);
    expect(task.validation).toEqual([]);
  });

  it("fills a template from any string field and names records that lack it", async () => {
    const path = join(tmp, "fields.jsonl");
    writeFileSync(path, '{"word": "cat", "completion": " chat"}\n{"completion": " chien"}\n');
    await expect(loadTask({ kind: "jsonl", path, template: "French for {word}:" })).rejects.toThrow(
      /fields\.jsonl: record 2: template: no string value for placeholder \{word\}/,
    );
    writeFileSync(path, '{"prompt": "x"}\n');
    await expect(loadTask({ kind: "jsonl", path })).rejects.toThrow(
      /record 1: expected a string "completion" field/,
    );
    // A malformed answers field is an error (it was replaced by the completion without a word).
    writeFileSync(path, '{"prompt": "x", "completion": " 2", "answers": [2]}\n');
    await expect(loadTask({ kind: "jsonl", path })).rejects.toThrow(
      /record 1: "answers" must be an array of strings when present/,
    );
    // No gold answer at all: exact match and F1 had nothing to compare with (the evaluation threw).
    writeFileSync(path, '{"prompt": "x", "completion": "", "answers": []}\n');
    await expect(loadTask({ kind: "jsonl", path })).rejects.toThrow(
      /record 1: "answers" is empty \(give \[""\] for a question without an answer\)/,
    );
  });
});

describe("train and validation from one source", () => {
  const math = { kind: "mathematics", path: data("arithmetic__add_or_sub.txt"), seed: 3 } as const;

  it("holds validation out first: runs that differ in trainCount are scored on the same examples", async () => {
    const small = await loadTask({ ...math, trainCount: 2, validationCount: 3 });
    const large = await loadTask({ ...math, trainCount: 5, validationCount: 3 });
    expect(small.validation).toHaveLength(3);
    expect(large.validation).toEqual(small.validation);
    expect(large.train.slice(0, 2)).toEqual(small.train);
    const prompts = [...large.train, ...large.validation].map((e) => e.prompt);
    expect(new Set(prompts).size).toBe(8);
    // As before the split option existed, train first: validation moves with trainCount.
    const old = { ...math, split: "train-first" } as const;
    const oldSmall = await loadTask({ ...old, trainCount: 2, validationCount: 3 });
    const oldLarge = await loadTask({ ...old, trainCount: 5, validationCount: 3 });
    expect(oldLarge.validation).not.toEqual(oldSmall.validation);
    // Generated tasks too.
    const arith = { kind: "arithmetic", seed: 1 } as const;
    const a = await loadTask({ ...arith, trainCount: 3, validationCount: 4 });
    const b = await loadTask({ ...arith, trainCount: 9, validationCount: 4 });
    expect(b.validation).toEqual(a.validation);
  });

  it("keeps train's count when the source is too small for both", async () => {
    const task = await loadTask({ ...math, trainCount: 5 }); // 8 pairs, validationCount 1000
    expect(task.train).toHaveLength(5);
    expect(task.validation).toHaveLength(3);
  });

  it("never puts a SQuAD paragraph on both sides", async () => {
    // Two paragraphs of two questions: validation takes lh-1, so lh-2 (its paragraph) is not trained on.
    const task = await loadTask({
      kind: "squad",
      path: data("squad-v1.1.json"),
      trainCount: 3,
      validationCount: 1,
      shuffle: false,
    });
    expect(task.validation.map((e) => e.id)).toEqual(["lh-1"]);
    expect(task.train.map((e) => e.id)).toEqual(["rv-1", "rv-2"]);
  });

  it("holds SQuAD paragraphs out whole: train keeps its count when the file has room for both", async () => {
    // 50 paragraphs of 5 questions, shuffled. Holding out single questions left their paragraphs' other
    // questions out of train too (train 5775 of 8000 on a SQuAD-dev-sized file; 0 on small ones).
    const path = join(tmp, "paragraphs.json");
    writeQaFacts(path, { peoplePerContext: 2, questionsPerContext: 5, count: 250, seed: 2 });
    const task = await loadTask({ kind: "squad", path, trainCount: 200, validationCount: 40, seed: 3 });
    expect(task.validation).toHaveLength(40);
    expect(task.train).toHaveLength(200);
    const paragraph = (e: { prompt: string }) => e.prompt.split("\nQuestion:")[0];
    const held = new Set(task.validation.map(paragraph));
    expect(held.size).toBe(8);
    expect(task.train.filter((e) => held.has(paragraph(e)))).toEqual([]);
    const again = await loadTask({ kind: "squad", path, trainCount: 100, validationCount: 40, seed: 3 });
    expect(again.validation).toEqual(task.validation);
  });

  it("specForRunDirs: a run directory whose run.json task has no split resumes train first", () => {
    const dir = join(tmp, "old-run");
    mkdirSync(dir, { recursive: true });
    const spec = { kind: "arithmetic", trainCount: 4 } as const;
    expect(specForRunDirs(spec, [undefined, join(tmp, "missing-run")])).toEqual(spec);
    writeFileSync(join(dir, "run.json"), JSON.stringify({ task: { kind: "arithmetic", trainCount: 4 } }));
    expect(specForRunDirs(spec, [dir])).toEqual({ ...spec, split: "train-first" });
    expect(specForRunDirs({ ...spec, split: "validation-first" }, [dir]).split).toBe("validation-first");
    writeFileSync(
      join(dir, "run.json"),
      JSON.stringify({ task: { kind: "arithmetic", split: "validation-first" } }),
    );
    expect(specForRunDirs(spec, [dir])).toEqual(spec);
  });

  it("records the split; a description without one (an earlier version's run) reloads train first", async () => {
    const task = await loadTask({ ...math, trainCount: 2, validationCount: 3 });
    const description = task.describe();
    expect(description["split"]).toBe("validation-first");
    const { split: _, ...old } = description;
    const reloaded = await loadRecordedTask(old);
    const trainFirst = await loadTask({ ...math, trainCount: 2, validationCount: 3, split: "train-first" });
    expect(reloaded.validation).toEqual(trainFirst.validation);
    expect(reloaded.validation).not.toEqual(task.validation);
    expect((await loadRecordedTask(description)).validation).toEqual(task.validation);
    await expect(loadTask({ ...math, split: "random" as "train-first" })).rejects.toThrow(
      /split: expected one of "validation-first", "train-first", got "random"/,
    );
  });
});

describe("task specs", () => {
  it("describe() reproduces the task with loadTask, and checks the data file's hash", async () => {
    const path = join(tmp, "copy.txt");
    writeFileSync(path, readFileSync(data("arithmetic__add_or_sub.txt")));
    const task = await loadTask({ kind: "mathematics", path, trainCount: 4, validationCount: 2, seed: 3 });
    const spec = task.describe();
    expect(spec).toMatchObject({
      kind: "mathematics",
      path,
      seed: 3,
      shuffle: true,
      template: MATH_TEMPLATE,
      metric: "accuracy",
    });
    expect(spec["sha256"]).toMatch(/^[0-9a-f]{64}$/);
    const again = await loadTask(JSON.parse(JSON.stringify(spec)));
    expect(again.train).toEqual(task.train);
    expect(again.validation).toEqual(task.validation);
    expect(again.describe()).toEqual(spec);
    writeFileSync(path, "1 + 1\n2\n");
    await expect(loadTask(spec)).rejects.toThrow(/the file changed since the task was described/);
  });

  it("names unknown kinds, unknown options, wrong types and missing paths", async () => {
    expect(() => parseTaskSpec({ kind: "glue" })).toThrow(/kind: expected one of "squad", "mathematics"/);
    expect(() => parseTaskSpec({ kind: "arithmetic", digit: 3 })).toThrow(
      /unknown option "digit" for kind "arithmetic"/,
    );
    expect(() => parseTaskSpec({ kind: "arithmetic", digits: 0 })).toThrow(
      /digits: expected an integer >= 1/,
    );
    expect(() => parseTaskSpec({ kind: "arithmetic", operations: ["div"] })).toThrow(
      /operations\[0\]: expected one of/,
    );
    expect(() => parseTaskSpec({ kind: "squad" })).toThrow(/path: required for kind "squad"/);
    expect(() => parseTaskSpec({ kind: "squad", path: "x", trainCount: -1 })).toThrow(/trainCount/);
    // Undefined options are absent options (CLI wiring passes them through).
    expect(parseTaskSpec({ kind: "arithmetic", path: undefined, template: undefined })).toBeTruthy();
    await expect(loadTask({ kind: "squad", path: join(tmp, "missing.json") })).rejects.toThrow(
      /missing\.json: cannot read/,
    );
    await expect(
      loadTask({ kind: "squad", path: data("squad-v1.1.json"), template: "{context} {questoin}" }),
    ).rejects.toThrow(/placeholder \{questoin\} is not a field of SQuAD examples/);
  });
});

describe("arithmetic generator", () => {
  it("writes Mathematics-format pairs with correct answers", () => {
    const text = generateArithmetic({
      count: 300,
      seed: 1,
      operations: ["add", "sub", "mul"],
      digits: 2,
      negative: true,
    });
    const pairs = parseMathematics(text);
    expect(pairs).toHaveLength(300);
    for (const { question, answer } of pairs) {
      const nums = [...question.matchAll(/(?<!\d)-?\d+/g)].map((m) => Number(m[0]));
      expect(nums).toHaveLength(2);
      // "Subtract {q} from {p}." names q first.
      const [p, q] = (question.startsWith("Subtract") ? [nums[1], nums[0]] : nums) as [number, number];
      for (const n of nums) expect(Math.abs(n)).toBeGreaterThanOrEqual(10);
      let expected: number;
      if (/less than/.test(question)) expected = q - p;
      else if (/\+|plus|Add|Sum|Total|together/.test(question)) expected = p + q;
      else if (/\*|times|Multiply|[Pp]roduct/.test(question)) expected = p * q;
      else expected = p - q;
      expect(Number(answer), question).toBe(expected);
    }
    expect(new Set(pairs.map((p) => p.question)).size).toBe(300);
  });

  it("is reproducible by seed and exact with decimals", () => {
    const opts = { count: 50, seed: 9, digits: 1, decimals: 2, negative: true };
    expect(generateArithmetic(opts)).toBe(generateArithmetic(opts));
    expect(generateArithmetic(opts)).not.toBe(generateArithmetic({ ...opts, seed: 10 }));
    const plain = parseMathematics(generateArithmetic({ ...opts, phrasing: "plain", operations: ["add"] }));
    for (const { question, answer } of plain) {
      const [, p, q] = /^What is (-?[\d.]+) \+ (-?[\d.]+)\?$/.exec(question)!;
      expect(Math.round((Number(p) + Number(q)) * 100)).toBe(Math.round(Number(answer) * 100));
      expect(answer).not.toMatch(/\.\d*0$|^-?0\d/); // no trailing zeros, no leading zeros
    }
  });

  it("names a problem space too small for the count", () => {
    expect(() =>
      generateArithmetic({ count: 200, digits: 1, operations: ["add"], phrasing: "plain" }),
    ).toThrow(/count: could not draw 200 distinct questions at digits=1/);
    expect(() => generateArithmetic({ count: 5, operations: [] })).toThrow(
      /operations: expected a non-empty array/,
    );
  });

  it("round-trips: a written file read by the Mathematics loader is the in-memory task", async () => {
    const path = join(tmp, "arith.txt.gz");
    const options = { digits: 3, negative: true, operations: ["add", "mul"] as ("add" | "mul")[] };
    writeArithmetic(path, { ...options, count: 30, seed: 4 });
    expect(gunzipSync(readFileSync(path)).toString()).toBe(
      generateArithmetic({ ...options, count: 30, seed: 4 }),
    );
    const fromFile = await loadTask({
      kind: "mathematics",
      path,
      trainCount: 20,
      validationCount: 10,
      shuffle: false,
    });
    const generated = await loadTask({
      kind: "arithmetic",
      ...options,
      trainCount: 20,
      validationCount: 10,
      seed: 4,
    });
    expect(generated.train).toEqual(fromFile.train);
    expect(generated.validation).toEqual(fromFile.validation);
    expect(generated.describe()).toEqual({
      kind: "arithmetic",
      name: "arithmetic",
      metric: "accuracy",
      trainCount: 20,
      validationCount: 10,
      seed: 4,
      split: "validation-first",
      operations: ["add", "mul"],
      digits: 3,
      decimals: 0,
      negative: true,
      phrasing: "mathematics",
      unique: true,
      template: MATH_TEMPLATE,
    });
    expect((await loadTask(generated.describe())).train).toEqual(generated.train);
  });
});

describe("QA facts generator", () => {
  it("writes SQuAD JSON whose answer_start offsets point at the answers", () => {
    const json = generateQaFacts({ count: 60, seed: 2, peoplePerContext: 3, questionsPerContext: 4 });
    const parsed = JSON.parse(json);
    expect(parsed.version).toBe("1.1");
    const records = parseSquad(json);
    expect(records).toHaveLength(60);
    for (const r of records) {
      expect(r.answers).toHaveLength(1);
      expect(r.context.slice(r.answerStarts[0], r.answerStarts[0]! + r.answers[0]!.length)).toBe(
        r.answers[0],
      );
      // The person asked about is in the paragraph.
      const name = /(?:was|does|is) ([A-Z]\w+ [A-Z]\w+)/.exec(r.question)![1]!;
      expect(r.context).toContain(name);
    }
    expect(new Set(records.map((r) => r.id)).size).toBe(60);
  });

  it("is reproducible by seed", () => {
    expect(generateQaFacts({ count: 10, seed: 5 })).toBe(generateQaFacts({ count: 10, seed: 5 }));
    expect(generateQaFacts({ count: 10, seed: 5 })).not.toBe(generateQaFacts({ count: 10, seed: 6 }));
  });

  it("writes v2.0 with unanswerable questions about absent people", () => {
    const records = parseSquad(generateQaFacts({ count: 200, seed: 3, unanswerableFraction: 0.3 }));
    const impossible = records.filter((r) => r.impossible);
    expect(impossible.length).toBeGreaterThan(30);
    expect(impossible.length).toBeLessThan(90);
    for (const r of impossible) {
      expect(r.answers).toEqual([]);
      const name = /(?:was|does|is) ([A-Z]\w+ [A-Z]\w+)/.exec(r.question)![1]!;
      expect(r.context).not.toContain(name);
    }
  });

  it("round-trips through the SQuAD loader", async () => {
    const path = join(tmp, "facts.json");
    const options = { peoplePerContext: 2, questionsPerContext: 3, unanswerableFraction: 0.2 };
    // Validation (4) first; its last paragraph's 2 other questions are left out of train, so 8 + 4 + 2.
    writeQaFacts(path, { ...options, count: 14, seed: 8 });
    const fromFile = await loadTask({
      kind: "squad",
      path,
      unanswerable: "keep",
      trainCount: 8,
      validationCount: 4,
      shuffle: false,
    });
    const generated = await loadTask({
      kind: "qa-facts",
      ...options,
      unanswerable: "keep",
      trainCount: 8,
      validationCount: 4,
      seed: 8,
    });
    expect(generated.train).toEqual(fromFile.train);
    expect(generated.validation).toEqual(fromFile.validation);
    expect(generated.train).toHaveLength(8);
    expect(generated.train[0]!.prompt).toMatch(/\nQuestion: .+\?\nAnswer:$/);
    // No paragraph is on both sides.
    const paragraph = (e: { prompt: string }) => e.prompt.split("\nQuestion:")[0];
    const held = new Set(generated.validation.map(paragraph));
    expect(generated.train.filter((e) => held.has(paragraph(e)))).toEqual([]);
    await expect(loadTask({ kind: "qa-facts", unanswerableFraction: 0.5 })).rejects.toThrow(
      /set unanswerable: "keep"/,
    );
  });
});

describe("cloze generator", () => {
  const text = readFileSync(data("prose.txt"), "utf8");

  it("splits sentences across line wraps and at paragraph breaks", () => {
    const sentences = splitSentences(text);
    expect(sentences[0]).toBe(
      "The lighthouse keeper climbed the spiral staircase every evening before sunset.",
    );
    expect(sentences).toContain("Short line here.");
    expect(sentences).toHaveLength(7);
  });

  it("masks one content word per sentence; prompt, completion and answer agree", () => {
    const lines = generateCloze({ text, seed: 1 })
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(lines).toHaveLength(6); // "Short line here." has 3 words, fewer than minWords 6
    for (const r of lines) {
      expect(r.context).toContain("____");
      expect(r.answer.length).toBeGreaterThanOrEqual(4);
      expect(r.completion).toBe(` ${r.answer}`);
      expect(r.prompt).toBe(fillTemplate(CLOZE_TEMPLATE, { context: r.context, mask: "____" }));
      expect(splitSentences(text)).toContain(r.context.replace("____", r.answer));
    }
    expect(generateCloze({ text, seed: 1 })).toBe(generateCloze({ text, seed: 1 }));
    expect(generateCloze({ text, seed: 1 })).not.toBe(generateCloze({ text, seed: 2 }));
    expect(() => generateCloze({ text, count: 7 })).toThrow(
      /asked for 7 cloze items, the text has 6 eligible/,
    );
  });

  it("a repeated sentence is one item, and only a word the sentence holds once is masked", () => {
    // Before: the copies became separate items (a validation answer, unmasked, in training prompts) and
    // "river" could be masked while another "river" stayed in the prompt.
    const repeated = [
      "The river meets another river near the old river mill.",
      "The river meets another river near the old river mill.",
      "Tall dogs chase quick cats across wide green fields.",
    ].join(" ");
    for (const seed of [1, 2, 3, 4]) {
      const items = generateCloze({ text: repeated, seed })
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l) as { context: string; answer: string });
      expect(items).toHaveLength(2);
      for (const r of items) expect(r.context.toLowerCase()).not.toContain(r.answer.toLowerCase());
    }
  });

  it("round-trips: the JSONL file read as a generic JSONL task is the cloze task", async () => {
    const path = join(tmp, "cloze.jsonl");
    const options = { minWords: 5, mask: "<blank>", template: "Fill in {mask}: {context}\nAnswer:" };
    expect(writeCloze(path, { ...options, text, seed: 3 }).count).toBe(6);
    const fromFile = await loadTask({
      kind: "jsonl",
      path,
      trainCount: 4,
      validationCount: 2,
      shuffle: false,
    });
    const generated = await loadTask({
      kind: "cloze",
      path: data("prose.txt"),
      ...options,
      trainCount: 4,
      validationCount: 2,
      seed: 3,
    });
    expect(generated.train).toEqual(fromFile.train);
    expect(generated.validation).toEqual(fromFile.validation);
    expect(generated.train[0]!.prompt.startsWith("Fill in <blank>: ")).toBe(true);
    const again = await loadTask(generated.describe());
    expect(again.train).toEqual(generated.train);
  });
});

describe("encodeExample", () => {
  const tokenizer = loadTokenizer(modelDir("llama-tiny"));
  const example = { prompt: "Question: What is 12 + 30?\nAnswer:", completion: " 42" };

  it("puts -100 exactly on the prompt positions and the ids on the completion and EOS", () => {
    const promptIds = tokenizer.encode(example.prompt);
    const completionIds = tokenizer.encode(example.completion);
    const e = encodeExample(tokenizer, example, { eosId: 0 });
    expect(e.promptLength).toBe(promptIds.length);
    expect([...e.ids]).toEqual([...promptIds, ...completionIds, 0]);
    expect([...e.labels]).toEqual([...promptIds.map(() => IGNORE_INDEX), ...completionIds, 0]);
    const noEos = encodeExample(tokenizer, example);
    expect(noEos.ids.length).toBe(promptIds.length + completionIds.length);
  });

  it("tokenizes the completion on its own: no BPE merge across the boundary", () => {
    // Encoding "Answer: " + "Paris" as one text would attach the space to the answer (" P..." tokens).
    const ex = { prompt: "Answer: ", completion: "Paris" };
    const e = encodeExample(tokenizer, ex);
    expect([...e.ids.slice(e.promptLength)]).toEqual(tokenizer.encode("Paris"));
    expect([...e.ids.slice(0, e.promptLength)]).toEqual(tokenizer.encode("Answer: "));
    const joint = tokenizer.encode(ex.prompt + ex.completion);
    expect(joint).not.toEqual([...e.ids]);
  });

  it("truncates the prompt from the left, keeping the whole completion", () => {
    const full = encodeExample(tokenizer, example, { eosId: 0 });
    const e = encodeExample(tokenizer, example, { eosId: 0, maxLength: 8 });
    expect(e.ids.length).toBe(8);
    const tail = full.ids.length - full.promptLength;
    expect(e.promptLength).toBe(8 - tail);
    expect([...e.ids]).toEqual([...full.ids.slice(full.ids.length - 8)]);
    expect([...e.labels.slice(0, e.promptLength)].every((l) => l === IGNORE_INDEX)).toBe(true);
    expect([...e.labels.slice(e.promptLength)]).toEqual([...full.labels.slice(full.promptLength)]);
    // Exactly the completion: no prompt left.
    expect(encodeExample(tokenizer, example, { eosId: 0, maxLength: tail }).promptLength).toBe(0);
  });

  it("names a completion that cannot fit, or truncates it on request", () => {
    const long = { prompt: "", completion: " the quick brown fox jumps over the lazy dog" };
    const n = tokenizer.encode(long.completion).length;
    expect(() => encodeExample(tokenizer, long, { maxLength: n - 1 })).toThrow(
      new RegExp(`maxLength: ${n - 1} tokens cannot hold the completion \\(${n} tokens\\)`),
    );
    const cut = encodeExample(tokenizer, long, { maxLength: 4, completionOverflow: "truncate" });
    expect([...cut.ids]).toEqual(tokenizer.encode(long.completion).slice(0, 4));
    expect([...cut.labels]).toEqual([...cut.ids]);
    // "head" keeps the text's first tokens: the whole prompt (C4's first words), then the start of the
    // completion (the prompt was dropped when the completion alone overflowed, or cut from the left),
    // while the prompt leaves room; "truncate" (other plain text) cuts the prompt from the left as before.
    const prefixed = { prompt: "Once upon a time", completion: long.completion };
    const p = tokenizer.encode(prefixed.prompt).length;
    const joined = [...tokenizer.encode(prefixed.prompt), ...tokenizer.encode(long.completion), 0];
    for (const maxLength of [p + 1, p + 3, p + n - 1]) {
      const kept = encodeExample(tokenizer, prefixed, { maxLength, completionOverflow: "head", eosId: 0 });
      expect(kept.promptLength).toBe(p);
      expect([...kept.ids]).toEqual(joined.slice(0, maxLength));
      const cut = encodeExample(tokenizer, prefixed, { maxLength, completionOverflow: "truncate", eosId: 0 });
      expect([...cut.ids]).toEqual(
        maxLength >= n + 1 ? joined.slice(-maxLength) : tokenizer.encode(long.completion).slice(0, maxLength),
      );
    }
    // A prompt that leaves no room: "head" is "truncate" (a long SQuAD context does not fail the run).
    for (const maxLength of [p - 1, p]) {
      const head = encodeExample(tokenizer, prefixed, { maxLength, completionOverflow: "head", eosId: 0 });
      const cut = encodeExample(tokenizer, prefixed, { maxLength, completionOverflow: "truncate", eosId: 0 });
      expect([...head.ids]).toEqual([...cut.ids]);
    }
    expect(() => encodeExample(tokenizer, example, { eosId: 10_000 })).toThrow(/eosId: expected a token id/);
    expect(() => encodeExample(tokenizer, example, { maxLength: 0 })).toThrow(
      /maxLength: expected a positive integer/,
    );
  });

  it("keeps leading special tokens (BOS) through truncation", () => {
    // A wrapper that adds BOS like Llama 3's tokenizer does.
    const bos = 1;
    const withBos: Tokenizer = {
      ...tokenizer,
      vocabSize: tokenizer.vocabSize,
      encode: (text, o) => [...(o?.addSpecialTokens ? [bos] : []), ...tokenizer.encode(text)],
    };
    const full = encodeExample(withBos, example, { addSpecialTokens: true });
    expect(full.ids[0]).toBe(bos);
    expect(full.promptLength).toBe(tokenizer.encode(example.prompt).length + 1);
    const cut = encodeExample(withBos, example, { addSpecialTokens: true, maxLength: 5 });
    expect(cut.ids[0]).toBe(bos);
    expect(cut.ids.length).toBe(5);
    const empty = encodeExample(withBos, { prompt: "", completion: " 42" }, { addSpecialTokens: true });
    expect(empty.promptLength).toBe(1);
    expect(empty.labels[0]).toBe(IGNORE_INDEX);
  });

  it("labels what the joined text holds with a tokenizer that prefixes every text (Llama 2, Mistral v0.1)", () => {
    // SentencePiece's dummy prefix as a tokenizer.json writes it: "▁" prepended, spaces become "▁"; one
    // token a character here. The completion's leading space would otherwise become a lone "▁" label.
    const chars = [..."▁abcdefghijklmnopqrstuvwxyzAQ:?"];
    const dir = join(tmp, "sentencepiece-like");
    mkdirSync(dir, { recursive: true });
    writeFileSync(
      join(dir, "tokenizer.json"),
      JSON.stringify({
        version: "1.0",
        added_tokens: [
          {
            id: chars.length,
            content: "</s>",
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
          },
        ],
        normalizer: {
          type: "Sequence",
          normalizers: [
            { type: "Prepend", prepend: "▁" },
            { type: "Replace", pattern: { String: " " }, content: "▁" },
          ],
        },
        pre_tokenizer: null,
        post_processor: null,
        decoder: {
          type: "Sequence",
          decoders: [
            { type: "Replace", pattern: { String: "▁" }, content: " " },
            { type: "Fuse" },
            { type: "Strip", content: " ", start: 1, stop: 0 },
          ],
        },
        model: {
          type: "BPE",
          dropout: null,
          unk_token: null,
          continuing_subword_prefix: null,
          end_of_word_suffix: null,
          fuse_unk: false,
          byte_fallback: false,
          vocab: Object.fromEntries([...chars.map((c, i) => [c, i]), ["</s>", chars.length]]),
          merges: [],
        },
      }),
    );
    const sp = loadTokenizer(dir);
    expect(impliesLeadingSpace(sp)).toBe(true);
    expect(impliesLeadingSpace(tokenizer)).toBe(false); // byte-level BPE: the space is part of " x"
    const ex = { prompt: "Q: what is it?\nA:", completion: " the license" };
    const e = encodeExample(sp, ex);
    const joined = sp.encode(ex.prompt + ex.completion);
    expect([...e.ids]).toEqual(joined);
    expect(sp.decode(e.labels.filter((l) => l !== IGNORE_INDEX))).toBe("the license");
    // Without a prompt the completion is the text itself.
    expect([...encodeExample(sp, { prompt: "", completion: " x" }).ids]).toEqual(sp.encode(" x"));
  });

  it("encodes loaded tasks end to end", async () => {
    const gpt2 = loadTokenizer(modelDir("gpt2-tiny"));
    const task = await loadTask({
      kind: "squad",
      path: data("squad-v1.1.json"),
      trainCount: 4,
      validationCount: 0,
    });
    for (const ex of task.train) {
      const e = encodeExample(gpt2, ex, { eosId: 0, maxLength: 24 });
      expect(e.ids.length).toBeLessThanOrEqual(24);
      expect(gpt2.decode(e.ids.slice(e.promptLength, -1))).toBe(ex.completion);
    }
  });
});

describe("make-data CLI", () => {
  const run = async (args: string[]) => {
    let out = "";
    const write = (s: string) => {
      out += s;
    };
    const program = new Command()
      .name("priortune")
      .exitOverride()
      .configureOutput({ writeOut: write, writeErr: write });
    registerDataCommands(program);
    await program.parseAsync(args, { from: "user" });
    return out;
  };

  it("documents every option in --help", async () => {
    const program = new Command();
    const makeData = registerDataCommands(program);
    expect(makeData.commands.map((c) => c.name())).toEqual(["arithmetic", "qa", "cloze"]);
    for (const cmd of makeData.commands) {
      const help = cmd.helpInformation();
      for (const option of cmd.options) {
        expect(option.description.length, `${cmd.name()} ${option.long}`).toBeGreaterThan(10);
        expect(help).toContain(option.long!);
      }
    }
    await expect(run(["make-data", "qa", "--help"])).rejects.toMatchObject({
      code: "commander.helpDisplayed",
    });
  });

  it("writes the same files as the library functions, and refuses to overwrite without --force", async () => {
    const path = join(tmp, "cli-arith.txt");
    await run([
      "make-data",
      "arithmetic",
      "-n",
      "20",
      "--seed",
      "5",
      "--operations",
      "add,mul",
      "--digits",
      "3",
      "--negative",
      "-o",
      path,
    ]);
    expect(readFileSync(path, "utf8")).toBe(
      generateArithmetic({ count: 20, seed: 5, operations: ["add", "mul"], digits: 3, negative: true }),
    );
    await expect(run(["make-data", "arithmetic", "-n", "20", "-o", path])).rejects.toThrow(
      /--out: .* exists; pass --force/,
    );
    await run(["make-data", "arithmetic", "-n", "4", "--phrasing", "plain", "-o", path, "--force"]);
    expect(parseMathematics(readFileSync(path, "utf8"))).toHaveLength(4);
    // A directory that does not exist yet (README: --out data/arith.txt in a fresh checkout) is created.
    const nested = join(tmp, "new-dir", "deeper", "arith.txt");
    await run(["make-data", "arithmetic", "-n", "3", "-o", nested]);
    expect(parseMathematics(readFileSync(nested, "utf8"))).toHaveLength(3);

    const qaPath = join(tmp, "cli-qa.json");
    await run(["make-data", "qa", "-n", "9", "--seed", "2", "--unanswerable-fraction", "0.5", "-o", qaPath]);
    expect(readFileSync(qaPath, "utf8")).toBe(
      generateQaFacts({ count: 9, seed: 2, unanswerableFraction: 0.5 }),
    );

    const clozePath = join(tmp, "cli-cloze.jsonl");
    await run([
      "make-data",
      "cloze",
      "-i",
      data("prose.txt"),
      "-n",
      "3",
      "--mask",
      "[MASK]",
      "-o",
      clozePath,
    ]);
    const text = readFileSync(data("prose.txt"), "utf8");
    expect(readFileSync(clozePath, "utf8")).toBe(generateCloze({ text, count: 3, mask: "[MASK]" }));
  });

  it("names bad option values", async () => {
    await expect(run(["make-data", "arithmetic", "-n", "x", "-o", "-"])).rejects.toThrow(
      /option '-n, --count <n>' argument 'x' is invalid. expected an integer >= 0/,
    );
    await expect(
      run(["make-data", "arithmetic", "-n", "3", "--operations", "add,div", "-o", "-"]),
    ).rejects.toThrow(/unknown operation "div"/);
    await expect(
      run(["make-data", "qa", "-n", "3", "--unanswerable-fraction", "2", "-o", "-"]),
    ).rejects.toThrow(/expected a number in \[0, 1\]/);
    await expect(run(["make-data", "qa", "-n", "3"])).rejects.toThrow(/required option '-o, --out <path>'/);
    await expect(run(["make-data", "cloze", "-i", join(tmp, "nope.txt"), "-o", "-"])).rejects.toThrow(
      /--input: cannot read/,
    );
  });
});
