// Readers for the on-disk data formats the tasks use, all local files: SQuAD v1.1/v2.0 JSON, DeepMind
// Mathematics question/answer text files, C4-style JSON lines with a "text" field, and generic JSONL.
// Parsers take the file's text and return plain records; templates turn records into examples later.
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, readFile } from "node:fs/promises";
import { pipeline } from "node:stream/promises";
import { createGunzip, gunzipSync } from "node:zlib";

export interface SourceText {
  text: string;
  /** SHA-256 of the bytes on disk (before gunzip), to detect a changed data file on reload. */
  sha256: string;
}

/** Whether `bytes` (a file's first two at least) start with the gzip magic bytes. */
export function isGzip(bytes: Uint8Array): boolean {
  return bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;
}

/** Reads a UTF-8 text file, gunzipping it when it starts with the gzip magic bytes (any extension). */
export async function readSource(path: string): Promise<SourceText> {
  if (typeof path !== "string" || path.length === 0) {
    throw new TypeError(`path: expected a file path, got ${JSON.stringify(path)}`);
  }
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new Error(`${path}: cannot read (${(e as Error).message})`);
  }
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  let raw = bytes;
  if (isGzip(bytes)) {
    try {
      raw = gunzipSync(bytes);
    } catch (e) {
      throw new Error(`${path}: not a valid gzip file (${(e as Error).message})`);
    }
  }
  return { text: decodeUtf8(raw, path), sha256 };
}

/**
 * A whole file's bytes as text: UTF-8, a leading byte-order mark dropped; bytes that are not UTF-8 are an
 * error naming `path` (not U+FFFD in the text).
 */
export function decodeUtf8(bytes: Uint8Array, path: string): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new NotUtf8Error(path);
  }
}

// Bytes that are not UTF-8 (a Latin-1 export, a truncated multi-byte character) would become U+FFFD in
// the examples unnoticed; Python's json.load refuses them too.
class NotUtf8Error extends Error {
  constructor(path: string) {
    super(`${path}: not valid UTF-8 text (convert it to UTF-8)`);
  }
}

export interface SourceLines {
  /** The lines, without their "\n" (or "\r\n"). */
  lines: string[];
  /** SHA-256 of the bytes on disk, as in SourceText. */
  sha256: string;
}

/**
 * Reads a UTF-8 text file line by line, gunzipping as it goes when it starts with the gzip magic bytes:
 * for line formats (JSON lines), whose files (a C4 shard decodes to hundreds of MB) may be longer than
 * the longest string JavaScript can hold.
 */
export async function readSourceLines(path: string): Promise<SourceLines> {
  if (typeof path !== "string" || path.length === 0) {
    throw new TypeError(`path: expected a file path, got ${JSON.stringify(path)}`);
  }
  const magic = Buffer.alloc(2);
  let got = 0;
  try {
    const handle = await open(path, "r");
    try {
      got = (await handle.read(magic, 0, 2, 0)).bytesRead;
    } finally {
      await handle.close();
    }
  } catch (e) {
    throw new Error(`${path}: cannot read (${(e as Error).message})`);
  }
  const gzipped = isGzip(magic.subarray(0, got));
  const hash = createHash("sha256");
  const lines: string[] = [];
  const decoder = new TextDecoder("utf-8", { fatal: true }); // streaming: a character may span chunks
  const push = (line: string) => lines.push(line.endsWith("\r") ? line.slice(0, -1) : line);
  // Only the new text is searched for line ends; a line spanning chunks is kept in pieces and joined once
  // (rescanning the partial line with each chunk was quadratic on one-line files such as JSON arrays).
  let pending: string[] = [];
  const take = (text: string) => {
    let start = 0;
    for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n", start)) {
      pending.push(text.slice(start, nl));
      push(pending.length === 1 ? pending[0]! : pending.join(""));
      pending = [];
      start = nl + 1;
    }
    if (start < text.length) pending.push(text.slice(start));
  };
  async function* hashed(source: AsyncIterable<Buffer>) {
    for await (const chunk of source) {
      hash.update(chunk);
      yield chunk;
    }
  }
  const decode = (chunk?: Buffer) => {
    try {
      return chunk ? decoder.decode(chunk, { stream: true }) : decoder.decode();
    } catch {
      throw new NotUtf8Error(path);
    }
  };
  async function split(source: AsyncIterable<Buffer>) {
    for await (const chunk of source) take(decode(chunk));
  }
  try {
    if (gzipped) await pipeline(createReadStream(path), hashed, createGunzip(), split);
    else await pipeline(createReadStream(path), hashed, split);
  } catch (e) {
    if (e instanceof NotUtf8Error) throw e;
    if (!gzipped) throw new Error(`${path}: cannot read (${(e as Error).message})`);
    // What the streaming gunzip refuses, the whole-file one may still take (zero padding after the last
    // member), as this reader did before it streamed; it names a damaged file itself.
    const whole = await readSource(path);
    const all = whole.text.split("\n");
    if (all.at(-1) === "") all.pop();
    lines.length = 0;
    for (const line of all) push(line);
    return { lines, sha256: whole.sha256 };
  }
  take(decode());
  if (pending.length > 0) push(pending.join(""));
  // A UTF-8 byte-order mark is not part of the text (TextDecoder, used for whole files, drops it too).
  if (lines[0]?.startsWith("\uFEFF")) lines[0] = lines[0].slice(1);
  return { lines, sha256: hash.digest("hex") };
}

