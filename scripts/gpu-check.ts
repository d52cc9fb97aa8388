// The GPU check, run on a machine with an NVIDIA GPU (see scripts/gpu-check.sh, which bundles this file with
// esbuild so it needs no node_modules there). Sections, each optional by name on the command line
// (default: all but wgmma, tma and async, which run only when named, first):
//   checks  every CUDA op against the CPU reference and the whole-model checks of test/cuda-checks.ts
//   gemm    the device GEMM's throughput per precision, ours and cuBLASLt's where the machine has it (loaded at
//           run time), each checked against our fp32 GEMM (bf16: both on operands converted before timing, so
//           the same work); the bf16 8192^3 peaks are MFU's denominators
//   steps   full prompt-tuning steps (loss + prompt gradients + AdamW, P = 20) on issue #5's shapes with
//           synthetic weights: median wall-clock ms per step (graph replay), tokens/s, MFU, device memory
//   generate greedy decoding on the device (bf16 cached and re-forward, fp32) against the CPU model, at the
//           steps' model shapes
//   knn     the CUDA kNN index against the CPU index on issue #4's shapes, and its timings (device time: the
//           query preparation, screening and finalize kernels, by CUDA events)
//   wgmma   the Hopper wgmma GEMM kernel's correctness alone (the GEMM self-test, which covers it, the
//           attention self-test's bf16 rows and the model-level kernel comparison), so that gpu-check.sh can
//           run it first in its own process and keep it out of the other groups (PRIORTUNE_CUDA_WGMMA=0) if
//           it fails or faults
//   tma     the same for the TMA-fed wgmma kernel (PRIORTUNE_CUDA_TMA=0 keeps it out after a failure)
//   async   the same for the cp.async attention kernels, fp32-staged (PRIORTUNE_CUDA_ATTN=async) and on bf16
//           copies of the operands (=bf16) (PRIORTUNE_CUDA_ATTN_ASYNC=0 keeps both out)
// Prints JSON lines and Markdown tables (also appended to FILE with --results FILE); exits non-zero when a
// correctness check fails, 2 without a usable CUDA device (results.md then says why).
// `ratios --logs DIR [--results FILE]` is another mode, with no device: the same-call ratio table from the
// groups' logs (scripts/gpu-ratios.ts), which gpu-check.sh appends to results.md after all groups.
// --tiny runs every section on small shapes: a dry run of the whole script, which scripts/cuda-emu.mjs does
// under the CPU emulator so that the bundle carried to a GPU machine has already run end to end.

import { appendFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { type ModelConfig, nativeConfig, parseConfig } from "../lib/config.js";
import { VocabIndex } from "../lib/knn.js";
import { addon, type CudaPrecision, type NativeModel } from "../lib/native.js";
import { allCudaChecks, type CheckRow } from "../test/cuda-checks.js";
import { withEnv, withEnvs } from "../test/helpers.js";
import { writeRatios } from "./gpu-ratios.js";

const argv = process.argv.slice(2);
const resultsAt = argv.indexOf("--results");
// --results FILE: the Markdown tables are also appended to FILE.
const resultsFile = resultsAt >= 0 ? argv[resultsAt + 1] : undefined;
// The ratios mode: no device and no addon needed; it always exits 0 (a missing log is a note in the table).
if (argv[0] === "ratios") {
  const logsAt = argv.indexOf("--logs");
  writeRatios(logsAt >= 0 ? argv[logsAt + 1]! : "/tmp/gpu-check-logs", resultsFile);
  process.exit(0);
}
// Without the addon or a usable device nothing below can run: results.md says why (else a device call's
// results.md would be missing or silent), and the exit status 2 tells gpu-check.sh to skip the other groups.
function noDevice(reason: string): never {
  const note = `no usable CUDA device: ${reason}`;
  console.log(note);
  if (resultsFile) appendFileSync(resultsFile, `${note}\n\n`);
  process.exit(2);
}
const native = (() => {
  try {
    return addon();
  } catch (e) {
    return noDevice(`the addon did not load: ${String(e)}`);
  }
})();
const info = native.cudaInfo();
console.log(JSON.stringify({ what: "cuda", ...info }));
if (!info.usable) noDevice(info.reason);
const tiny = process.argv.includes("--tiny");
// --quick: knn runs its first workload only (cosine, the default path, a few searches, no CPU timing or
// self-search), e.g. under a profiler.
const quick = process.argv.includes("--quick");
const wanted = new Set(argv.filter((a, i) => !a.startsWith("--") && (resultsAt < 0 || i !== resultsAt + 1)));
const want = (s: string) => wanted.size === 0 || wanted.has(s);
const tables: string[] = [];
// Each table goes to --results as soon as its section ends (a later section's time limit cannot lose it),
// and at the end all of them to the console.
function emit(table: string) {
  tables.push(table);
  if (resultsFile) appendFileSync(resultsFile, `${table}\n\n`);
}
// The table of the section running now, as far as it got: written when gpu-check.sh's time limit stops this
// process (timeout sends SIGTERM; Node runs the handler between native calls) or an error ends it early.
let partial: (() => string) | undefined;
function flushPartial(why: string) {
  const t = partial?.();
  partial = undefined;
  if (t === undefined) return;
  const note = `${t}\n(${why}: the rows above are those that finished)`;
  console.log(`\n${note}`);
  if (resultsFile) appendFileSync(resultsFile, `${note}\n\n`);
}
process.on("SIGTERM", () => {
  flushPartial("stopped by the time limit");
  process.exit(124);
});
process.on("exit", () => flushPartial("stopped by an error"));
const switches = [
  "PRIORTUNE_CUDA_WGMMA",
  "PRIORTUNE_CUDA_TMA",
  "PRIORTUNE_CUDA_ATTN_ASYNC",
  "PRIORTUNE_CUDA_GEMM",
  "PRIORTUNE_CUDA_ATTN",
]
  .filter((k) => process.env[k] !== undefined)
  .map((k) => `${k}=${process.env[k]}`);
emit(
  `${info.name}, compute capability ${info.computeCapability}; sections: ${[...wanted].join(", ") || "all"}` +
    `${switches.length ? `; kill switches / settings: ${switches.join(" ")}` : ""}` +
    `${tiny ? " (--tiny: small shapes under the shapes' names)" : ""}`,
);
let failed = false;

function random(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = scale * (s / 4294967296 - 0.5);
  }
  return out;
}

