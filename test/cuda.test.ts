// The CUDA backend. On a machine with a usable CUDA device: every op against its CPU reference (the addon's
// self-test), every fixture model at fp32 / tf32 / bf16 against the float64 PyTorch golden files (forward,
// soft / hidden / prefix gradients, the 10-step AdamW curve on device-resident prompts), random models with
// realistic head sizes against the CPU backend, CUDA-graph replay against eager launches (bit-identical),
// and errors (out of memory) as JS errors. The checks and their tolerances live in test/cuda-checks.ts,
// which scripts/gpu-check.ts also runs. Without a device that suite is skipped with the probe's reason; the
// CPU half of PromptTrainer (the reference of the device-resident step) is tested everywhere.
import { describe, expect, it } from "vitest";
import {
  AdamW,
  createPrior,
  cudaStatus,
  loadModel,
  loadTask,
  type StepRecord,
  type TuneMode,
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
  it.each(["soft", "deep-prefix"] as const)(
    "tune() (%s) on CUDA at fp32 follows the CPU run step for step, evaluation included",
    async (mode: TuneMode) => {
      const task = await loadTask({ kind: "arithmetic", trainCount: 12, validationCount: 2, seed: 3 });
      const run = async (backend: "cpu" | "cuda") => {
        const model = await loadModel(
          modelDir("llama-tiny"),
          backend === "cuda" ? { backend, precision: "fp32" } : { backend, threads: 2 },
        );
        try {
          expect(model.backend).toBe(backend);
          const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
          const steps: StepRecord[] = [];
          const r = await tune({
            model,
            task,
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
            onStep: (s) => steps.push(s),
          });
          return { r, steps };
        } finally {
          model.dispose();
        }
      };
      const gpu = await run("cuda");
      const cpu = await run("cpu");
      expect(gpu.steps.length).toBe(4);
      gpu.steps.forEach((s, i) => {
        const c = cpu.steps[i]!;
        expect(Math.abs(s.loss - c.loss) / c.loss, `step ${i + 1} loss`).toBeLessThan(1e-4);
        expect(Math.abs(s.gradNorm - c.gradNorm) / c.gradNorm, `step ${i + 1} gradient norm`).toBeLessThan(
          1e-3,
        );
      });
      const [ge, ce] = [gpu.r.evals[0]!, cpu.r.evals[0]!];
      expect(Math.abs(ge.validationLoss - ce.validationLoss) / ce.validationLoss).toBeLessThan(1e-4);
      const a = mode === "soft" ? gpu.r.prompt! : (gpu.r.deepPrompts as { keys: Float32Array[] }).keys[0]!;
      const b = mode === "soft" ? cpu.r.prompt! : (cpu.r.deepPrompts as { keys: Float32Array[] }).keys[0]!;
      const r = compare(a, b);
      expect(r.maxAbs / r.scale).toBeLessThan(1e-3);
    },
    300_000,
  );
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
    } finally {
      model.dispose();
    }
  });
});
