// The CUDA backend. On a machine with a usable CUDA device: every op against its CPU reference (the addon's
// self-test), every fixture model at fp32 / tf32 / bf16 against the float64 PyTorch golden files (forward,
// soft / hidden / prefix gradients, the 10-step AdamW curve on device-resident prompts), random models with
// realistic head sizes against the CPU backend, CUDA-graph replay against eager launches (bit-identical),
// and errors (out of memory) as JS errors. The checks and their tolerances live in test/cuda-checks.ts,
// which scripts/gpu-check.ts also runs. Without a device that suite is skipped with the probe's reason; the
// CPU half of PromptTrainer (the reference of the device-resident step) is tested everywhere.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import {
  AdamW,
  collapseReport,
  createPrior,
  cudaStatus,
  loadModel,
  loadTask,
  type StepRecord,
  type TuneMode,
  type TuneOptions,
  type TuneResult,
  tune,
} from "../lib/index.js";
import {
  type CheckRow,
  errorChecks,
  FIXTURE_MODELS,
  fixtureChecks,
  randomModelChecks,
} from "./cuda-checks.js";
import { compare, goldenAdamW, goldenBatch, modelDir, readGolden, toFloat32 } from "./helpers.js";

const cuda = cudaStatus();
const suffix = cuda.usable ? "" : ` (skipped: no CUDA device: ${cuda.reason})`;

function expectAllPass(rows: CheckRow[]) {
  const failed = rows.filter((r) => !r.pass);
  expect(
    failed.map((r) => `${r.group} / ${r.name}: err ${r.err.toExponential(2)} > tol ${r.tol} ${r.note ?? ""}`),
  ).toEqual([]);
  expect(rows.length).toBeGreaterThan(0);
}

const tuneTask = loadTask({ kind: "arithmetic", trainCount: 12, validationCount: 2, seed: 3 });

/** A 4-step tune() of llama-tiny on the given backend (CUDA at fp32), evaluated at the end. */
async function tuneRun(backend: "cpu" | "cuda", mode: TuneMode, extra: Partial<TuneOptions> = {}) {
  const model = await loadModel(
    modelDir("llama-tiny"),
    backend === "cuda" ? { backend, precision: "fp32" } : { backend, threads: 2 },
  );
  try {
    expect(model.backend).toBe(backend);
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const steps: StepRecord[] = [];
    const { onStep, ...rest } = extra;
    const result = await tune({
      model,
      task: await tuneTask,
      prior,
      mode,
      promptLength: 4,
      deepLayers: [0, 1],
      deepLength: 3,
      steps: 4,
      batchSize: 4,
      evalEvery: 4,
      maxNewTokens: 4,
      optimizer: { lr: 1e-2, clipNorm: 1 },
      seed: 5,
      ...rest,
      onStep: (s) => {
        steps.push(s);
        onStep?.(s);
      },
    });
    return { result, steps };
  } finally {
    model.dispose();
  }
}

function firstTensor(r: TuneResult): Float32Array {
  return r.prompt ?? (r.deepPrompts as { keys: Float32Array[] }).keys[0]!;
}

/**
 * Three steps on one trainer; a second trainer gets its tensors and optimizer state; both take two more
 * steps on the same batches: equal losses and tensors (bit for bit: same backend, same kernels).
 */