function medianOf(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function median(fn: () => Promise<unknown>, runs: number, warm = 1): Promise<number> {
  for (let i = 0; i < warm; i++) await fn();
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  return medianOf(times);
}

// The wgmma kernel's rows (GEMM engines, step setups): on Hopper, unless PRIORTUNE_CUDA_WGMMA=0 keeps it off.
const wgmmaRuns = info.computeCapability.startsWith("9.") && process.env.PRIORTUNE_CUDA_WGMMA !== "0";
// The TMA-fed one's, unless PRIORTUNE_CUDA_TMA=0 keeps it off too (gpu-check.sh, after its tma group failed).
const tmaRuns = wgmmaRuns && process.env.PRIORTUNE_CUDA_TMA !== "0";
// The cp.async attention kernels' (staged, bf16 copies), unless PRIORTUNE_CUDA_ATTN_ASYNC=0 (gpu-check.sh, after
// its group failed).
const asyncRuns = process.env.PRIORTUNE_CUDA_ATTN_ASYNC !== "0";

// ---- wgmma, tma, async ----
// The kernels not yet proven on hardware, each alone in its own process under gpu-check.sh: wgmma (the
// cp.async-fed kernel, auto's choice on Hopper, and the attention kernels' bf16 self-test rows) with the
// TMA-fed kernel and the cp.async-staged attention kept off (PRIORTUNE_CUDA_TMA=0, PRIORTUNE_CUDA_ATTN_ASYNC=0,
// so that a fault or hang of theirs cannot take the wgmma rows down), then tma, then async (the cp.async
// attention kernels, fp32-staged and on bf16 copies, on any GPU).
for (const section of ["wgmma", "tma", "async"] as const) {
  if (!want(section) || wanted.size === 0) continue;
  if (section === "wgmma" ? !wgmmaRuns : section === "tma" ? !tmaRuns : !asyncRuns) {
    console.log(
      `${section}: not run (compute capability ${info.computeCapability}, or PRIORTUNE_CUDA_WGMMA=0 / PRIORTUNE_CUDA_TMA=0 / PRIORTUNE_CUDA_ATTN_ASYNC=0)`,
    );
    continue;
  }
  const { cudaSelfTest } = await import("../lib/backend.js");
  const { gemmKernelChecks } = await import("../test/cuda-checks.js");
  // --tiny (the emulated dry run) skips the GEMM self-test, which the emulator's own self-test section runs.
  const gemm = tiny
    ? []
    : (await cudaSelfTest({ parts: ["gemm", "attention"] })).filter(
        (c) => c.op.startsWith("gemm bf16") || /^attention.* bf16/.test(c.op),
      );
  const rows = [
    ...gemm.map((c) => ({
      group: "gemm self-test",
      name: `${c.op} ${c.shape}`,
      err: c.err,
      tol: c.tol,
      pass: c.pass,
    })),
    ...(await gemmKernelChecks()),
  ];
  const tma = (name: string) => /tma/i.test(name);
  const asy = (name: string) => /async|attention (on )?bf16 copies/.test(name);
  const mine = rows.filter((r) =>
    section === "tma"
      ? tma(r.name)
      : section === "async"
        ? asy(r.name)
        : (/wgmma/.test(r.name) && !tma(r.name)) || (r.name.startsWith("attention") && !asy(r.name)),
  );
  const bad = rows.filter((r) => !r.pass);
  for (const r of mine) console.log(JSON.stringify({ what: section, ...r }));
  // Only this section's kernels decide its exit status (gpu-check.sh turns a failure into a kill switch for
  // the groups after it); the other failures are listed, and the checks group counts them.
  failed ||= mine.some((r) => !r.pass);
  emit(
    `${section}: ${mine.filter((r) => r.pass).length} of ${mine.length} ${section} checks pass (${bad.length} failures of ${rows.length} GEMM checks)\n` +
      bad.map((r) => `- ${r.group}: ${r.name}: ${r.err.toExponential(2)} (tol ${r.tol})`).join("\n"),
  );
}

// ---- checks ----
if (want("checks")) {
  const rows: CheckRow[] = await allCudaChecks((r) => console.log(JSON.stringify({ what: "check", ...r })));
  failed ||= rows.some((r) => !r.pass);
  const bad = rows.filter((r) => !r.pass);
  emit(`CUDA checks: ${rows.length - bad.length} of ${rows.length} pass`);
  emit(
    "| group | check | error | tolerance | pass |\n|---|---|---|---|---|\n" +
      rows
        .map(
          (r) =>
            `| ${r.group} | ${r.name} | ${r.err.toExponential(2)} | ${r.tol} | ${r.pass ? "yes" : `**NO** ${r.note ?? ""}`} |`,
        )
        .join("\n"),
  );
}

// ---- gemm ----
// bf16 8192^3 TFLOP/s per engine: the peaks model FLOP utilisation is reported against (cuBLASLt's when the
// machine has it, the stricter denominator).
const peak: Record<string, number> = { priortune: Number.NaN, cublaslt: Number.NaN };
// The two peaks alone (the steps section's MFU when the gemm section runs in another process).
async function measurePeaks() {
  const n = tiny ? 128 : 8192;
  for (const engine of ["priortune", "cublaslt"] as const) {
    try {
      const r = await native.cudaGemmBench("bf16", n, n, n, tiny ? 2 : 10, engine, "nt");
      peak[engine] = (2 * n ** 3) / r.ms / 1e9;
    } catch (e) {
      console.log(JSON.stringify({ what: "peak", engine, error: String(e) }));
    }
  }
  console.log(JSON.stringify({ what: "peak", ...peak }));
}
if (want("gemm")) {
  const lines: string[] = [];
  let cublasLt = "";
  const gemmTable = () =>
    `Device GEMM, ours and cuBLASLt (${cublasLt || "not run"}); bf16: both engines on operands converted before the timed calls (the product alone); error vs our fp32 GEMM on the same operands\n` +
    `| shape | precision | engine | ms | TFLOP/s | max rel. error |\n|---|---|---|---|---|---|\n${lines.join("\n")}`;
  partial = gemmTable;
  // NT: C = A B^T (forward products, B the weight [N, K]); NN: C = A B (input gradients, B the weight [K, N]).
  const shapes: [string, number, number, number, "nt" | "nn"][] = tiny
    ? [
        ["8192^3", 128, 128, 128, "nt"], // stands in for the peak shape
        ["odd", 70, 130, 40, "nt"],
        ["odd NN", 70, 130, 40, "nn"],
      ]
    : [
        ["8192^3", 8192, 8192, 8192, "nt"],
        ["8192^3 NN", 8192, 8192, 8192, "nn"],
        ["GPT-2 fc, 8 x 256 rows", 2048, 3072, 768, "nt"],
        ["GPT-2 qkv, 32 x 512 rows", 16384, 2304, 768, "nt"],
        ["GPT-2 qkv input grad (NN), 32 x 512 rows", 16384, 768, 2304, "nn"],
        ["Llama-1B fc, 8 x 512 rows", 4096, 16384, 2048, "nt"],
        ["Llama-1B down input grad (NN), 8 x 512 rows", 4096, 8192, 2048, "nn"],
        ["LM head 128256, 512 rows", 512, 128256, 2048, "nt"],
        // Few rows (32-row tiles): the kNN matrix path's screening of 20 queries, a prompt's P = 20 rows.
        ["20 rows x 128256 x 2048", 20, 128256, 2048, "nt"],
      ];
  // Error against our fp32 GEMM on the same operands: bf16 operands are exact, so only the summation order
  // differs; tf32 rounds the operands (2^-11 relative).
  const gemmTol: Record<CudaPrecision, number> = { bf16: 1e-4, tf32: 3e-3, fp32: 1e-5 };
  for (const [name, M, N, K, layout] of shapes)
    for (const p of ["bf16", "tf32", "fp32"] as CudaPrecision[]) {
      if (p === "fp32" && M * N * K > 2 ** 36) continue;
      if (layout === "nn" && p !== "bf16") continue;
      // "priortune pipe" / "priortune staged": our BF16 product forced onto the pipelined WMMA kernel or the
      // register-staged one (PRIORTUNE_CUDA_GEMM), beside the default (auto: wgmma on Hopper where faster).
      // "priortune mma128" / "mma256": the ldmatrix + mma.sync kernel at a fixed tile width.
      // "priortune wgmma128" / "wgmma256": the Hopper wgmma kernel; "tma128" / "tma256": the same fed by TMA
      // loads from a producer warp (elsewhere these fall back to the default).
      const kernels: Record<string, string | undefined> = {
        "priortune mma128": "mma128",
        "priortune mma256": "mma256",
        ...(wgmmaRuns
          ? {
              "priortune wgmma128": "wgmma128",
              "priortune wgmma256": "wgmma256",
              "priortune wgmma2": "wgmma2",
            }
          : {}),
        ...(tmaRuns ? { "priortune tma128": "tma128", "priortune tma256": "tma256" } : {}),
        "priortune pipe": "pipe",
        "priortune staged": "staged",
      };
      const engines = ["priortune", ...Object.keys(kernels), "cublaslt"];
      for (const engine of engines) {
        if (engine === "cublaslt" && cublasLt.startsWith("unavailable")) continue;
        if (engine in kernels && p !== "bf16") continue;
        let r: { ms: number; maxRelErr: number; engine: string };
        try {
          r = await withEnv("PRIORTUNE_CUDA_GEMM", kernels[engine], () =>
            native.cudaGemmBench(
              p,
              M,
              N,
              K,
              tiny ? 2 : 10,
              engine === "cublaslt" ? "cublaslt" : "priortune",
              layout,
            ),
          );
        } catch (e) {
          console.log(JSON.stringify({ what: "gemm", shape: name, precision: p, engine, error: String(e) }));
          if (engine !== "cublaslt") {
            // One of our kernels failed: a row says so, the rest of the table still runs.
            failed = true;
            lines.push(`| ${name} | ${p} | ${engine} | error: ${String(e).slice(0, 80)} | | |`);
            continue;
          }
          // No cuBLASLt on this machine (or it refused the shape): noted once, our rows stand alone.
          cublasLt = `unavailable: ${String(e).slice(0, 200)}`;
          continue;
        }
        if (engine === "cublaslt") cublasLt = r.engine;
        const tflops = (2 * M * N * K) / r.ms / 1e9;
        const ok = r.maxRelErr <= gemmTol[p];
        failed ||= !ok;
        if (name === "8192^3" && p === "bf16") peak[engine] = tflops;
        console.log(
          JSON.stringify({
            what: "gemm",
            shape: name,
            layout,
            M,
            N,
            K,
            precision: p,
            engine,
            library: r.engine,
            ms: r.ms,
            maxRelErr: r.maxRelErr,
            tflops,
          }),
        );
        lines.push(
          `| ${name} | ${p} | ${engine} | ${r.ms.toFixed(3)} | ${tflops.toFixed(1)} | ${r.maxRelErr.toExponential(1)}${ok ? "" : " **NO**"} |`,
        );
      }
    }
  partial = undefined;
  emit(gemmTable());
}

// ---- steps ----
// Issue #5's model shapes (synthetic weights), for the steps and generate sections.
const gpt2 = parseConfig({
  architectures: ["GPT2LMHeadModel"],
  model_type: "gpt2",
  ...(tiny
    ? { vocab_size: 600, n_embd: 128, n_layer: 2, n_head: 2, n_positions: 128 }
    : { vocab_size: 50257, n_embd: 768, n_layer: 12, n_head: 12, n_positions: 1024 }),
});
const llama = parseConfig({
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  ...(tiny
    ? {
        vocab_size: 600,
        hidden_size: 128,
        intermediate_size: 320,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
      }
    : {
        vocab_size: 128256,
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 16,
        num_attention_heads: 32,
        num_key_value_heads: 8,
      }),
  max_position_embeddings: 4096,
  tie_word_embeddings: true,
  rope_theta: 500000.0,
});
if (want("steps")) {
  // --tiny: vocabularies of 600, so that the LM head's input gradient (K = 600) takes the wgmma kernel and,
  // under PRIORTUNE_CUDA_GEMM_SPLITK=1, split-K, which the first-loss check then covers.
  const shape = (B: number, S: number) => (tiny ? { B: 2, S: 40 + B } : { B, S });
  // Each model's smaller shape first: a setup attaches the model once and its device work buffers only grow,
  // so each row's device memory is its own shape's only when the shapes run in increasing size. peer: the
  // issue's PyTorch anchors (H200, 2026-11-26); the same call's peers are set beside ours by the ratio table
  // (gpu-check.sh's last step). profiled: the shape the profile after the table runs (the larger).
  const runs = [
    {
      name: "GPT-2 124M",
      config: gpt2,
      ...shape(8, 256),
      goalMs: 6,
      peer: "eager 23.4, compile 11.1",
      profiled: false,
    },
    {
      name: "GPT-2 124M",
      config: gpt2,
      ...shape(32, 512),
      goalMs: 28,
      peer: "eager bf16 85.3",
      profiled: true,
    },
    {
      name: "Llama-3.2-1B shape",
      config: llama,
      ...shape(2, 276),
      goalMs: 15,
      peer: "bf16 37.5",
      profiled: false,
    },
    {
      name: "Llama-3.2-1B shape",
      config: llama,
      ...shape(8, 512),
      goalMs: 38,
      peer: "bf16 63.6",
      profiled: true,
    },
  ];
  const lines: string[] = [];
  const firstLoss: Record<string, number> = {};
  const firstGradNorm: Record<string, number> = {};
  const P = 20;
  const adamw = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 0 };
  // A fresh random soft prompt on the device and a fully labelled batch of B sequences of S - P tokens.
  const prepareStep = async (model: NativeModel, cfg: ModelConfig, B: number, S: number) => {
    const T = S - P;
    await model.setTrainables({ prompt: random(P * cfg.hiddenSize, 3, 0.04) });
    const ids = new Int32Array(B * T).map((_, i) => (i * 7919 + 13) % cfg.vocabSize);
    return { inputIds: ids, labels: ids, batch: B, seqLen: T };
  };
  // Whether cuBLASLt loads here (a tiny product through it).
  const ltRuns = await (async () => {
    try {
      await native.cudaGemmBench("bf16", 64, 64, 64, 1, "cublaslt", "nt");
      return true;
    } catch {
      return false;
    }
  })();
  const models = new Map<ModelConfig, NativeModel>();
  for (const cfg of [gpt2, llama]) {
    const model = new native.NativeModel(nativeConfig(cfg, 16));
    await model.fillRandom(1, 0.02);
    models.set(cfg, model);
  }
  // MFU needs the bf16 8192^3 peaks: measured here when the gemm section did not run in this process.
  if (Number.isNaN(peak.priortune!)) await measurePeaks();
  const stepsTable = () =>
    `Prompt-tuning steps (P = 20, loss + prompt gradients + AdamW; MFU over the bf16 8192^3 GEMM peak, ours ${peak.priortune!.toFixed(0)} / cuBLASLt ${peak.cublaslt!.toFixed(0)} TFLOP/s)\n` +
    "| model | B x S | precision | ms | goal ms | PyTorch ms (the issue's anchors: H200, 2026-11-26; this call's: the ratio table) | tokens/s | MFU (ours / cuBLASLt peak) | device memory, weights + workspace: MiB (2^20 B) / GB (1e9 B) | first loss / gradient norm vs default |\n|---|---|---|---|---|---|---|---|---|---|\n" +
    lines.join("\n");
  partial = stepsTable;
  // bf16 with graphs: the default kernels (auto GEMM: wgmma on Hopper where it is faster, else mma.sync;
  // mma.sync attention; GPT-2's GELU written by fc's product), the same with the GELU as a separate pass
  // (PRIORTUNE_CUDA_GEMM_OUT16=0, the previous default), the previous defaults (mma.sync GEMM, WMMA attention), the wgmma GEMM at its fixed
  // width (against auto's pick), at 128 x 128 with two blocks an SM (wgmma2) and its TMA-fed twin, the
  // cp.async attention (fp32-staged, and on bf16 copies of its operands) alone and with the TMA GEMM (the
  // candidates for the next defaults), the WMMA attention alone; bf16 eager; tf32. Where cuBLASLt loads,
  // also every product on cuBLASLt (PRIORTUNE_CUDA_GEMM=cublaslt), with the default attention and with the
  // one on bf16 copies: what the step would cost with a vendor-class GEMM, so how much of the gap to each
  // goal is the GEMM's. (The pipelined
  // WMMA and register-staged GEMMs lost to the mma.sync one on every step and product: the gemm section
  // times them.)
  const setups: {
    precision: CudaPrecision;
    graphs: boolean;
    kernel?: string;
    attn?: string;
    peel?: boolean;
    splitk?: boolean;
    sep16?: boolean;
  }[] = [
    // In order of what a cut-short run most needs: the default, the candidates for the next defaults, the
    // vendor GEMM's bound, then the history rows (every setup runs on both models before the next).
    { precision: "bf16", graphs: true },
    ...(tmaRuns ? [{ precision: "bf16" as const, graphs: true, kernel: "tma" }] : []),
    ...(asyncRuns ? [{ precision: "bf16" as const, graphs: true, attn: "bf16" }] : []),
    ...(tmaRuns && asyncRuns
      ? [{ precision: "bf16" as const, graphs: true, kernel: "tma", attn: "bf16" }]
      : []),
    ...(ltRuns ? [{ precision: "bf16" as const, graphs: true, kernel: "cublaslt" }] : []),
    ...(ltRuns && asyncRuns
      ? [{ precision: "bf16" as const, graphs: true, kernel: "cublaslt", attn: "bf16" }]
      : []),
    { precision: "bf16", graphs: true, peel: true },
    { precision: "bf16", graphs: true, splitk: true },
    ...(wgmmaRuns ? [{ precision: "bf16" as const, graphs: true, kernel: "wgmma2" }] : []),
    ...(asyncRuns ? [{ precision: "bf16" as const, graphs: true, attn: "async" }] : []),
    ...(asyncRuns
      ? [{ precision: "bf16" as const, graphs: true, attn: "async", peel: true, splitk: true }]
      : []),
    ...(tmaRuns && asyncRuns
      ? [{ precision: "bf16" as const, graphs: true, kernel: "tma", attn: "async" }]
      : []),
    { precision: "bf16", graphs: true, sep16: true },
    ...(wgmmaRuns ? [{ precision: "bf16" as const, graphs: true, kernel: "wgmma" }] : []),
    { precision: "bf16", graphs: true, kernel: "mma128", attn: "wmma" },
    { precision: "bf16", graphs: true, attn: "wmma" },
    { precision: "bf16", graphs: false },
    { precision: "tf32", graphs: true },
  ];
  for (const setup of setups) {
    for (const cfg of [gpt2, llama]) {
      const model = models.get(cfg)!;
      const { precision, graphs, kernel, attn, peel, splitk, sep16 } = setup;
      const env = {
        PRIORTUNE_CUDA_GEMM_OUT16: sep16 ? "0" : undefined,
        PRIORTUNE_CUDA_ATTN: attn,
        PRIORTUNE_CUDA_GEMM_PEEL: peel ? "1" : undefined,
        PRIORTUNE_CUDA_GEMM_SPLITK: splitk ? "1" : undefined,
        PRIORTUNE_CUDA_GEMM: kernel,
      };
      await withEnvs(env, async () => {
        await model.attachCuda({ precision, graphs });
        const label =
          `${precision}${graphs ? "" : " eager"}${kernel ? ` (${kernel} GEMM)` : ""}` +
          `${peel ? " (peeled tails)" : ""}${splitk ? " (split-K)" : ""}${attn ? ` (${attn} attention)` : ""}` +
          `${sep16 ? " (GELU as a separate pass)" : ""}`;
        // Smaller shapes first (the buffers grow to each in turn: see runs); explicit, whatever runs' order.
        for (const r of runs.filter((x) => x.config === cfg).sort((a, b) => a.B * a.S - b.B * b.S)) {
          const C = cfg.hiddenSize;
          const args = await prepareStep(model, cfg, r.B, r.S);
          try {
            // Every setup starts from the same prompt: its first step's loss must match the default setup's
            // (the first, bf16) to bf16 rounding: a model-scale check of each candidate kernel.
            // The gradient norm too: several setups change only backward products (split-K, the attention
            // backward, the GELU-gradient epilogue), which the loss cannot see.
            const firstStep = await model.promptStep(args, adamw);
            const first = firstStep.loss;
            const key = `${r.name} ${r.B} x ${r.S}`;
            firstLoss[key] ??= first;
            firstGradNorm[key] ??= firstStep.gradNorm;
            const lossRel = Math.abs(first - firstLoss[key]!) / Math.abs(firstLoss[key]!);
            const gradRel =
              Math.abs(firstStep.gradNorm - firstGradNorm[key]!) / Math.abs(firstGradNorm[key]!);
            // Gradients in bf16 differ more between setups than the loss does: 5e-2 still catches wrong ones.
            const lossOk = lossRel <= 1e-2 && gradRel <= 5e-2; // NaN fails both
            failed ||= !lossOk;
            // 20 timed steps for the default setup, 10 for each candidate (the table grew to 20 setups: the
            // device call's budget also has to hold the PyTorch peers). --tiny (the emulator, whose times mean
            // nothing): one warm step and one timed, so that a captured graph is replayed.
            const timed = tiny ? 1 : setups.indexOf(setup) === 0 ? 20 : 10;
            const ms = await median(() => model.promptStep(args, adamw), timed, tiny ? 1 : 3);
            const mem = model.deviceMemory();
            // Model FLOPs of a prompt-tuning step: 4 N per token (forward 2 N, input-gradient backward 2 N; no
            // weight gradients), N = layer weights + LM head; attention 2 B L H S^2 hd forward (causal half),
            // twice that backward.
            const c = cfg;
            const kv = c.numKvHeads * c.headDim;
            const fc = c.architecture === "gpt2" ? 2 : 3;
            const perLayer =
              C * (c.numHeads * c.headDim + 2 * kv) +
              c.numHeads * c.headDim * C +
              fc * C * c.intermediateSize;
            const N = c.numLayers * perLayer + c.vocabSize * C;
            const flops = 4 * N * r.B * r.S + 6 * r.B * c.numLayers * c.numHeads * r.S * r.S * c.headDim;
            const tflops = flops / ms / 1e9;
            const deviceBytes = mem.weightBytes + mem.workspaceBytes;
            const row = {
              what: "step",
              model: r.name,
              B: r.B,
              S: r.S,
              // The setup's label and place in the table (0: the default), for the ratio table.
              setup: label,
              setupIndex: setups.indexOf(setup),
              precision,
              graphs,
              gemmKernel: kernel ?? "auto",
              attention: attn ?? "mma",
              peel: !!peel,
              splitk: !!splitk,
              geluPass: !!sep16,
              firstLoss: first,
              firstLossRelToDefault: lossRel,
              firstGradNormRelToDefault: gradRel,
              lossOk,
              ms,
              tokPerS: (r.B * r.S) / (ms / 1e3),
              tflops,
              mfu: tflops / peak.priortune!,
              mfuCublasLt: tflops / peak.cublaslt!,
              // MiB = 2^20 bytes; GB = 1e9 bytes, PyTorch's mem_GB unit (max_memory_allocated() / 1e9).
              deviceMiB: deviceBytes / 2 ** 20,
              deviceGB: deviceBytes / 1e9,
              goalMs: r.goalMs,
            };
            console.log(JSON.stringify(row));
            lines.push(
              `| ${r.name} | ${r.B} x ${r.S} | ${label} | ${ms.toFixed(2)} | ${r.goalMs} | ${r.peer} | ${row.tokPerS.toFixed(0)} | ${(100 * row.mfu).toFixed(1)}% / ${Number.isNaN(row.mfuCublasLt) ? "-" : `${(100 * row.mfuCublasLt).toFixed(1)}%`} | ${row.deviceMiB.toFixed(0)} / ${row.deviceGB.toFixed(2)} | ${lossRel.toExponential(1)} / ${gradRel.toExponential(1)}${lossOk ? "" : " **NO**"} |`,
            );
          } catch (e) {
            console.log(
              JSON.stringify({
                what: "step",
                model: r.name,
                B: r.B,
                S: r.S,
                precision,
                gemmKernel: kernel ?? "auto",
                attention: attn ?? "mma",
                error: String(e),
              }),
            );
            lines.push(
              `| ${r.name} | ${r.B} x ${r.S} | ${label} | error: ${String(e).slice(0, 80)} | | | | | | |`,
            );
            failed = true;
          }
        }
      });
    }
  }
  partial = undefined;
  emit(stepsTable());
  for (const cfg of [gpt2, llama]) {
    const model = models.get(cfg)!;
    // Where the time goes: one profiled configuration per model (eager, CUDA events between stages), with the
    // default kernels and with the cp.async attention ones (fp32-staged, on bf16 copies: their conversions
    // count as attention).
    // The larger shape, named (runs lists the smaller first).
    const r = runs.find((x) => x.config === cfg && x.profiled)!;
    for (const attn of [undefined, ...(asyncRuns ? ["async", "bf16"] : ["wmma"])])
      await withEnv("PRIORTUNE_CUDA_ATTN", attn, async () => {
        await model.attachCuda({ precision: "bf16", graphs: false, profile: true });
        const args = await prepareStep(model, cfg, r.B, r.S);
        for (let i = 0; i < 2; i++) await model.promptStep(args, adamw);
        model.deviceProfile(); // drop the warm-up
        const steps = tiny ? 2 : 5;
        for (let i = 0; i < steps; i++) await model.promptStep(args, adamw);
        const prof = Object.entries(model.deviceProfile()).sort((a, b) => b[1] - a[1]);
        const total = prof.reduce((t, [, ms]) => t + ms, 0);
        console.log(
          JSON.stringify({
            what: "profile",
            model: r.name,
            B: r.B,
            S: r.S,
            precision: "bf16",
            attention: attn ?? "mma",
            perStepMs: Object.fromEntries(prof.map(([k, v]) => [k, v / steps])),
          }),
        );
        emit(
          `Profile, ${r.name} ${r.B} x ${r.S}, bf16${attn ? `, ${attn} attention` : ""}, eager with events (ms per step; total ${(total / steps).toFixed(2)})\n` +
            "| stage | ms | share |\n|---|---|---|\n" +
            prof
              .map(([k, ms]) => `| ${k} | ${(ms / steps).toFixed(3)} | ${((100 * ms) / total).toFixed(1)}% |`)
              .join("\n"),
        );
      });
    model.dispose();
  }
}

