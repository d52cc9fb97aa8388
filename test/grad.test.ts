// Loss and prompt gradients against PyTorch autograd in float64 (test/fixtures/golden, see its README):
// soft prompt, deep prompts of both kinds (hidden: the paper's variant, against the generator's own
// reference; prefix: against PEFT's prefix-tuning), with right padding, for all three fixture models.
// Tolerance: relative error of each gradient tensor (max |ours - ref| / max |ref|) below 1e-3; fp32
// rounding through a few layers gives ~1e-6, so 1e-3 only absorbs summation-order noise.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AdamW, loadModel, type Model } from "../lib/index.js";
import { compare, goldenAdamW, goldenBatch, modelDir, readGolden, toFloat32, toInt32 } from "./helpers.js";

const GRAD_TOL = 1e-3;
const MODELS = ["gpt2-tiny", "llama-tiny", "llama-tiny-untied"] as const;

function expectClose(actual: Float32Array, expected: ArrayLike<number>, what: string) {
  const r = compare(actual, expected);
  expect(r.maxAbs / r.scale, what).toBeLessThan(GRAD_TOL);
}

function split(data: ArrayLike<number>, parts: number): Float32Array[] {
  const per = data.length / parts;
  return Array.from({ length: parts }, (_, i) =>
    Float32Array.from(Array.prototype.slice.call(data, i * per, (i + 1) * per)),
  );
}

describe.each(MODELS)("gradients match PyTorch autograd: %s", (name) => {
  const g = readGolden(name);
  const base = goldenBatch(g);
  const prompt = toFloat32(g.get("prompt"));
  const L = Number(g.meta.L);
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(modelDir(name), { backend: "cpu", threads: 2 });
  });
  afterAll(() => model?.dispose());

  it("soft prompt: loss and d loss / d prompt", async () => {
    const out = await model.lossAndGrad({ ...base, prompt });
    const loss = (g.get("loss") as Float64Array)[0]!;
    expect(Math.abs(out.loss - loss) / loss).toBeLessThan(1e-5);
    expectClose(out.promptGrad!, g.get("prompt_grad") as Float64Array, "prompt_grad");
  });

  it('deep prompts, kind "hidden" (with a soft prompt)', async () => {
    const layers = Array.from(toInt32(g.get("deep_hidden_layers")));
    const vectors = split(g.get("deep_hidden_vectors") as Float64Array, layers.length);
    const out = await model.lossAndGrad({
      ...base,
      prompt,
      deepPrompts: { kind: "hidden", layers, vectors },
    });
    const loss = (g.get("deep_hidden_loss") as Float64Array)[0]!;
    expect(Math.abs(out.loss - loss) / loss).toBeLessThan(1e-5);
    expectClose(out.promptGrad!, g.get("deep_hidden_prompt_grad") as Float64Array, "prompt grad");
    const d = out.deepPromptGrads!;
    expect(d.kind).toBe("hidden");
    const expected = split(g.get("deep_hidden_grads") as Float64Array, layers.length);
    if (d.kind === "hidden")
      for (const [i, v] of d.vectors.entries()) expectClose(v, expected[i]!, `layer ${layers[i]}`);
    const fwd = await model.forward({ ...base, prompt, deepPrompts: { kind: "hidden", layers, vectors } });
    const r = compare(fwd.logits!, g.get("deep_hidden_logits") as Float64Array);
    expect(r.maxAbs).toBeLessThan(1e-4 * r.scale);
  });

  it('deep prompts, kind "prefix" (PEFT prefix-tuning, every layer)', async () => {
    const layers = Array.from({ length: L }, (_, i) => i);
    const keys = split(g.get("prefix_keys") as Float64Array, L);
    const values = split(g.get("prefix_values") as Float64Array, L);
    const deepPrompts = { kind: "prefix" as const, layers, keys, values };
    const out = await model.lossAndGrad({ ...base, deepPrompts });
    const loss = (g.get("prefix_loss") as Float64Array)[0]!;
    expect(Math.abs(out.loss - loss) / loss).toBeLessThan(1e-5);
    expect(out.promptGrad).toBeUndefined();
    const d = out.deepPromptGrads!;
    const ek = split(g.get("prefix_key_grads") as Float64Array, L);
    const ev = split(g.get("prefix_value_grads") as Float64Array, L);
    if (d.kind !== "prefix") throw new Error("expected prefix gradients");
    for (let l = 0; l < L; l++) {
      expectClose(d.keys[l]!, ek[l]!, `keys ${l}`);
      expectClose(d.values[l]!, ev[l]!, `values ${l}`);
    }
    const fwd = await model.forward({ ...base, deepPrompts });
    const r = compare(fwd.logits!, g.get("prefix_logits") as Float64Array);
    expect(r.maxAbs).toBeLessThan(1e-4 * r.scale);
  });

  it("10 AdamW steps follow PyTorch's loss curve", async () => {
    const expected = g.get("curve_losses") as Float64Array;
    const p = prompt.slice();
    const { maxGradNorm: _, ...adamw } = goldenAdamW(g); // AdamW does not clip
    const opt = new AdamW([p], adamw);
    for (let step = 0; step < expected.length; step++) {
      const out = await model.lossAndGrad({ ...base, prompt: p });
      expect(Math.abs(out.loss - expected[step]!) / expected[step]!, `step ${step}`).toBeLessThan(1e-4);
      opt.step([out.promptGrad!]);
    }
    const r = compare(p, g.get("curve_final_prompt") as Float64Array);
    expect(r.maxAbs / r.scale).toBeLessThan(1e-4);
  });

  it("whole-model central differences agree on the largest prompt-gradient coordinates", async () => {
    // fp32 loss differences: h = 2e-2 keeps rounding noise (~1e-6 / h) well under the 3% tolerance.
    const out = await model.lossAndGrad({ ...base, prompt });
    const grad = out.promptGrad!;
    const order = Array.from(grad.keys()).sort((a, b) => Math.abs(grad[b]!) - Math.abs(grad[a]!));
    const top = Math.abs(grad[order[0]!]!);
    const h = 2e-2;
    for (const i of order.slice(0, 4)) {
      const p = prompt.slice();
      p[i] = prompt[i]! + h;
      const up = (await model.forward({ ...base, prompt: p, logits: false })).loss!;
      p[i] = prompt[i]! - h;
      const down = (await model.forward({ ...base, prompt: p, logits: false })).loss!;
      expect(Math.abs((up - down) / (2 * h) - grad[i]!), `coordinate ${i}`).toBeLessThan(3e-2 * top);
    }
  });

  it("is deterministic for a fixed thread count", async () => {
    const a = await model.lossAndGrad({ ...base, prompt });
    const b = await model.lossAndGrad({ ...base, prompt });
    expect(a.loss).toBe(b.loss);
    expect(Buffer.from(a.promptGrad!.buffer).equals(Buffer.from(b.promptGrad!.buffer))).toBe(true);
  });
});
