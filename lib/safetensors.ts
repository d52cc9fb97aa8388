// Safetensors headers: the 8-byte little-endian header length, a JSON header of
// { name: { dtype, shape, data_offsets: [begin, end] } } (offsets relative to the end of the header), then
// the raw little-endian data. Tensor bytes are read by the native loader straight into the model's fp32
// storage (one copy of the weights in memory), by readTensorFloat32 (one tensor, e.g. the vocabulary
// matrix without the rest of the model), or by readTensors for small files such as test fixtures.
import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { fileError, fsyncFile, readJsonFile, replaceWith, writeAll } from "./files.js";

export type SafetensorsDType = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

const DTYPE_BYTES: Record<string, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  F8_E4M3: 1,
  F8_E5M2: 1,
  F8_E8M0: 1,
  C64: 8,
};

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  file: string;
  /** Absolute byte offset of the tensor's data in `file`. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

export function readSafetensorsHeader(file: string): SafetensorsHeader {
  const fd = openSync(file, "r");
  try {
    const size = fstatSync(fd).size;
    const lenBuf = Buffer.alloc(8);
    if (size < 8 || readSync(fd, lenBuf, 0, 8, 0) !== 8)
      throw new Error(`${file}: not a safetensors file (too short)`);
    const headerLen = Number(lenBuf.readBigUInt64LE(0));
    if (headerLen <= 0 || headerLen > 100 * 2 ** 20 || 8 + headerLen > size) {
      throw new Error(`${file}: not a safetensors file (header length ${headerLen} for a ${size}-byte file)`);
    }
    const headerBuf = Buffer.alloc(headerLen);
    readSync(fd, headerBuf, 0, headerLen, 8);
    let json: unknown;
    try {
      json = JSON.parse(headerBuf.toString("utf8"));
    } catch (e) {
      throw new Error(`${file}: safetensors header is not valid JSON (${(e as Error).message})`);
    }
    if (json === null || typeof json !== "object" || Array.isArray(json))
      throw new Error(`${file}: safetensors header is not a JSON object`);
    const dataStart = 8 + headerLen;
    const dataSize = size - dataStart;
    const tensors = new Map<string, TensorInfo>();
    let metadata: Record<string, string> = {};
    const isCount = (x: unknown): x is number => Number.isSafeInteger(x) && (x as number) >= 0;
    for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
      if (name === "__metadata__") {
        if (
          value === null ||
          typeof value !== "object" ||
          Array.isArray(value) ||
          !Object.values(value).every((v) => typeof v === "string")
        )
          throw new Error(`${file}: safetensors __metadata__ is not an object of strings`);
        metadata = value as Record<string, string>;
        continue;
      }
      const bad = (why: string) => new Error(`${file}: tensor '${name}': ${why}`);
      if (value === null || typeof value !== "object")
        throw bad("not an object of dtype, shape, data_offsets");
      const v = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      if (typeof v.dtype !== "string") throw bad(`dtype ${JSON.stringify(v.dtype)} is not a string`);
      if (!Array.isArray(v.shape) || !v.shape.every(isCount))
        throw bad(`shape ${JSON.stringify(v.shape)} is not a list of non-negative integers`);
      const offsets = v.data_offsets;
      if (
        !Array.isArray(offsets) ||
        offsets.length !== 2 ||
        !offsets.every(isCount) ||
        offsets[0] > offsets[1]
      )
        throw bad(`data_offsets ${JSON.stringify(offsets)} is not [begin, end] with 0 <= begin <= end`);
      const [begin, end] = offsets as [number, number];
      const shape = v.shape as number[];
      // An unknown dtype is kept (a tensor the model does not use may have one; the load plan refuses it
      // where it is needed); its bytes are still checked against the layout below.
      const bytes = DTYPE_BYTES[v.dtype];
      const count = shape.reduce((a, b) => a * b, 1);
      if (
        end > dataSize ||
        (bytes !== undefined && (!Number.isSafeInteger(count * bytes) || end - begin !== count * bytes))
      )
        throw bad(
          `${v.dtype} [${shape}] does not match data_offsets [${begin}, ${end}] in ${dataSize} bytes of data`,
        );
      tensors.set(name, {
        name,
        dtype: v.dtype,
        shape: v.shape,
        file,
        offset: dataStart + begin,
        byteLength: end - begin,
      });
    }
    // As the reference loader: the tensors tile the data exactly, in offset order, with no gap or overlap
    // (an overlap would alias two tensors' bytes; a gap is a sign of a damaged or duplicated entry).
    let at = 0;
    const layout = [...tensors.values()].sort((a, b) => a.offset - b.offset || a.byteLength - b.byteLength);
    for (const t of layout) {
      if (t.offset - dataStart !== at)
        throw new Error(
          `${file}: tensor '${t.name}' starts at data byte ${t.offset - dataStart}, expected ${at} (tensors must tile the data without gaps or overlaps)`,
        );
      at += t.byteLength;
    }
    if (at !== dataSize)
      throw new Error(`${file}: the tensors cover ${at} of the ${dataSize} data bytes after the header`);
    return { tensors, metadata };
  } finally {
    closeSync(fd);
  }
}

/**
 * All tensors of a Hugging Face model directory: model.safetensors, else a sharded index (the order
 * Transformers loads them in). Each tensor comes from the shard the index's weight_map names; one that
 * another shard also holds is an error.
 */
