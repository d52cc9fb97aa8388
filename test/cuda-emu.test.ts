// The CUDA sources executed without a GPU: scripts/cuda-emu.mjs builds kernels/cuda/*.cu against the CPU
// emulator in tools/cuda-emu and runs tools/cuda-emu/check.cpp (every op's self-test, the device model
// against the CPU model at fp32 / tf32 / bf16 with CUDA graphs against eager steps, the kNN index against the
// float64 brute force), then builds the Node addon against the emulator and runs the JS-level CUDA suite
// (test/cuda.test.ts: backend "cuda" through lib, the bindings, PromptTrainer, graphs, out of memory) and the
// bundled GPU check on tiny shapes with it, failing on any wrong value, skipped test, and any stream-ordering
// or capture error the emulator reports. It shows values and API use, not race-freedom, speed or launch limits on a real GPU (see
// tools/cuda-emu/include/emu_cuda.h). Needs g++ on x86-64 Linux; PRIORTUNE_CUDA_EMU=0 skips it (CI's second
// vitest run, whose addon build does not change what it checks).
import { spawn, spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = fileURLToPath(new URL("..", import.meta.url));

function skipReason(): string {
  if (process.env.PRIORTUNE_CUDA_EMU === "0") return "PRIORTUNE_CUDA_EMU=0";
  if (process.platform !== "linux" || process.arch !== "x64")
    return `the emulator needs x86-64 Linux, this is ${process.platform}/${process.arch}`;
  const cxx = process.env.CXX || "g++";
  if (spawnSync(cxx, ["--version"]).status !== 0) return `${cxx} not found`;
  return "";
}
const reason = skipReason();

function runEmulator(): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ["scripts/cuda-emu.mjs"], { cwd: root });
    let output = "";
    p.stdout.on("data", (d) => {
      output += d;
    });
    p.stderr.on("data", (d) => {
      output += d;
    });
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, output }));
  });
}

describe.skipIf(reason !== "")(
  `CUDA kernels in the CPU emulator${reason ? ` (skipped: ${reason})` : ""}`,
  () => {
    it("every check passes with no emulator error", async () => {
      const { code, output } = await runEmulator();
      const problems = output
        .split("\n")
        .filter((l) => /^\s*FAIL\b|EMU (ERROR|warning)|^== .*FAILED/.test(l));
      const summary = /^cuda-emu: (\d+) checks, (\d+) failed/m.exec(output);
      expect({ code, problems, summary: summary?.[0] ?? output.slice(-2000) }).toEqual({
        code: 0,
        problems: [],
        summary: expect.stringMatching(/ 0 failed/),
      });
      expect(Number(summary?.[1])).toBeGreaterThan(1000);
    }, 3_900_000); // 20 to 50 minutes on 2 cores, by the machine; 65 (CI has 90 in all) before a slow one fails
  },
);
