// Token ids and causal-LM labels for one example: the loss falls on the answer only (paper.md, Setup:
// "labels only on answer tokens").
import type { Tokenizer } from "../tokenizer.js";
import { checkOptions, type OptionKeys, requirePositiveInt } from "../validate.js";

/** Label value the loss ignores (PyTorch / Hugging Face convention, also lib/model.ts). */
export const IGNORE_INDEX = -100;

export interface EncodeOptions {
  /** Most tokens in `ids`. Longer examples lose prompt tokens from the left (see encodeExample). */
  maxLength?: number;
  /** Appended after the completion and labelled, so the model learns to stop. */
  eosId?: number;
  /** Let the tokenizer add its special tokens (e.g. Llama 3's BOS) to the prompt. Default false. */
  addSpecialTokens?: boolean;
  /**
   * When prompt and completion exceed maxLength: the prompt is cut from the left, and when even the
   * completion alone does not fit, "error" (default) throws and "truncate" keeps the completion's first
   * tokens (plain-text tasks, where the completion is the text); "head" keeps the text's first tokens, the
   * whole prompt and the start of the completion (C4 documents, whose prompt is their first words), as
   * long as the prompt leaves room for a completion token, and is "truncate" otherwise.
   */
  completionOverflow?: "error" | "truncate" | "head";
  /**
   * Encode the completion without its leading space for a tokenizer that starts every text with a word
   * boundary of its own (see encodeExample; default true; false: as run directories recorded before it).
   */
  impliedSpace?: boolean;
}

const ENCODE_KEYS = {
  maxLength: true,
  eosId: true,
  addSpecialTokens: true,
  completionOverflow: true,
  impliedSpace: true,
} satisfies OptionKeys<EncodeOptions>;

export interface EncodedExample {
  /** Prompt tokens then completion tokens (then EOS). */
  ids: Int32Array;
  /**
   * Aligned with `ids`: -100 on the prompt, the token id itself on the completion (and EOS). labels[t]
   * is the target for position t; the loss shifts, predicting it from the logits at t - 1.
   */
  labels: Int32Array;
  /** Number of prompt tokens at the start of `ids` (special tokens included), after truncation. */
  promptLength: number;
}

// How many special tokens each tokenizer puts before the text (Llama 3: BOS), found once on a probe
// text: an empty prompt alone cannot tell leading special tokens from trailing ones.
const leadingSpecialCount = new WeakMap<Tokenizer, number>();

// Whether a tokenizer starts every text with a word boundary of its own (SentencePiece's dummy prefix:
// Llama 2 and Mistral v0.1 tokenizer.json files prepend "▁"): "a" + " x" then encodes as "a" and "x"
// apart, not as "a" and " x", whose leading space would become a token of its own. Found once by probe.
const impliedSpace = new WeakMap<Tokenizer, boolean>();

export function impliesLeadingSpace(tokenizer: Tokenizer): boolean {
  let implied = impliedSpace.get(tokenizer);
  if (implied === undefined) {
    const enc = (t: string) => tokenizer.encode(t, { addSpecialTokens: false }).join();
    const joined = enc("a x");
    implied = joined !== `${enc("a")},${enc(" x")}` && joined === `${enc("a")},${enc("x")}`;
    impliedSpace.set(tokenizer, implied);
  }
  return implied;
}

function leadingSpecialTokens(tokenizer: Tokenizer, prompt: string, plain: number[]): number[] {
  let k = leadingSpecialCount.get(tokenizer);
  if (k === undefined) {
    const probePlain = tokenizer.encode("x", { addSpecialTokens: false });
    const probe = tokenizer.encode("x", { addSpecialTokens: true });
    k = 0;
    while (k + probePlain.length <= probe.length && !probePlain.every((t, i) => probe[k! + i] === t)) k++;
    if (k + probePlain.length > probe.length) k = 0;
    leadingSpecialCount.set(tokenizer, k);
  }
  const withSpecial = tokenizer.encode(prompt, { addSpecialTokens: true });
  if (!plain.every((t, i) => withSpecial[k + i] === t)) {
    throw new Error("tokenizer: the encoding with special tokens is not special tokens + the plain encoding");
  }
  return withSpecial.slice(0, k);
}