export function listModelTensors(dir: string): Map<string, TensorInfo> {
  const single = join(dir, "model.safetensors");
  const index = join(dir, "model.safetensors.index.json");
  if (existsSync(single)) return readSafetensorsHeader(single).tensors;
  if (existsSync(index)) {
    const parsed = readJsonFile(index) as { weight_map?: unknown } | null;
    const weightMap = parsed?.weight_map as Record<string, string> | undefined;
    if (
      !weightMap ||
      typeof weightMap !== "object" ||
      Object.values(weightMap).some((v) => typeof v !== "string")
    )
      throw new Error(`${index}: missing "weight_map" (an object of tensor name to shard file)`);
    const shards = new Map<string, Map<string, TensorInfo>>();
    for (const shard of new Set(Object.values(weightMap))) {
      const path = join(dir, shard);
      if (!existsSync(path)) throw new Error(`${index} names shard ${shard}, which does not exist in ${dir}`);
      shards.set(shard, readSafetensorsHeader(path).tensors);
    }
    const all = new Map<string, TensorInfo>();
    for (const [shard, tensors] of shards)
      for (const [name, info] of tensors) {
        const mapped = weightMap[name];
        if (mapped !== undefined && mapped !== shard) {
          throw new Error(
            `${index} maps tensor '${name}' to ${mapped}, but ${shard} holds it too: which copy is meant is unclear`,
          );
        }
        if (all.has(name))
          throw new Error(
            `${dir}: tensor '${name}' is in two shards (${all.get(name)!.file} and ${info.file})`,
          );
        all.set(name, info);
      }
    for (const name of Object.keys(weightMap)) {
      if (!all.has(name))
        throw new Error(`${index} maps tensor '${name}' to ${weightMap[name]}, which does not hold it`);
    }
    return all;
  }
  throw new Error(
    `${dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)`,
  );
}

export type TensorData = Float64Array | Float32Array | Int32Array | Uint8Array | BigInt64Array;

/** Reads every tensor of a (small) safetensors file into typed arrays; F16/BF16 are widened to Float32Array. */
export function readTensors(file: string): {
  tensors: Map<string, { shape: number[]; data: TensorData }>;
  metadata: Record<string, string>;
} {
  const { tensors, metadata } = readSafetensorsHeader(file);
  const buf = readFileSync(file);
  const out = new Map<string, { shape: number[]; data: TensorData }>();
  for (const [name, t] of tensors) {
    const bytes = buf.subarray(t.offset, t.offset + t.byteLength);
    const copy = new Uint8Array(bytes).buffer; // aligned copy
    let data: TensorData;
    switch (t.dtype) {
      case "F64":
        data = new Float64Array(copy);
        break;
      case "F32":
        data = new Float32Array(copy);
        break;
      case "I32":
        data = new Int32Array(copy);
        break;
      case "I64":
        data = new BigInt64Array(copy);
        break;
      case "U8":
      case "BOOL":
        data = new Uint8Array(copy);
        break;
      case "F16":
      case "BF16":
        data = widenHalf(new Uint16Array(copy), t.dtype);
        break;
      default:
        throw new Error(`${file}: readTensors does not support dtype ${t.dtype} (tensor '${name}')`);
    }
    out.set(name, { shape: t.shape, data });
  }
  return { tensors: out, metadata };
}

function widenHalf(src: Uint16Array, dtype: "F16" | "BF16"): Float32Array {
  const out = new Float32Array(src.length);
  widenHalfInto(src, dtype, out, 0);
  return out;
}

/**
 * F16 / BF16 bits to fp32 at out[at..], bit for bit as the native loader converts them (kernels/cpu/model.cpp
 * f16_to_f32: a NaN keeps its payload), so a tensor read here equals the loaded model's copy.
 */
function widenHalfInto(src: Uint16Array, dtype: "F16" | "BF16", out: Float32Array, at: number): void {
  const u32 = new Uint32Array(out.buffer, out.byteOffset + 4 * at, src.length);
  if (dtype === "BF16") {
    for (let i = 0; i < src.length; i++) u32[i] = src[i]! << 16;
    return;
  }
  for (let i = 0; i < src.length; i++) {
    const h = src[i]!;
    const sign = (h & 0x8000) << 16;
    const exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    if (exp === 0x1f) u32[i] = sign | 0x7f800000 | (man << 13);
    else if (exp !== 0) u32[i] = sign | ((exp + 112) << 23) | (man << 13);
    else if (man === 0) u32[i] = sign;
    else {
      // A subnormal half is a normal float: shift the mantissa up to its leading 1, lowering the exponent.
      let e = -1;
      do {
        e++;
        man <<= 1;
      } while ((man & 0x400) === 0);
      u32[i] = sign | ((112 - e) << 23) | ((man & 0x3ff) << 13);
    }
  }
}