// ---- generate ----
// Greedy decoding (evaluation's generation) on the device against the CPU model on this machine's cores, at
// the steps' model shapes: the prompt batch of the paper's evaluation (Llama, B = 2) and a GPT-2 batch, 16
// new tokens after a soft prompt of 20, no end-of-text stop. Tokens agreeing with the CPU's: a share, not a
// check (synthetic weights make near-ties common, and bf16 may pick either; test/cuda-checks.ts checks
// each token against the CPU's logits on the fixture models).
if (want("generate")) {
  const runs = [
    { name: "GPT-2 124M", config: gpt2, B: tiny ? 2 : 8, T: tiny ? 24 : 236 },
    { name: "Llama-3.2-1B shape", config: llama, B: 2, T: tiny ? 24 : 256 },
  ];
  const maxNew = tiny ? 3 : 16;
  const cpuThreads = Math.min(16, availableParallelism());
  const lines: string[] = [];
  const table = () =>
    `Greedy generation, ${maxNew} new tokens after a soft prompt of 20 (median ms of a call; CPU: one call, ${cpuThreads} threads)\n` +
    "| model | B x prompt tokens | CUDA bf16 ms (cached) | bf16 re-forward ms | fp32 ms (cached) | CPU ms | CPU / CUDA bf16 | tokens equal to the CPU's (bf16 / re-forward / fp32) |\n|---|---|---|---|---|---|---|---|\n" +
    lines.join("\n");
  partial = table;
  for (const r of runs) {
    const cfg = r.config;
    const model = new native.NativeModel(nativeConfig(cfg, cpuThreads));
    try {
      await model.fillRandom(1, 0.02);
      const P = 20;
      const args = {
        inputIds: new Int32Array(r.B * r.T).map((_, i) => (i * 7919 + 13) % cfg.vocabSize),
        attentionMask: new Uint8Array(r.B * r.T).map((_, i) =>
          i % r.T < r.T - 7 * (Math.floor(i / r.T) % 2) ? 1 : 0,
        ),
        batch: r.B,
        seqLen: r.T,
        prompt: random(P * cfg.hiddenSize, 3, 0.04),
      };
      const t0 = performance.now();
      const cpu = await model.generate(args, maxNew, -1);
      const cpuMs = performance.now() - t0;
      // The default (bf16, cached decoding), the re-forward path, fp32.
      const setups = [
        ["bf16", "cache"],
        ["bf16", "reforward"],
        ["fp32", "cache"],
      ] as const;
      const timed: { ms: number; equal: number }[] = [];
      for (const [precision, mode] of setups)
        await withEnv("PRIORTUNE_CUDA_GENERATE", mode, async () => {
          await model.attachCuda({ precision, graphs: true });
          let ids: Int32Array = new Int32Array();
          const ms = await median(
            async () => {
              ids = await model.generate(args, maxNew, -1);
            },
            tiny ? 1 : 5,
          );
          timed.push({ ms, equal: ids.filter((t, i) => t === cpu[i]).length / cpu.length });
        });
      const [bf16, reforward, fp32] = timed as [
        { ms: number; equal: number },
        { ms: number; equal: number },
        { ms: number; equal: number },
      ];
      console.log(
        JSON.stringify({
          what: "generate",
          model: r.name,
          B: r.B,
          T: r.T,
          P,
          maxNew,
          cpuMs,
          cpuThreads,
          bf16Ms: bf16.ms,
          bf16ReforwardMs: reforward.ms,
          fp32Ms: fp32.ms,
          bf16Equal: bf16.equal,
          bf16ReforwardEqual: reforward.equal,
          fp32Equal: fp32.equal,
        }),
      );
      lines.push(
        `| ${r.name} | ${r.B} x ${r.T} | ${bf16.ms.toFixed(1)} | ${reforward.ms.toFixed(1)} | ${fp32.ms.toFixed(1)} | ${cpuMs.toFixed(0)} | ${(cpuMs / bf16.ms).toFixed(1)}x | ${(100 * bf16.equal).toFixed(0)}% / ${(100 * reforward.equal).toFixed(0)}% / ${(100 * fp32.equal).toFixed(0)}% |`,
      );
    } catch (e) {
      console.log(JSON.stringify({ what: "generate", model: r.name, error: String(e) }));
      lines.push(`| ${r.name} | ${r.B} x ${r.T} | error: ${String(e).slice(0, 80)} | | | | | |`);
      failed = true;
    } finally {
      model.dispose();
    }
  }
  partial = undefined;
  emit(table());
}

