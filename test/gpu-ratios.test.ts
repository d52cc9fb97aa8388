// The GPU check's same-call ratio table (scripts/gpu-ratios.ts) on sample JSON lines as gpu-check.ts and the
// PyTorch peers print them: no GPU needed.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { jsonLines, ratiosFromLogs, ratiosTable, writeRatios } from "../scripts/gpu-ratios.js";

const step = (o: Record<string, unknown>) =>
  JSON.stringify({ what: "step", precision: "bf16", graphs: true, ...o });

// A priortune log: console text, tables and JSON lines mixed, as gpu-check.ts writes it.
const ourLog = [
  '{"what":"cuda","usable":true,"name":"NVIDIA H200"}',
  "== some console text",
  step({
    model: "GPT-2 124M",
    B: 8,
    S: 256,
    setup: "bf16",
    setupIndex: 0,
    lossOk: true,
    ms: 8.8,
    goalMs: 6,
    deviceMiB: 2000,
    deviceGB: 2.097152,
  }),
  step({
    model: "GPT-2 124M",
    B: 32,
    S: 512,
    setup: "bf16",
    setupIndex: 0,
    lossOk: true,
    ms: 57.5,
    goalMs: 28,
    deviceGB: 9,
  }),
  step({
    model: "GPT-2 124M",
    B: 8,
    S: 256,
    setup: "bf16 (tma GEMM)",
    setupIndex: 1,
    lossOk: true,
    ms: 8.1,
    goalMs: 6,
  }),
  // faster, but its first loss does not match the default's: not the best
  step({
    model: "GPT-2 124M",
    B: 8,
    S: 256,
    setup: "bf16 (broken)",
    setupIndex: 2,
    lossOk: false,
    ms: 1.0,
    goalMs: 6,
  }),
  // an error row (no ms)
  step({ model: "GPT-2 124M", B: 32, S: 512, setupIndex: 1, error: "boom" }),
  step({
    model: "Llama-3.2-1B shape",
    B: 8,
    S: 512,
    setup: "bf16",
    setupIndex: 0,
    lossOk: true,
    ms: 84.2,
    goalMs: 38,
    deviceGB: 12.46,
  }),
  "| model | B x S | ... a table line |",
  '{"what":"knn","workload":"160 x 50257 x 768","Q":160,"V":50257,"d":768,"metric":"cosine","path":"auto","identicalIndices":true,"maxRelScoreError":1e-7,"cudaDeviceMs":0.3,"goalMs":0.06}',
  '{"what":"knn","workload":"160 x 50257 x 768","Q":160,"V":50257,"d":768,"metric":"cosine","path":"matrix","identicalIndices":true,"maxRelScoreError":1e-7,"cudaDeviceMs":0.25,"goalMs":0.06}',
  '{"what":"knn","workload":"160 x 50257 x 768","Q":160,"V":50257,"d":768,"metric":"cosine","path":"fused","identicalIndices":false,"maxRelScoreError":1e-7,"cudaDeviceMs":0.1,"goalMs":0.06}',
  // no Q, V, d fields (an older log): taken from the workload's name
  '{"what":"knn","workload":"20 x 128256 x 2048","metric":"l2","path":"auto","identicalIndices":true,"maxRelScoreError":0,"cudaDeviceMs":0.8,"goalMs":0.15}',
  '{"what":"knn","workload":"16 x 8192 x 8192 (d = 8192)","Q":16,"V":8192,"d":8192,"metric":"cosine","path":"auto","identicalIndices":true,"maxRelScoreError":0,"cudaDeviceMs":0.2,"goalMs":null}',
  '{"what":"knn","workload":"cut short by the time lim',
].join("\n");

const gpt2Peer = [
  '{"gpu": "NVIDIA H200", "torch": "2.11"}',
  '{"what": "knn_l2_fp32", "Q": 160, "V": 50257, "d": 768, "k": 10, "ms": 0.84}',
  '{"what": "knn_cos_fp32", "Q": 160, "V": 50257, "d": 768, "k": 10, "ms": 0.681}',
  '{"what": "knn_cos_bf16", "Q": 160, "V": 50257, "d": 768, "k": 10, "ms": 0.479}',
  '{"what": "knn_cos_fp32", "Q": 4096, "V": 50257, "d": 768, "k": 10, "ms": 8.94}',
  '{"what": "knn_cdist_fp32", "Q": 160, "ms": 1.2}',
  '{"what": "pt_step_manual", "attn": "eager", "B": 8, "T": 256, "dtype": "bf16", "ms": 27.5}',
  '{"what": "pt_step_manual", "attn": "sdpa", "B": 8, "T": 256, "dtype": "tf32", "ms": 16.7}',
  '{"what": "pt_step_manual", "attn": "sdpa", "B": 32, "T": 512, "dtype": "bf16", "ms": 86.0}',
  '{"what": "pt_step_manual", "attn": "sdpa", "B": 32, "dtype": "fp32", "error": "out of memory"}',
  '{"what": "peft_prompt", "B": 32, "T": 512, "dtype": "bf16", "ms": 87.7}',
  '{"what": "peft_prefix", "B": 8, "T": 256, "dtype": "bf16", "ms": 1.0}',
  '{"what": "pt_step_compiled", "B": 8, "T": 256, "dtype": "bf16", "ms": 14.7, "compile_s": 30}',
  '{"done": true}',
].join("\n");

