// Argument checks with messages that name the argument, the expected type and what was received.

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return `Array(${v.length})`;
  if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${(v as unknown as { length: number }).length})`;
  if (typeof v === "object") return (v as object).constructor?.name ?? "object";
  return `${typeof v} ${String(v)}`;
}

function typed<T>(v: unknown, name: string, ctor: { new (n: number): T; name: string }, length?: number): T {
  if (!(v instanceof (ctor as unknown as new () => T))) {
    throw new TypeError(`${name}: expected a ${ctor.name}, got ${describe(v)}`);
  }
  const n = (v as unknown as { length: number }).length;
  if (length !== undefined && n !== length) {
    throw new RangeError(`${name}: expected ${length} elements, got ${n}`);
  }
  return v;
}

export const requireFloat32 = (v: unknown, name: string, length?: number): Float32Array =>
  typed(v, name, Float32Array, length);
export const requireInt32 = (v: unknown, name: string, length?: number): Int32Array =>
  typed(v, name, Int32Array, length);
export const requireUint8 = (v: unknown, name: string, length?: number): Uint8Array =>
  typed(v, name, Uint8Array, length);

/** A thread count: 1 to 1024 (the native side refuses more: OpenMP would end the process). */
export function requireThreads(v: unknown, name: string): number {
  if (typeof v !== "number" || !Number.isInteger(v))
    throw new TypeError(`${name}: expected an integer from 1 to 1024, got ${describe(v)}`);
  if (v < 1) throw new RangeError(`${name}: expected at least 1, got ${v}`);
  if (v > 1024) throw new RangeError(`${name}: expected at most 1024, got ${v}`);
  return v;
}

/** A `threads` option: `fallback` when it is undefined, else a count checked by requireThreads. */
export function threadsOr(v: unknown, fallback: number, name = "threads"): number {
  return v === undefined ? fallback : requireThreads(v, name);
}

export function requirePositiveInt(v: unknown, name: string): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) {
    throw new TypeError(`${name}: expected a positive integer, got ${describe(v)}`);
  }
  return v;
}

/** Token ids must lie in [0, vocabSize). */
export function checkTokenIds(ids: Int32Array, vocabSize: number, name: string): void {
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i]!;
    if (id < 0 || id >= vocabSize)
      throw new RangeError(`${name}[${i}] = ${id} is outside the vocabulary [0, ${vocabSize})`);
  }
}

/** Labels are token ids or -100 (ignored). */
export function checkLabels(labels: Int32Array, vocabSize: number, name: string): void {
  for (let i = 0; i < labels.length; i++) {
    const t = labels[i]!;
    if (t !== -100 && (t < 0 || t >= vocabSize))
      throw new RangeError(`${name}[${i}] = ${t} is neither -100 nor inside the vocabulary`);
  }
}

/**
 * The known keys of an options object, tied to its type: `{ a: true, b: true } satisfies OptionKeys<Opts>`
 * fails to compile when the list and the interface drift apart.
 */
export type OptionKeys<T> = Record<keyof T, true>;

// Names that other functions of this package use for the same thing: a key of one group, unknown where it
// was given, suggests the group's known name.
const ALIASES: readonly (readonly string[])[] = [
  ["lr", "learningRate", "learning_rate"],
  ["clipNorm", "maxGradNorm"],
  ["jitter", "covarianceJitter", "ridgeRelative"],
  ["promptLength", "promptLen"],
  ["maxLength", "maxLen"],
  ["warmupSteps", "warmup"],
  ["maxVocabularyPoints", "maxVocabPoints"],
];

const camelCase = (s: string): string => s.replace(/[_-]+([a-zA-Z0-9])/g, (_m, c: string) => c.toUpperCase());

function editDistance(a: string, b: string): number {
  const prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0]!;
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const up = prev[j]!;
      prev[j] = Math.min(up + 1, prev[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = up;
    }
  }
  return prev[b.length]!;
}

/** The known key an unknown `key` was probably meant as, if any. */
export function suggestKey(key: string, known: readonly string[]): string | undefined {
  for (const group of ALIASES)
    if (group.includes(key)) {
      const hit = group.find((k) => k !== key && known.includes(k));
      if (hit) return hit;
    }
  const lower = key.toLowerCase();
  const same = known.find((k) => k.toLowerCase() === lower);
  if (same) return same;
  const camel = camelCase(key).toLowerCase();
  const snake = known.find((k) => k.toLowerCase() === camel);
  if (snake) return snake;
  // Other libraries' spellings: scikit-learn's and umap-js's n_components / nNeighbors, abbreviations
  // (maxIter for maxIterations).
  const bare = camelCase(key)
    .replace(/^(n|num)(?=[A-Z])/, "")
    .toLowerCase();
  const plain = known.find((k) => k.toLowerCase() === bare);
  if (plain) return plain;
  if (bare.length >= 3) {
    const prefixed = known.filter((k) => k.toLowerCase().startsWith(bare));
    if (prefixed.length === 1) return prefixed[0];
  }
  let best: string | undefined;
  let bestDistance = 3;
  for (const k of known) {
    const d = editDistance(lower, k.toLowerCase());
    if (d < bestDistance) {
      best = k;
      bestDistance = d;
    }
  }
  return best;
}

/**
 * An options argument: undefined gives {}; anything but a plain object (null, an array, a string, a number,
 * a function) is a TypeError naming `name`; a key not in `known` is a TypeError naming it, with the known
 * keys and a close match when there is one. Keys whose value is undefined are checked too (a misspelt key
 * is refused whatever its value); known keys set to undefined mean their default, as left out.
 */
export function checkOptions<T extends object>(
  value: T | undefined,
  name: string,
  known: OptionKeys<T> | Readonly<Record<string, true>>,
): T {
  if (value === undefined) return {} as T;
  if (value === null || typeof value !== "object" || Array.isArray(value) || ArrayBuffer.isView(value))
    throw new TypeError(`${name}: expected an object, got ${describe(value)}`);
  const names = Object.keys(known);
  for (const key of Object.keys(value)) {
    if (Object.hasOwn(known, key)) continue;
    const hint = suggestKey(key, names);
    throw new TypeError(
      `${name}: unknown option ${JSON.stringify(key)}${hint ? ` (did you mean ${JSON.stringify(hint)}?)` : ""}; ` +
        `known: ${names.join(", ")}`,
    );
  }
  return value;
}

/** A copy of `value` without the keys whose value is undefined (so that spreading it keeps defaults). */
export function definedOnly<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** A required object argument (no default): a TypeError naming it otherwise. */
export function requireObject(value: unknown, name: string): void {
  if (value === null || typeof value !== "object" || Array.isArray(value))
    throw new TypeError(
      `${name}: expected an object, got ${value === undefined ? "undefined" : describe(value)}`,
    );
}

/** checkOptions for an options argument that has no default: undefined is refused as well. */
export function checkRequiredOptions<T extends object>(
  value: T,
  name: string,
  known: OptionKeys<T> | Readonly<Record<string, true>>,
): T {
  requireObject(value, name);
  return checkOptions(value, name, known);
}
