// Tokenizers from a Hugging Face model directory, through @huggingface/tokenizers.
// tokenizer.json (+ tokenizer_config.json) is the normal case; directories that only have GPT-2's
// vocab.json + merges.txt get an equivalent byte-level BPE tokenizer.json built in memory.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { readJsonFile } from "./files.js";

export interface Tokenizer {
  /** Token ids of `text`; special tokens (e.g. BOS) are added only when asked. */
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  /** Text of `ids`; exact inverse of encode unless `cleanUpSpaces` (legacy " ," -> "," clean-up) is set. */
  decode(ids: ArrayLike<number>, options?: { skipSpecialTokens?: boolean; cleanUpSpaces?: boolean }): string;
  tokenToId(token: string): number | undefined;
  idToToken(id: number): string | undefined;
  /** Number of entries in the vocabulary, added tokens included. */
  readonly vocabSize: number;
  /** Where it was loaded from: "tokenizer.json" or "vocab.json+merges.txt". */
  readonly source: string;
  /** tokenizer_config.json's eos_token, where it names one (training labels end with it). */
  readonly eosToken?: string;
}

class HfBackedTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly eosToken?: string;
  constructor(
    private readonly inner: HfTokenizer,
    readonly source: string,
    config: unknown,
  ) {
    this.vocabSize = inner.get_vocab(true).size;
    // A string, or an AddedToken object ({ content, ... }) in older files.
    const eos =
      typeof config === "object" && config !== null
        ? (config as Record<string, unknown>)["eos_token"]
        : undefined;
    const content =
      typeof eos === "object" && eos !== null ? (eos as Record<string, unknown>)["content"] : eos;
    if (typeof content === "string" && content !== "") this.eosToken = content;
  }
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== "string") throw new TypeError(`text: expected a string, got ${typeof text}`);
    return this.inner.encode(text, { add_special_tokens: options.addSpecialTokens ?? false }).ids;
  }
  decode(
    ids: ArrayLike<number>,
    options: { skipSpecialTokens?: boolean; cleanUpSpaces?: boolean } = {},
  ): string {
    if (ids.length === 0) return "";
    return this.inner.decode(Array.from(ids), {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: options.cleanUpSpaces ?? false,
    });
  }
  tokenToId(token: string): number | undefined {
    return this.inner.token_to_id(token);
  }
  idToToken(id: number): string | undefined {
    return this.inner.id_to_token(id);
  }
}

/** The tokenizer.json equivalent of GPT-2's original vocab.json + merges.txt files. */
export function byteLevelBpeJson(vocab: Record<string, number>, mergesText: string): Record<string, unknown> {
  // Lines may end in CRLF (a Windows or autocrlf checkout): a kept "\r" would make no merge match.
  const merges = mergesText
    .split(/\r?\n/u)
    .map((line) => line.trim())
    .filter((line) => line.length > 0 && !line.startsWith("#version"))
    .map((line) => line.split(/\s+/u));
  const eos = "<|endoftext|>";
  return {
    version: "1.0",
    added_tokens:
      eos in vocab
        ? [
            {
              id: vocab[eos],
              content: eos,
              single_word: false,
              lstrip: false,
              rstrip: false,
              normalized: true,
              special: true,
            },
          ]
        : [],
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: "",
      end_of_word_suffix: "",
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}

/**
 * The id of a tokenizer's end-of-text token: its tokenizer_config.json's eos_token (Llama 3 Instruct's
 * <|eot_id|>) where that is in the vocabulary, else the first of the usual names it has.
 */
export function endOfTextId(
  t: { tokenToId?(token: string): number | undefined; readonly eosToken?: string } | null | undefined,
): number | undefined {
  if (!t?.tokenToId) return undefined;
  const configured = t.eosToken === undefined ? undefined : t.tokenToId(t.eosToken);
  if (configured !== undefined) return configured;
  for (const name of ["<|endoftext|>", "<|end_of_text|>", "</s>", "<|eot_id|>"]) {
    const id = t.tokenToId(name);
    if (id !== undefined) return id;
  }
  return undefined;
}

/** The tokenizer of a model directory: tokenizer.json, or GPT-2's vocab.json + merges.txt. */
export function loadTokenizer(dir: string): Tokenizer {
  const tokJson = join(dir, "tokenizer.json");
  const tokConfig = join(dir, "tokenizer_config.json");
  const config = existsSync(tokConfig) ? readJsonFile(tokConfig) : {};
  if (existsSync(tokJson)) {
    return new HfBackedTokenizer(new HfTokenizer(readJsonFile(tokJson), config), "tokenizer.json", config);
  }
  const vocabPath = join(dir, "vocab.json");
  const mergesPath = join(dir, "merges.txt");
  if (existsSync(vocabPath) && existsSync(mergesPath)) {
    const json = byteLevelBpeJson(
      readJsonFile(vocabPath) as Record<string, number>,
      readFileSync(mergesPath, "utf8"),
    );
    return new HfBackedTokenizer(new HfTokenizer(json, config), "vocab.json+merges.txt", config);
  }
  throw new Error(`${dir}: no tokenizer.json (or vocab.json + merges.txt) found`);
}

/**
 * The tokenizer of a model directory, or null where it has none. The model itself does not need one (ids
 * in, logits out), so a tokenizer that is present but cannot be read is reported through `warn` and
 * left out, rather than failing the load; whatever needs text then says it has no tokenizer.
 */
export function findTokenizer(dir: string, warn: (message: string) => void): Tokenizer | null {
  if (!["tokenizer.json", "vocab.json"].some((f) => existsSync(join(dir, f)))) return null;
  try {
    return loadTokenizer(dir);
  } catch (e) {
    warn(`${dir}: tokenizer not loaded (${(e as Error).message}); the model loads without one`);
    return null;
  }
}