const llamaPeer = [
  '{"what": "knn_l2_fp32", "Q": 20, "V": 128256, "d": 2048, "ms": 0.9}',
  '{"what": "knn_l2_bf16", "Q": 20, "V": 128256, "d": 2048, "ms": 0.3}',
  '{"what": "knn_l2_tf32", "Q": 20, "V": 128256, "d": 2048, "ms": 0.5}',
  '{"what": "llama1b_pt_step", "attn": "sdpa", "B": 8, "T": 512, "mode": "tf32", "ms": 122.2, "mem_GB": 20.1}',
  '{"what": "llama1b_pt_step", "attn": "sdpa", "B": 8, "T": 512, "mode": "bf16", "ms": 63.0, "mem_GB": 15.0}',
].join("\n");

// The table's row whose first cell starts with `start`.
const rowsOf = (table: string, start: string) =>
  table
    .split("\n")
    .filter((l) => l.startsWith(`| ${start}`))
    .map((l) => l.split(" | ").map((c) => c.replace(/^\| /, "")));

describe("gpu-ratios", () => {
  it("reads the JSON lines of a log and skips the rest", () => {
    const rows = jsonLines(ourLog);
    expect(rows.filter((r) => r.what === "step")).toHaveLength(6);
    expect(rows.filter((r) => r.what === "knn")).toHaveLength(5);
    expect(jsonLines("{not json\n[1,2]\nplain")).toEqual([]);
  });

  it("sets the default and best steps against PyTorch's best row at the same B and T", () => {
    const table = ratiosTable(jsonLines(ourLog), [...jsonLines(gpt2Peer), ...jsonLines(llamaPeer)]);
    const [small] = rowsOf(table, "step, GPT-2 124M, B=8 x S=256");
    // default 8.8, best 8.1 (the broken setup is not eligible); PyTorch's best at B=8, T=256: torch.compile
    // 14.7 (peft_prefix is not a prompt-tuning peer)
    expect(small![1]).toBe("8.80");
    expect(small![2]).toBe("8.10 (bf16 (tma GEMM))");
    expect(small![3]).toBe("14.70 (pt_step_compiled bf16)");
    expect(small![4]).toBe(`${(14.7 / 8.8).toFixed(2)}x`);
    expect(small![5]).toBe(`${(14.7 / 8.1).toFixed(2)}x`);
    expect(small![6]).toBe("6");
    expect(small![7]).toBe("2.10 / - |");
    const [large] = rowsOf(table, "step, GPT-2 124M, B=32 x S=512");
    expect(large![3]).toBe("86.00 (pt_step_manual sdpa bf16)");
    const [llama] = rowsOf(table, "step, Llama-3.2-1B shape, B=8 x S=512");
    expect(llama![3]).toBe("63.00 (llama1b_pt_step sdpa bf16)");
    expect(llama![4]).toBe(`${(63 / 84.2).toFixed(2)}x`);
    // memory in GB (1e9 B) on both sides
    expect(llama![7]).toBe("12.46 / 15.00 |");
  });

  it("sets each kNN workload against each peer precision at the same Q, V, d", () => {
    const table = ratiosTable(jsonLines(ourLog), [...jsonLines(gpt2Peer), ...jsonLines(llamaPeer)]);
    const cos = rowsOf(table, "kNN top-10, 160 x 50257 x 768, cosine");
    expect(cos.map((r) => r[3])).toEqual(["0.681 (knn_cos_fp32)", "0.479 (knn_cos_bf16, not exact)"]);
    expect(cos[0]![1]).toBe("0.300");
    // the fused path is faster but not exact: the best is matrix
    expect(cos[0]![2]).toBe("0.250 (matrix)");
    expect(cos[0]![4]).toBe(`${(0.681 / 0.3).toFixed(2)}x`);
    const l2 = rowsOf(table, "kNN top-10, 20 x 128256 x 2048, l2");
    expect(l2.map((r) => r[3])).toEqual([
      "0.900 (knn_l2_fp32)",
      "0.500 (knn_l2_tf32, not exact)",
      "0.300 (knn_l2_bf16, not exact)",
    ]);
    const [alone] = rowsOf(table, "kNN top-10, 16 x 8192 x 8192, cosine");
    expect(alone![3]).toBe("no PyTorch row at this Q, V, d in this call");
  });

  it("says so when rows or peers are missing", () => {
    const table = ratiosTable([], [], ["a note"]);
    expect(table).toContain("no step rows in this call");
    expect(table).toContain("no kNN rows in this call");
    expect(table).toContain("- a note");
    const noPeer = ratiosTable(jsonLines(ourLog), []);
    expect(noPeer).toContain("no PyTorch row at B=8, T=256 in this call");
  });

  it("reads the logs where gpu-check.sh's part writes them and never throws", () => {
    const dir = mkdtempSync(join(tmpdir(), "gpu-ratios-"));
    try {
      writeFileSync(join(dir, "priortune-knn.log"), ourLog);
      writeFileSync(join(dir, "gpu_peer.log"), gpt2Peer);
      // a stale or unrelated log is not read (the ncu runs repeat the kNN rows under a profiler)
      writeFileSync(join(dir, "ncu-knn.log"), ourLog.replaceAll('"cudaDeviceMs":0.3', '"cudaDeviceMs":99'));
      const table = ratiosFromLogs(dir);
      expect(table).toContain("gpu_peer.log: 14 JSON rows, 1 with an error");
      expect(table).toContain("gpu_peer_llama.log: not found");
      expect(table).toContain("priortune logs: priortune-knn.log");
      expect(table).not.toContain("99.000");
      const results = join(dir, "results.md");
      writeRatios(dir, results);
      expect(readFileSync(results, "utf8")).toContain("Same-call ratios");
      // a missing folder is a note, not an error
      expect(ratiosFromLogs(join(dir, "none"))).toContain("no log folder");
      writeRatios(join(dir, "none"), join(dir, "no-such-dir", "results.md"));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