/** One SQuAD question with its paragraph. */
export interface SquadRecord {
  id: string;
  title: string;
  context: string;
  question: string;
  /** Gold answer texts in file order (SQuAD dev sets have several; v2 unanswerable: none). */
  answers: string[];
  /** Character offsets of the answers in `context`, as stored in the file. */
  answerStarts: number[];
  /** SQuAD v2 `is_impossible`. */
  impossible: boolean;
}

function expect<T>(ok: boolean, value: T, where: string, what: string): T {
  if (!ok) throw new TypeError(`${where}: expected ${what}, got ${value === null ? "null" : typeof value}`);
  return value;
}

/**
 * Parses the official SQuAD JSON (`{version, data: [{title, paragraphs: [{context, qas}]}]}`), v1.1 or
 * v2.0. Every question is returned, unanswerable ones (v2 `is_impossible`, empty `answers`) included;
 * callers decide whether to keep them. `source` names the file in errors.
 */
export function parseSquad(text: string, source = "SQuAD JSON"): SquadRecord[] {
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch (e) {
    throw new SyntaxError(`${source}: not valid JSON (${(e as Error).message})`);
  }
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === "object" && v !== null && !Array.isArray(v);
  const data = isObject(root) ? root["data"] : undefined;
  expect(Array.isArray(data), data, `${source}: data`, "an array of articles (SQuAD format)");
  const records: SquadRecord[] = [];
  (data as unknown[]).forEach((article, a) => {
    const at = `${source}: data[${a}]`;
    expect(isObject(article), article, at, "an object");
    const art = article as Record<string, unknown>;
    const title = typeof art["title"] === "string" ? art["title"] : "";
    const paragraphs = art["paragraphs"];
    expect(Array.isArray(paragraphs), paragraphs, `${at}.paragraphs`, "an array");
    (paragraphs as unknown[]).forEach((paragraph, p) => {
      const pt = `${at}.paragraphs[${p}]`;
      expect(isObject(paragraph), paragraph, pt, "an object");
      const par = paragraph as Record<string, unknown>;
      const context = expect(typeof par["context"] === "string", par["context"], `${pt}.context`, "a string");
      const qas = par["qas"];
      expect(Array.isArray(qas), qas, `${pt}.qas`, "an array");
      (qas as unknown[]).forEach((qa, q) => {
        const qt = `${pt}.qas[${q}]`;
        expect(isObject(qa), qa, qt, "an object");
        const r = qa as Record<string, unknown>;
        const question = expect(
          typeof r["question"] === "string",
          r["question"],
          `${qt}.question`,
          "a string",
        );
        const answersRaw = r["answers"] ?? [];
        expect(Array.isArray(answersRaw), answersRaw, `${qt}.answers`, "an array");
        const answers: string[] = [];
        const answerStarts: number[] = [];
        (answersRaw as unknown[]).forEach((ans, i) => {
          const an = `${qt}.answers[${i}]`;
          expect(isObject(ans), ans, an, "an object");
          const o = ans as Record<string, unknown>;
          answers.push(expect(typeof o["text"] === "string", o["text"], `${an}.text`, "a string") as string);
          const start = o["answer_start"];
          answerStarts.push(
            expect(Number.isInteger(start), start, `${an}.answer_start`, "an integer") as number,
          );
        });
        const impossible = r["is_impossible"] === true;
        records.push({
          id: typeof r["id"] === "string" ? r["id"] : `${a}.${p}.${q}`,
          title,
          context: context as string,
          question: question as string,
          answers: impossible ? [] : answers,
          answerStarts: impossible ? [] : answerStarts,
          impossible: impossible || answers.length === 0,
        });
      });
    });
  });
  return records;
}

