// The CUDA backend. On a machine with a usable CUDA device: every op against its CPU reference (the addon's
// self-test), every fixture model at fp32 / tf32 / bf16 against the float64 PyTorch golden files (forward,
// soft / hidden / prefix gradients, the 10-step AdamW curve on device-resident prompts), random models with
// realistic head sizes against the CPU backend, CUDA-graph replay against eager launches (bit-identical),
// tune() against the CPU run and its resume, PromptTrainer's optimizer state, the collapse report through
// the CUDA index, the CLI on CUDA, and errors (out of memory) as JS errors. The checks and their tolerances
// live in test/cuda-checks.ts, which scripts/gpu-check.ts also runs (all but the CLI). Without a device that suite is skipped with the probe's reason; the
// CPU half of PromptTrainer (the reference of the device-resident step) is tested everywhere.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { AdamW, type CudaSelfTestPart, cudaStatus, loadModel } from "../lib/index.js";
import {
  type CheckRow,
  collapseChecks,
  errorChecks,
  FIXTURE_MODELS,
  fixtureChecks,
  gemmKernelChecks,
  randomModelChecks,
  trainerStateChecks,
  tuneChecks,
  tuneResumeChecks,
} from "./cuda-checks.js";
import { compare, goldenAdamW, goldenBatch, modelDir, readGolden, toFloat32 } from "./helpers.js";

const cuda = cudaStatus();
// Under the CPU emulator (scripts/cuda-emu.mjs's addon section) every test runs a few hundred times slower
// than on a GPU, and 2-core machines differ by 2-3x among themselves: the limits stretch there, so that a
// slow machine does not abandon a native call mid-run (its worker goes on while the next test starts).
const emulated = process.env.PRIORTUNE_CUDA_EMULATED === "1";
const limit = (ms: number) => (emulated ? 4 * ms : ms);
const suffix = cuda.usable ? "" : ` (skipped: no CUDA device: ${cuda.reason})`;

function expectAllPass(rows: CheckRow[]) {
  const failed = rows.filter((r) => !r.pass);
  expect(
    failed.map((r) => `${r.group} / ${r.name}: err ${r.err.toExponential(2)} > tol ${r.tol} ${r.note ?? ""}`),
  ).toEqual([]);
  expect(rows.length).toBeGreaterThan(0);
}

