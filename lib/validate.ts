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