async function trainerStateRoundTrip(backend: "cpu" | "cuda"): Promise<{ same: boolean; detail?: string }> {
  const g = readGolden("llama-tiny");
  const base = goldenBatch(g);
  const prompt = toFloat32(g.get("prompt"));
  const { maxGradNorm: _, ...opts } = goldenAdamW(g);
  const load = () =>
    loadModel(
      modelDir("llama-tiny"),
      backend === "cuda" ? { backend, precision: "fp32" } : { backend, threads: 2 },
    );
  // Two models: a CUDA model holds one trainer's tensors at a time.
  const [model, other] = [await load(), await load()];
  try {
    const a = await model.promptTrainer({ prompt }, opts);
    for (let i = 0; i < 3; i++) await a.step(base);
    const state = await a.optimizerState();
    if (state.step !== 3) return { same: false, detail: `step ${state.step}` };
    const b = await other.promptTrainer(await a.tensors(), opts);
    await b.setOptimizerState(state);
    for (let i = 0; i < 2; i++) {
      const [ra, rb] = [await a.step(base), await b.step(base)];
      if (ra.loss !== rb.loss || ra.step !== rb.step)
        return { same: false, detail: `step ${ra.step}: ${ra.loss} vs ${rb.loss}` };
    }
    const [pa, pb] = [(await a.tensors()).prompt!, (await b.tensors()).prompt!];
    const sa = await a.optimizerState();
    const sb = await b.optimizerState();
    const same =
      pa.every((v, i) => v === pb[i]) &&
      sa.step === 5 &&
      sb.step === 5 &&
      sa.v[0]!.every((v, i) => v === sb.v[0]![i]);
    if (!same) return { same, detail: "tensors or moments differ" };
    if (backend === "cuda") {
      // A second trainer on the same model takes over its device tensors: the first one says so.
      await model.promptTrainer({ prompt }, opts);
      const message = await a.step(base).then(
        () => "",
        (e: Error) => e.message,
      );
      if (!/replaced this trainer's device tensors/.test(message))
        return { same: false, detail: `replaced trainer: ${message || "no error"}` };
    }
    return { same };
  } finally {
    model.dispose();
    other.dispose();
  }
}

describe.skipIf(!cuda.usable)(`CUDA backend${suffix}`, () => {
  it("every CUDA op matches its CPU reference", async () => {
    const { cudaSelfTest } = await import("../lib/index.js");
    const checks = await cudaSelfTest();
    expectAllPass(
      checks.map((c) => ({ group: c.op, name: c.shape, err: c.err, tol: c.tol, pass: c.pass, note: c.note })),
    );
  }, 300_000);
  for (const precision of ["fp32", "tf32", "bf16"] as const)
    for (const name of FIXTURE_MODELS)
      it(`${name}, ${precision}: golden fixtures (forward, gradients, 10-step curve)`, async () => {
        expectAllPass(await fixtureChecks(name, precision));
      }, 120_000);
  for (const precision of ["fp32", "bf16"] as const)
    for (const arch of ["gpt2", "llama"] as const)
      it(`random ${arch} (hd 64), ${precision}: CPU agreement, graph replay`, async () => {
        expectAllPass(await randomModelChecks(arch, precision));
      }, 300_000);
  // tune() on CUDA: soft and deep-prefix take the device-resident step, a regulariser the host path.
  it.each([
    ["soft", false],
    ["deep-prefix", false],
    ["soft", true],
  ] as const)(
    "tune() (%s, regulariser %s) on CUDA at fp32 follows the CPU run step for step, evaluation included",
    async (mode, regularized) => {
      const extra: Partial<TuneOptions> = regularized
        ? { regularizer: { regularizer: { kind: "l2-init" }, lambda: 0.5 } }
        : {};
      const gpu = await tuneRun("cuda", mode, extra);
      const cpu = await tuneRun("cpu", mode, extra);
      expect(gpu.steps.length).toBe(4);
      gpu.steps.forEach((s, i) => {
        const c = cpu.steps[i]!;
        expect(Math.abs(s.loss - c.loss) / c.loss, `step ${i + 1} loss`).toBeLessThan(1e-4);
        expect(Math.abs(s.gradNorm - c.gradNorm) / c.gradNorm, `step ${i + 1} gradient norm`).toBeLessThan(
          1e-3,
        );
      });
      const [ge, ce] = [gpu.result.evals[0]!, cpu.result.evals[0]!];
      expect(Math.abs(ge.validationLoss - ce.validationLoss) / ce.validationLoss).toBeLessThan(1e-4);
      const r = compare(firstTensor(gpu.result), firstTensor(cpu.result));
      expect(r.maxAbs / r.scale).toBeLessThan(1e-3);
    },
    300_000,
  );
  it("tune() on CUDA resumes from its checkpoint (device AdamW state restored) to the uninterrupted run", async () => {
    const dir = mkdtempSync(join(tmpdir(), "priortune-cuda-tune-"));
    try {
      const whole = await tuneRun("cuda", "soft", { runDir: join(dir, "whole"), checkpointEvery: 2 });
      const controller = new AbortController();
      const opts = { runDir: join(dir, "cut"), checkpointEvery: 2, signal: controller.signal };
      await expect(
        tuneRun("cuda", "soft", {
          ...opts,
          onStep: (s) => {
            if (s.step === 3) controller.abort();
          },
        }),
      ).rejects.toThrow(/aborted/);
      const resumed = await tuneRun("cuda", "soft", { ...opts, signal: undefined });
      expect(resumed.result.resumedFrom).toBe(2);
      expect(resumed.steps.map((s) => s.step)).toEqual([3, 4]);
      expect(resumed.steps.map((s) => s.loss)).toEqual(whole.steps.slice(2).map((s) => s.loss));
      expect(resumed.result.prompt).toEqual(whole.result.prompt);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 300_000);
  it("PromptTrainer's optimizer state round-trips: a trainer given it steps as the original", async () => {
    expect(await trainerStateRoundTrip("cuda")).toEqual({ same: true });
  }, 120_000);
  it("collapseReport with the CUDA index equals the CPU report", async () => {
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 2 });
    try {
      const emb = model.tokenEmbeddings();
      const d = model.config.hiddenSize;
      // Two prompt rows on token embeddings (collapsed) and three random ones.
      const prompt = new Float32Array(5 * d).map((_, i) => Math.sin(i * 0.37) * 0.3);
      prompt.set(emb.subarray(11 * d, 12 * d), 0);
      prompt.set(emb.subarray(40 * d, 41 * d), 3 * d);
      const [cpu, gpu] = [
        await collapseReport(prompt, model, { k: 4, seed: 2, backend: "cpu" }),
        await collapseReport(prompt, model, { k: 4, seed: 2, backend: "cuda" }),
      ];
      expect([cpu.reference.backend, gpu.reference.backend]).toEqual(["cpu", "cuda"]);
      expect(gpu.vectors.map((v) => v.nearest.map((n) => n.id))).toEqual(
        cpu.vectors.map((v) => v.nearest.map((n) => n.id)),
      );
      expect(gpu.aggregate.projectedPrompt).toBe(cpu.aggregate.projectedPrompt);
      expect(gpu.aggregate.collapseRate).toBe(cpu.aggregate.collapseRate);
      gpu.vectors.forEach((v, i) => {
        const c = cpu.vectors[i]!;
        expect(v.nearest[0]!.cosine).toBeCloseTo(c.nearest[0]!.cosine, 6);
        expect(v.nearestDistancePercentile.l2).toBeCloseTo(c.nearestDistancePercentile.l2, 6);
      });
    } finally {
      model.dispose();
    }
  }, 120_000);
  it("the CLI tunes on CUDA (--backend cuda --precision fp32) and says so", () => {
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
  }, 120_000);
  it("out of memory is a JS error and the model keeps working", async () => {
    expectAllPass(await errorChecks());
  }, 120_000);
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
    expect(await trainerStateRoundTrip("cpu")).toEqual({ same: true });
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