describe.skipIf(!cuda.usable)(`CUDA backend${suffix}`, () => {
  it(
    "every CUDA op matches its CPU reference",
    async () => {
      const { cudaSelfTest } = await import("../lib/index.js");
      // The emulator's check program has run every part (its selftest section); here, through the addon,
      // one part shows the binding, which on a slow 2-core machine saves 10 minutes of the emulated run.
      const parts = emulated ? (["elementwise"] as const) : undefined;
      const checks = await cudaSelfTest({ parts });
      if (parts) expect(new Set(checks.map((c) => c.op)).size).toBeGreaterThan(5);
      expectAllPass(
        checks.map((c) => ({
          group: c.op,
          name: c.shape,
          err: c.err,
          tol: c.tol,
          pass: c.pass,
          note: c.note,
        })),
      );
    },
    limit(300_000),
  );
  for (const precision of ["fp32", "tf32", "bf16"] as const)
    for (const name of FIXTURE_MODELS)
      it(
        `${name}, ${precision}: golden fixtures (forward, gradients, 10-step curve)`,
        async () => {
          expectAllPass(await fixtureChecks(name, precision));
        },
        limit(120_000),
      );
  for (const precision of ["fp32", "bf16"] as const)
    for (const arch of ["gpt2", "llama"] as const)
      it(
        `random ${arch} (hd 64), ${precision}: CPU agreement, graph replay`,
        async () => {
          expectAllPass(await randomModelChecks(arch, precision));
        },
        limit(300_000),
      );
  // tune() on CUDA: soft and deep-prefix take the device-resident step, a regulariser the host path.
  it.each([
    ["soft", false],
    ["deep-prefix", false],
    ["soft", true],
  ] as const)(
    "tune() (%s, regulariser %s) on CUDA at fp32 follows the CPU run step for step",
    async (mode, reg) => {
      expectAllPass(await tuneChecks(mode, reg));
    },
    limit(300_000),
  );
  it(
    "tune() on CUDA resumes from its checkpoint (device AdamW state restored) to the uninterrupted run",
    async () => {
      expectAllPass(await tuneResumeChecks());
    },
    limit(300_000),
  );
  it(
    "PromptTrainer's optimizer state round-trips; a replaced trainer throws",
    async () => {
      expectAllPass(await trainerStateChecks("cuda"));
    },
    limit(120_000),
  );
  it(
    "collapseReport with the CUDA index equals the CPU report",
    async () => {
      expectAllPass(await collapseChecks());
    },
    limit(120_000),
  );
  it(
    "the CLI tunes on CUDA (--backend cuda --precision fp32) and says so",
    () => {
      const dir = mkdtempSync(join(tmpdir(), "priortune-cuda-cli-"));
      try {
        const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "lib", "cli.ts");
        const r = spawnSync(
          process.execPath,
          [
            "--import",
            "tsx",
            cli,
            "tune",
            modelDir("llama-tiny"),
            "--task",
            "arithmetic",
            "--train-count",
            "12",
            "--validation-count",
            "2",
            "--steps",
            "3",
            "--prompt-length",
            "4",
            "--backend",
            "cuda",
            "--precision",
            "fp32",
            "--run-dir",
            join(dir, "run"),
            "--json",
          ],
          { encoding: "utf8", env: { ...process.env, PRIORTUNE_LOG: "info" } },
        );
        expect(r.status, r.stderr).toBe(0);
        expect(r.stderr).toMatch(/step 3\/3 loss \d+\.\d+/);
        expect(r.stderr).toMatch(/priortune: CUDA: .*, fp32 weights/);
        expect(JSON.parse(r.stdout).steps).toBe(3);
        expect(existsSync(join(dir, "run", "prompt.safetensors"))).toBe(true);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
    limit(120_000),
  );
  it(
    "dispose() while device work runs: each call settles, the model's later calls say it is disposed",
    async () => {
      const g = readGolden("llama-tiny");
      const { maxGradNorm: _, ...opts } = goldenAdamW(g);
      const model = await loadModel(modelDir("llama-tiny"), { backend: "cuda", threads: 1 });
      const trainer = await model.promptTrainer({ prompt: toFloat32(g.get("prompt")) }, opts);
      // The workers hold the host model too (the device model reads its config and RoPE tables).
      const step = trainer.step(goldenBatch(g));
      const others = [trainer.tensors(), trainer.optimizerState()];
      model.dispose();
      const [done] = await Promise.allSettled([step, ...others]);
      if (done!.status === "fulfilled") expect(Number.isFinite((await step).loss)).toBe(true);
      else expect(String(done!.reason)).toMatch(/disposed/);
      await expect(trainer.step(goldenBatch(g))).rejects.toThrow(/disposed/);
    },
    limit(120_000),
  );
  it(
    "out of memory is a JS error and the model keeps working",
    async () => {
      expectAllPass(await errorChecks());
    },
    limit(120_000),
  );
  it(
    "the BF16 GEMM and attention kernels give the same step; a bad PRIORTUNE_CUDA_GEMM or _ATTN is an error",
    async () => {
      expectAllPass(await gemmKernelChecks());
    },
    limit(120_000),
  );
});

describe("cudaSelfTest's arguments (checked with or without a device)", () => {
  it("rejects an unknown part, in lib and in the binding, naming the parts", async () => {
    const { cudaSelfTest } = await import("../lib/index.js");
    const { addon } = await import("../lib/native.js");
    for (const parts of [["gemm", "norms"], "gemm"] as unknown as CudaSelfTestPart[][])
      await expect(cudaSelfTest({ parts })).rejects.toThrow(/unknown part .*gemm, elementwise, attention/);
    expect(() => addon().cudaSelfTest(["attention", "rope"])).toThrow(
      /parts\[1\].*"gemm", "elementwise" or "attention"/,
    );
  });
});

describe("PromptTrainer on the CPU (the device step's reference)", () => {
  const g = readGolden("llama-tiny");
  const base = goldenBatch(g);
  const prompt = toFloat32(g.get("prompt"));
  const { maxGradNorm: _, ...opts } = goldenAdamW(g);

  it("follows PyTorch's 10-step curve and leaves the caller's prompt untouched", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const before = prompt.slice();
      const trainer = await model.promptTrainer({ prompt }, opts);
      const expected = g.get("curve_losses") as Float64Array;
      for (let step = 0; step < expected.length; step++) {
        const r = await trainer.step(base);
        expect(Math.abs(r.loss - expected[step]!) / expected[step]!, `step ${step}`).toBeLessThan(1e-4);
        expect(r.step).toBe(step + 1);
        expect(r.gradNorm).toBeGreaterThan(0);
      }
      const final = (await trainer.tensors()).prompt!;
      const r = compare(final, g.get("curve_final_prompt") as Float64Array);
      expect(r.maxAbs / r.scale).toBeLessThan(1e-4);
      expect(prompt).toEqual(before);
    } finally {
      model.dispose();
    }
  });

  it("clips the global gradient norm like clip_grad_norm_", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const trainer = await model.promptTrainer({ prompt }, { ...opts, maxGradNorm: 1e-3 });
      const r = await trainer.step(base);
      // Reference: the same step by hand with the clipped gradient.
      const g0 = await model.lossAndGrad({ ...base, prompt });
      const grad = g0.promptGrad!;
      let sq = 0;
      for (const v of grad) sq += v * v;
      expect(r.gradNorm).toBeCloseTo(Math.sqrt(sq), 6);
      const coef = 1e-3 / (Math.sqrt(sq) + 1e-6);
      const p = prompt.slice();
      new AdamW([p], opts).step([grad.map((v) => Math.fround(v * coef))]);
      expect((await trainer.tensors()).prompt).toEqual(p);
    } finally {
      model.dispose();
    }
  });

  it("optimizer state round-trips: a trainer given it steps as the original", async () => {
    expectAllPass(await trainerStateChecks("cpu"));
  });

  it("rejects bad settings and empty trainers with named errors", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 1 });
    try {
      await expect(model.promptTrainer({}, opts)).rejects.toThrow(/give a prompt and\/or deepPrompts/);
      await expect(model.promptTrainer({ prompt }, { ...opts, maxGradNorm: -1 })).rejects.toThrow(
        /maxGradNorm/,
      );
      await expect(model.promptTrainer({ prompt: new Float32Array(5) }, opts)).rejects.toThrow(/prompt/);
      const t = await model.promptTrainer({ prompt }, opts);
      await expect(t.step(base, Number.NaN)).rejects.toThrow(/lr/);
      await expect(t.setOptimizerState({ step: 1, m: [], v: [] })).rejects.toThrow(/m: expected 1 tensors/);
      await expect(t.setOptimizerState({ step: -1, m: [], v: [] })).rejects.toThrow(/step/);
    } finally {
      model.dispose();
    }
  });
});