// Bytes per positioned read of readTensorFloat32: bounded memory beside the fp32 result.
const READ_CHUNK_BYTES = 16 << 20;

/** readSync until `bytes` is full (one read(2) stops at 2 GiB - 4 KiB; a short file is an error). */
function readAllAt(fd: number, bytes: Uint8Array, position: number, file: string): void {
  for (let done = 0; done < bytes.byteLength; ) {
    const got = readSync(fd, bytes, done, Math.min(bytes.byteLength - done, 1 << 30), position + done);
    if (got === 0)
      throw new Error(`cannot read ${file} at byte ${position + done}: file is shorter than its header says`);
    done += got;
  }
}

/**
 * One weight tensor as fp32, read with positioned reads of its own bytes only (a model's vocabulary matrix
 * without the rest of its shard). F32, F16, BF16 and F64 are converted as the native loader converts them
 * (F64 rounded to the nearest float), so the values equal a loaded model's; as there, a NaN or infinite
 * value is an error (a damaged file).
 */
export function readTensorFloat32(t: TensorInfo): Float32Array {
  const dtype = t.dtype;
  if (dtype !== "F32" && dtype !== "F16" && dtype !== "BF16" && dtype !== "F64")
    throw new Error(`${t.file}: tensor '${t.name}' has dtype ${dtype}; expected F32, F16, BF16 or F64`);
  const bytesPer = DTYPE_BYTES[dtype]!;
  const out = new Float32Array(t.byteLength / bytesPer);
  const fd = openSync(t.file, "r");
  try {
    if (dtype === "F32") {
      readAllAt(fd, new Uint8Array(out.buffer), t.offset, t.file);
    } else {
      // A chunk of whole values, in its own (aligned) buffer so that it can be viewed as 16- or 64-bit values.
      const chunk = new Uint8Array(Math.min(t.byteLength, READ_CHUNK_BYTES));
      for (let done = 0; done < t.byteLength; ) {
        const bytes = chunk.subarray(0, Math.min(chunk.byteLength, t.byteLength - done));
        readAllAt(fd, bytes, t.offset + done, t.file);
        const at = done / bytesPer;
        if (dtype === "F64") out.set(new Float64Array(bytes.buffer, 0, bytes.byteLength / 8), at);
        else widenHalfInto(new Uint16Array(bytes.buffer, 0, bytes.byteLength / 2), dtype, out, at);
        done += bytes.byteLength;
      }
    }
  } catch (e) {
    throw fileError(e, t.file); // a failed read(2) names no file
  } finally {
    closeSync(fd);
  }
  // NaN and infinities are the floats whose exponent bits are all ones (an integer test, quicker than
  // Number.isFinite over a vocabulary matrix).
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++)
    if ((bits[i]! & 0x7f800000) === 0x7f800000) {
      const cols = t.shape.length === 2 ? t.shape[1]! : 0;
      const at = cols > 0 ? `[${Math.floor(i / cols)}, ${i % cols}]` : `index ${i}`;
      throw new Error(
        `tensor '${t.name}' in ${t.file}: value ${Number.isNaN(out[i]) ? "NaN" : "infinite"} at ${at} (weights must be finite: the file is damaged)`,
      );
    }
  return out;
}

export interface TensorToWrite {
  name: string;
  dtype: "F32" | "F64" | "I32" | "U8";
  shape: number[];
  data: Float32Array | Float64Array | Int32Array | Uint8Array;
}

/** writeSafetensors to a temporary file beside `file`, flushed, then renamed over it: old or new, never torn. */
export function writeSafetensorsAtomic(
  file: string,
  tensors: TensorToWrite[],
  metadata: Record<string, string> = {},
): void {
  replaceWith(file, (tmp) => {
    writeSafetensors(tmp, tensors, metadata);
    fsyncFile(tmp);
  });
}

/**
 * Writes a safetensors file, tensor by tensor (no second copy of the data in memory). The header is
 * padded with spaces to a multiple of 8 bytes, as the format recommends, and keys are written sorted.
 */
export function writeSafetensors(
  file: string,
  tensors: TensorToWrite[],
  metadata: Record<string, string> = {},
): void {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  const sorted = [...tensors].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const t of sorted) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length)
      throw new Error(
        `writeSafetensors: tensor '${t.name}' has ${t.data.length} values for shape [${t.shape}]`,
      );
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
  const fd = openSync(file, "w");
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    writeAll(fd, len);
    writeAll(fd, Buffer.from(json, "utf8"));
    for (const t of sorted) writeAll(fd, new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  } catch (e) {
    throw fileError(e, file);
  } finally {
    closeSync(fd);
  }
}