/**
 * Encodes one example for training or validation loss.
 *
 * Prompt and completion are tokenized separately and concatenated. Tokenizing the joined text would let
 * BPE merge across the boundary: with a prompt ending in "Answer: " and the completion "Paris", the
 * joined text encodes " Paris" as one token whose space belongs to the prompt, so the first answer token
 * would sit partly in the prompt and the answer tokens would differ from what the model generates after
 * the prompt alone. Separate encoding makes the boundary exact; the completions carry their leading
 * space (" Paris") so that they tokenize the way the model writes them after "Answer:".
 *
 * A tokenizer that starts every text with a word boundary of its own (SentencePiece's dummy prefix, as
 * Llama 2's and Mistral v0.1's) would read the completion's leading space as a second one and label a lone
 * "▁" token the model never writes after the prompt: for those the completion is encoded without its first
 * space (the tokenizer's prefix stands for it), as the joined text encodes it.
 *
 * Truncation to `maxLength` keeps the whole completion (and EOS) and the tokenizer's leading special
 * tokens, and cuts the prompt from the left: for SQuAD that drops the start of the context, keeping
 * the question next to the answer. If even the completion does not fit, it is an error, or with
 * `completionOverflow` "truncate" the completion's first tokens. With "head" the text keeps its first
 * tokens instead (the whole prompt, then as much of the completion as fits) while the prompt leaves room
 * for one. Special tokens a tokenizer appends after the text (add_eos_token) are not
 * kept in the middle of the sequence; pass `eosId` to end the completion instead.
 */
export function encodeExample(
  tokenizer: Tokenizer,
  example: { prompt: string; completion: string },
  optionsArg?: EncodeOptions,
): EncodedExample {
  const options = checkOptions(optionsArg, "encodeExample options", ENCODE_KEYS);
  if (typeof tokenizer?.encode !== "function") throw new TypeError("tokenizer: expected a Tokenizer");
  if (typeof example?.prompt !== "string") throw new TypeError("example.prompt: expected a string");
  if (typeof example.completion !== "string") throw new TypeError("example.completion: expected a string");
  const maxLength =
    options.maxLength === undefined ? undefined : requirePositiveInt(options.maxLength, "maxLength");
  const { eosId } = options;
  if (eosId !== undefined && (!Number.isInteger(eosId) || eosId < 0 || eosId >= tokenizer.vocabSize)) {
    throw new RangeError(`eosId: expected a token id in [0, ${tokenizer.vocabSize}), got ${eosId}`);
  }
  const overflow = options.completionOverflow ?? "error";
  if (overflow !== "error" && overflow !== "truncate" && overflow !== "head") {
    throw new RangeError(
      `completionOverflow: expected "error", "truncate" or "head", got ${JSON.stringify(overflow)}`,
    );
  }

  const promptPlain = tokenizer.encode(example.prompt, { addSpecialTokens: false });
  let special: number[] = [];
  if (options.addSpecialTokens) {
    special = leadingSpecialTokens(tokenizer, example.prompt, promptPlain);
  }
  const completion =
    (options.impliedSpace ?? true) &&
    promptPlain.length > 0 &&
    example.completion.startsWith(" ") &&
    impliesLeadingSpace(tokenizer)
      ? example.completion.slice(1)
      : example.completion;
  let tail = tokenizer.encode(completion, { addSpecialTokens: false });
  if (eosId !== undefined) tail.push(eosId);

  let body = promptPlain;
  if (maxLength !== undefined && special.length + body.length + tail.length > maxLength) {
    const room = maxLength - special.length - tail.length;
    const left = maxLength - special.length - body.length; // completion tokens "head" keeps
    if (overflow === "head" && left >= 1) {
      tail = tail.slice(0, left);
    } else if (room >= 0) {
      body = body.slice(body.length - room);
    } else if (overflow !== "error" && maxLength > special.length) {
      body = [];
      tail = tail.slice(0, maxLength - special.length);
    } else {
      throw new RangeError(
        `maxLength: ${maxLength} tokens cannot hold the completion (${tail.length} tokens` +
          `${eosId !== undefined ? " with EOS" : ""}${special.length ? ` plus ${special.length} special` : ""}); ` +
          `raise maxLength${overflow === "error" ? ' or set completionOverflow: "truncate"' : ""}`,
      );
    }
  }

  const promptLength = special.length + body.length;
  const n = promptLength + tail.length;
  const ids = new Int32Array(n);
  const labels = new Int32Array(n).fill(IGNORE_INDEX);
  ids.set(special, 0);
  ids.set(body, special.length);
  ids.set(tail, promptLength);
  labels.set(tail, promptLength);
  return { ids, labels, promptLength };
}