// ---- knn ----
if (want("knn")) {
  const workloads = tiny
    ? [
        { name: "7 x 300 x 40", Q: 7, V: 300, d: 40, goalMs: Number.NaN },
        { name: "3 x 2100 x 24", Q: 3, V: 2100, d: 24, goalMs: Number.NaN },
      ]
    : [
        { name: "160 x 50257 x 768", Q: 160, V: 50257, d: 768, goalMs: 0.06 },
        { name: "4096 x 50257 x 768", Q: 4096, V: 50257, d: 768, goalMs: 1.5 },
        { name: "20 x 128256 x 2048", Q: 20, V: 128256, d: 2048, goalMs: 0.15 },
        { name: "160 x 262144 x 256 (V = 256k)", Q: 160, V: 262144, d: 256, goalMs: Number.NaN },
        { name: "16 x 8192 x 8192 (d = 8192)", Q: 16, V: 8192, d: 8192, goalMs: Number.NaN },
      ];
  const rows: string[] = [];
  const knnTable = () =>
    "| workload (Q x V x d, top-10) | metric | CUDA path | same indices as CPU | max rel. score error | CUDA device ms, query preparation to finalize (of which preparation + screening) | CUDA wall ms | recovered queries | goal ms | CPU ms |\n|---|---|---|---|---|---|---|---|---|---|\n" +
    rows.join("\n");
  partial = knnTable;
  // The screening paths of the CUDA index (PRIORTUNE_CUDA_KNN): fused (the TF32 screening kernel), matrix
  // (bf16 GEMM + slab selection) and auto (the default, which picks one of them), each against the CPU index;
  // "+filter": the matrix path with the filter selection kernel (PRIORTUNE_CUDA_KNN_SELECT=filter); on Hopper
  // also "+wgmma", the matrix path with its GEMM on the wgmma kernel.
  const paths = quick
    ? ["auto"]
    : [
        "auto",
        "fused",
        "matrix",
        "matrix+filter",
        ...(wgmmaRuns ? ["matrix+wgmma", "matrix+wgmma+filter"] : []),
      ];
  const withPath = <T>(path: string, fn: () => Promise<T>) => {
    const parts = path.split("+");
    const env = {
      PRIORTUNE_CUDA_KNN: parts[0],
      PRIORTUNE_CUDA_GEMM: parts.includes("wgmma") ? "wgmma" : undefined,
      PRIORTUNE_CUDA_KNN_SELECT: parts.includes("filter") ? "filter" : undefined,
    };
    return withEnvs(env, fn);
  };
  for (const w of quick ? workloads.slice(0, 1) : workloads) {
    const vocab = random(w.V * w.d, 1 + w.V);
    const queries = random(w.Q * w.d, 2 + w.Q);
    for (const metric of quick ? (["cosine"] as const) : (["cosine", "l2"] as const)) {
      const gpu = await VocabIndex.create(vocab, { dim: w.d, metric, backend: "cuda" });
      const cpu = await VocabIndex.create(vocab, { dim: w.d, metric, backend: "cpu" });
      const b = await cpu.search(queries, { k: 10 });
      const cpuMs = quick ? Number.NaN : await median(() => cpu.search(queries, { k: 10 }), tiny ? 1 : 3);
      for (const path of paths)
        await withPath(path, async () => {
          let a: Awaited<ReturnType<typeof gpu.search>>;
          try {
            a = await gpu.search(queries, { k: 10 });
          } catch (e) {
            // A path that fails or faults is a row; the other paths and workloads still run.
            failed = true;
            console.log(JSON.stringify({ what: "knn", workload: w.name, metric, path, error: String(e) }));
            rows.push(`| ${w.name} | ${metric} | ${path} | error: ${String(e).slice(0, 80)} | | | | | | |`);
            return;
          }
          let same = true;
          let worst = 0;
          for (let i = 0; i < a.indices.length; i++) {
            if (a.indices[i] !== b.indices[i]) same = false;
            worst = Math.max(worst, Math.abs(a.scores[i]! - b.scores[i]!) / (1e-30 + Math.abs(b.scores[i]!)));
          }
          const ok = same && worst < 1e-5;
          failed ||= !ok;
          // Wall clock per search (host preparation, transfers and the Node call included) and the kernels' device
          // time (CUDA events, from the query preparation to the finalize kernel's end), the figure comparable
          // with the PyTorch peer's event timing of normalise + matmul + topk.
          const device: number[] = [];
          const screen: number[] = [];
          const ms = await median(
            async () => {
              const r = await gpu.search(queries, { k: 10 });
              device.push(r.deviceMs);
              screen.push(r.deviceScreenMs);
            },
            tiny || quick ? 2 : 20,
          );
          const deviceMs = medianOf(device.slice(1));
          const screenMs = medianOf(screen.slice(1));
          console.log(
            JSON.stringify({
              what: "knn",
              workload: w.name,
              Q: w.Q,
              V: w.V,
              d: w.d,
              metric,
              path,
              identicalIndices: same,
              maxRelScoreError: worst,
              cudaMs: ms,
              cudaDeviceMs: deviceMs,
              cudaScreenMs: screenMs,
              recoveredQueries: a.recoveredQueries,
              cpuMs,
              goalMs: w.goalMs,
            }),
          );
          rows.push(
            `| ${w.name} | ${metric} | ${path} | ${same ? "yes" : "NO"} | ${worst.toExponential(1)} | ${deviceMs.toFixed(3)} (${screenMs.toFixed(3)}) | ${ms.toFixed(3)} | ${a.recoveredQueries} | ${Number.isNaN(w.goalMs) ? "" : w.goalMs} | ${cpuMs.toFixed(1)} |`,
          );
        });
      gpu.dispose();
      cpu.dispose();
    }
  }
  // The vocabulary self-search: every row's 10 nearest other rows (cosine), the whole V x V in chunks, on
  // the device and on the CPU index of the same machine; the results must agree row for row.
  if (!quick) {
    const V = tiny ? 900 : 50257;
    const d = tiny ? 32 : 768;
    const vocab = random(V * d, 5);
    const gpu = await VocabIndex.create(vocab, { dim: d, metric: "cosine", backend: "cuda" });
    const cpu = await VocabIndex.create(vocab, { dim: d, metric: "cosine", backend: "cpu" });
    await gpu.selfSearch({ k: 10, rows: [0, 1, 2] }); // warm-up
    const time = async (index: VocabIndex) => {
      const t = process.hrtime.bigint();
      const r = await index.selfSearch({ k: 10 });
      return { r, ms: Number(process.hrtime.bigint() - t) / 1e6 };
    };
    const b = await time(cpu);
    for (const path of paths)
      await withPath(path, async () => {
        const a = await time(gpu);
        let mismatched = 0;
        for (let i = 0; i < a.r.indices.length; i++) if (a.r.indices[i] !== b.r.indices[i]) mismatched++;
        failed ||= mismatched > 0;
        const name = `self-search ${V} x ${V} x ${d}`;
        console.log(
          JSON.stringify({
            what: "knn-self",
            workload: name,
            path,
            mismatched,
            cudaMs: a.ms,
            cudaDeviceMs: a.r.deviceMs,
            cudaScreenMs: a.r.deviceScreenMs,
            cpuMs: b.ms,
            k: 10,
          }),
        );
        rows.push(
          `| ${name} | cosine | ${path} | ${mismatched ? `NO (${mismatched})` : "yes"} | | ${a.r.deviceMs.toFixed(1)} (${a.r.deviceScreenMs.toFixed(1)}) | ${a.ms.toFixed(1)} | ${a.r.recoveredQueries} | | ${b.ms.toFixed(1)} |`,
        );
      });
    gpu.dispose();
    cpu.dispose();
  }
  partial = undefined;
  emit(knnTable());
}

console.log(`\n${tables.join("\n\n")}\n`);
process.exit(failed ? 1 : 0);