/** One DeepMind Mathematics question and its answer. */
export interface MathematicsRecord {
  question: string;
  answer: string;
}

/**
 * Parses a DeepMind Mathematics module file (e.g. `train-easy/arithmetic__add_or_sub.txt`): a question
 * line followed by its answer line, repeated. Trailing whitespace and CRLF line ends are tolerated.
 */
export function parseMathematics(text: string, source = "Mathematics file"): MathematicsRecord[] {
  const lines = text.split(/\r?\n/u).map((l) => l.trimEnd());
  while (lines.length > 0 && lines[lines.length - 1] === "") lines.pop();
  if (lines.length % 2 !== 0) {
    throw new RangeError(
      `${source}: ${lines.length} lines, expected question/answer pairs (an even number of lines)`,
    );
  }
  const records: MathematicsRecord[] = [];
  for (let i = 0; i < lines.length; i += 2) {
    const question = lines[i]!;
    const answer = lines[i + 1]!.trim();
    if (question.trim() === "" || answer === "") {
      throw new RangeError(`${source}: line ${question.trim() === "" ? i + 1 : i + 2} is empty`);
    }
    records.push({ question, answer });
  }
  return records;
}

/**
 * Parses JSON lines (one object per non-blank line), given as the file's text or its lines. A file whose
 * first non-blank character is "[" is read as one JSON array of objects instead, which some dumps use.
 */
export function parseJsonLines(
  input: string | readonly string[],
  source = "JSONL file",
): Record<string, unknown>[] {
  const records: Record<string, unknown>[] = [];
  const check = (v: unknown, where: string): Record<string, unknown> => {
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      throw new TypeError(
        `${where}: expected a JSON object, got ${Array.isArray(v) ? "an array" : typeof v}`,
      );
    }
    return v as Record<string, unknown>;
  };
  const first =
    typeof input === "string" ? input.trimStart() : (input.find((l) => l.trim() !== "") ?? "").trimStart();
  if (first.startsWith("[")) {
    let arr: unknown;
    try {
      arr = JSON.parse(typeof input === "string" ? input : input.join("\n"));
    } catch (e) {
      throw new SyntaxError(`${source}: not valid JSON (${(e as Error).message})`);
    }
    (arr as unknown[]).forEach((v, i) => {
      records.push(check(v, `${source}: [${i}]`));
    });
    return records;
  }
  const lines = typeof input === "string" ? input.split("\n") : input;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === "") continue;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch (e) {
      throw new SyntaxError(`${source}: line ${i + 1}: not valid JSON (${(e as Error).message})`);
    }
    records.push(check(v, `${source}: line ${i + 1}`));
  }
  return records;
}

/** C4-style documents: JSON lines with a string "text" field (other fields such as url are ignored). */
export function parseTextRecords(input: string | readonly string[], source = "C4 file"): string[] {
  return parseJsonLines(input, source).map((r, i) => {
    if (typeof r["text"] !== "string") {
      throw new TypeError(`${source}: record ${i + 1}: expected a string "text" field`);
    }
    return r["text"];
  });
}
