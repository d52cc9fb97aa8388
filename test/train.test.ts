// The tuning loop on a fixture model: loss falls for each mode, regularisers pull where they should, run
// directories hold what they promise, and a run killed mid-way resumes to the same prompt, bit for bit.
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { Worker } from "node:worker_threads";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadModel, type Model } from "../lib/model.js";
import { createPrior, createRegularizer } from "../lib/priors.js";
import { readTensors, writeSafetensors } from "../lib/safetensors.js";
import { loadTask, type Task } from "../lib/tasks.js";
import { loadTokenizer } from "../lib/tokenizer.js";
import {
  bucketBatches,
  combineMicroBatches,
  endOfText,
  evaluatePrompt,
  learningRate,
  plateaued,
  readPromptFile,
  type StepRecord,
  tune,
} from "../lib/train.js";
import { copyModelDir, fixtures, modelDir } from "./helpers.js";

const here = dirname(fileURLToPath(import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), "priortune-train-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

describe("tune on llama-tiny", () => {
  let model: Model;
  let task: Task;
  beforeAll(async () => {
    model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    task = await loadTask({ kind: "arithmetic", trainCount: 48, validationCount: 4, seed: 3 });
  });
  afterAll(() => model?.dispose());

  it.each(["soft", "deep-hidden", "deep-prefix"] as const)("loss falls (%s)", async (mode) => {
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const losses: number[] = [];
    await tune({
      model,
      task,
      prior,
      mode,
      promptLength: 4,
      deepLayers: [1, 2],
      deepLength: 3,
      steps: 40,
      batchSize: 8,
      optimizer: { lr: 3e-2 },
      seed: 1,
      onStep: (r) => losses.push(r.taskLoss),
    });
    expect(mean(losses.slice(-8))).toBeLessThan(mean(losses.slice(0, 8)) - 0.05);
  });

  it("writes a run directory: run.json, metrics.jsonl, snapshots, the final prompt with metadata", async () => {
    const runDir = join(tmp, "run");
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const result = await tune({
      model,
      task,
      prior,
      promptLength: 4,
      steps: 6,
      batchSize: 4,
      evalEvery: 3,
      snapshotEvery: 3,
      runDir,
      seed: 2,
    });
    const run = JSON.parse(readFileSync(join(runDir, "run.json"), "utf8"));
    expect(run.prior.kind).toBe("gaussian");
    expect(run.model.fingerprint).toMatch(/^[0-9a-f]{64}$/);
    const lines = readFileSync(join(runDir, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(lines.filter((l) => l.type === "step").map((l: StepRecord) => l.step)).toEqual([1, 2, 3, 4, 5, 6]);
    const evals = lines.filter((l) => l.type === "eval");
    expect(evals.map((e) => e.step)).toEqual([3, 6]);
    expect(evals[1].accuracy).toBeGreaterThanOrEqual(0);
    expect(evals[1].collapse.collapseRate).toBeGreaterThanOrEqual(0);
    for (const s of [0, 3, 6])
      expect(existsSync(join(runDir, "snapshots", `step-00000${s}.safetensors`))).toBe(true);
    const saved = readPromptFile(join(runDir, "prompt.safetensors"));
    expect(saved.metadata.kind).toBe("final");
    expect(Buffer.from(saved.prompt!.buffer).equals(Buffer.from(result.prompt!.buffer))).toBe(true);
  });

  it("regulariser specs are built by tune (prior-nll pulls toward the prior mean)", async () => {
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const dist = async (lambda: number) => {
      const r = await tune({
        model,
        task,
        prior,
        promptLength: 4,
        steps: 15,
        batchSize: 8,
        optimizer: { lr: 3e-2 },
        seed: 6,
        regularizer: lambda ? { regularizer: { kind: "prior-nll" }, lambda } : undefined,
      });
      let d = 0;
      for (const v of r.prompt!) d += v * v;
      return Math.sqrt(d);
    };
    expect(await dist(5)).toBeLessThan(await dist(0));
  });

  it("an l2-init regulariser with a large weight keeps the prompt near its start", async () => {
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const run = async (lambda: number) => {
      const init = prior.sample(4, new (await import("../lib/rng.js")).Rng(5));
      const regularizer = createRegularizer({ kind: "l2-init" }, { init, dim: model.config.hiddenSize });
      const r = await tune({
        model,
        task,
        prior,
        promptLength: 4,
        steps: 15,
        batchSize: 8,
        optimizer: { lr: 3e-2 },
        seed: 5,
        regularizer: lambda ? { regularizer, lambda } : undefined,
      });
      let d = 0;
      for (let i = 0; i < init.length; i++) d += (r.prompt![i]! - init[i]!) ** 2;
      return Math.sqrt(d);
    };
    expect(await run(50)).toBeLessThan(0.5 * (await run(0)));
  });

  it("refuses options that would hang, train on nothing or fail at the last step", async () => {
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const base = { model, task, prior, promptLength: 4, steps: 2 };
    // 2^32 would run seed 0's run under another name.
    await expect(tune({ ...base, seed: 2 ** 32 })).rejects.toThrow(
      "seed: expected an integer from 0 to 2^32 - 1",
    );
    await expect(tune({ ...base, batchSize: 0 })).rejects.toThrow(
      "batchSize: expected an integer >= 1, got 0",
    );
    await expect(tune({ ...base, optimizer: { accumulate: 1.5 } })).rejects.toThrow(
      "optimizer.accumulate: expected an integer >= 1, got 1.5",
    );
    await expect(tune({ ...base, optimizer: { warmupSteps: -5 } })).rejects.toThrow(
      "optimizer.warmupSteps: expected an integer >= 0",
    );
    await expect(tune({ ...base, optimizer: { schedule: "cosin" as unknown as "cosine" } })).rejects.toThrow(
      'optimizer.schedule: expected "constant", "linear" or "cosine", got "cosin"',
    );
    await expect(
      tune({ ...base, regularizer: { regularizer: { kind: "l2-init" }, lambda: -1 } }),
    ).rejects.toThrow("regularizer.lambda: expected a finite number >= 0, got -1");
    // 20 positions less 4 prompt vectors leave 16, none of them for a question before 16 generated tokens:
    // refused before training (it used to fail at the final evaluation, after every step had run).
    const steps: number[] = [];
    await expect(
      tune({ ...base, maxLength: 20, maxNewTokens: 16, onStep: (r) => steps.push(r.step) }),
    ).rejects.toThrow("maxNewTokens: maxLength 20 less 4 prompt positions leaves 16");
    expect(steps).toEqual([]);
  });

  it("plain-text tasks (C4) keep the first tokens of a long document, in training and in evaluation", async () => {
    // 12 positions less 4 prompt vectors: 8 tokens, fewer than the validation document's (9 words and EOS).
    // The evaluation encoded without truncation before: every step trained, then the evaluation threw.
    const c4 = await loadTask({
      kind: "c4",
      path: join(fixtures, "data", "c4-sample.json"),
      trainCount: 2,
      validationCount: 1,
      shuffle: false,
    });
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const r = await tune({ model, task: c4, prior, promptLength: 4, steps: 1, batchSize: 2, maxLength: 12 });
    expect(Number.isFinite(r.evals.at(-1)!.validationLoss)).toBe(true);
  });

  it("is identical for a seed (CPU, fixed threads)", async () => {
    const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
    const a = await tune({ model, task, prior, promptLength: 4, steps: 5, batchSize: 4, seed: 9 });
    const b = await tune({ model, task, prior, promptLength: 4, steps: 5, batchSize: 4, seed: 9 });
    expect(Buffer.from(a.prompt!.buffer).equals(Buffer.from(b.prompt!.buffer))).toBe(true);
  });
});

describe("resume after a kill", () => {
  it("a run killed after step 8 resumes from its step-5 checkpoint and ends bit-identical", () => {
    const child = join(here, "support", "tune-child.ts");
    const dir = modelDir("llama-tiny");
    const whole = join(tmp, "whole");
    const killed = join(tmp, "killed");
    execFileSync(process.execPath, ["--import", "tsx", child, dir, whole, "12"]);
    const crash = spawnSync(process.execPath, ["--import", "tsx", child, dir, killed, "12"], {
      env: { ...process.env, CRASH_AT: "8" },
    });
    expect(crash.signal).toBe("SIGKILL");
    const checkpointJson = join(killed, "checkpoint.json");
    const state = JSON.parse(readFileSync(checkpointJson, "utf8"));
    expect(state.step).toBe(5);
    // A kill between the checkpoint's two writes leaves checkpoint.json one checkpoint behind its tensors:
    // the resume takes the state written inside checkpoint.safetensors, so it still ends bit-identical
    // (it used to pair the newer tensors with the older step, RNG and batch order).
    writeFileSync(checkpointJson, JSON.stringify({ ...state, step: 0, optimizerStep: 0, epochCursor: 0 }));
    execFileSync(process.execPath, ["--import", "tsx", child, dir, killed, "12"]);
    const a = readPromptFile(join(whole, "prompt.safetensors")).prompt!;
    const b = readPromptFile(join(killed, "prompt.safetensors")).prompt!;
    expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer))).toBe(true);
    // metrics.jsonl lost nothing and repeated nothing: one line per step.
    const steps = (p: string) =>
      readFileSync(join(p, "metrics.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l))
        .filter((l) => l.type === "step");
    expect(steps(killed).map((l) => l.step)).toEqual(steps(whole).map((l) => l.step));
    expect(steps(killed).map((l) => l.loss)).toEqual(steps(whole).map((l) => l.loss));
  });
});

describe("run directories of the previous version", () => {
  it("resume: a run.json without the newer fields and a checkpoint whose state is in checkpoint.json", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const task = await loadTask({ kind: "arithmetic", trainCount: 24, validationCount: 2, seed: 3 });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      const run = (runDir: string, signal?: AbortSignal, onStep?: (r: StepRecord) => void) =>
        tune({
          model,
          task,
          prior,
          promptLength: 4,
          steps: 6,
          batchSize: 4,
          seed: 2,
          runDir,
          checkpointEvery: 3,
          signal,
          onStep,
        });
      const whole = await run(join(tmp, "v1-whole"));
      const old = join(tmp, "v1-old");
      const stop = new AbortController();
      // Aborted after step 4: the steps since the step-3 checkpoint are checkpointed before it stops.
      await expect(run(old, stop.signal, (r) => r.step === 4 && stop.abort())).rejects.toThrow(
        `tune: aborted at step 4 (checkpointed in ${old}`,
      );
      // Make it look as the previous version wrote it: no newer run.json fields, no state in the tensors.
      const runJson = join(old, "run.json");
      const record = JSON.parse(readFileSync(runJson, "utf8"));
      for (const k of [
        "prefixInitStd",
        "evalExamples",
        "collapseEvery",
        "addSpecialTokens",
        "encoding",
        "eosId",
        "deepPriors",
        "earlyStopping",
      ])
        delete record[k];
      writeFileSync(runJson, JSON.stringify(record, null, 2));
      const file = join(old, "checkpoint.safetensors");
      const { tensors, metadata } = readTensors(file);
      writeSafetensors(
        file,
        [...tensors].map(([name, t]) => ({
          name,
          dtype: "F32" as const,
          shape: t.shape,
          data: t.data as Float32Array,
        })),
        { step: metadata.step! },
      );
      const resumed = await run(old);
      expect(resumed.resumedFrom).toBe(4);
      expect(Buffer.from(resumed.prompt!.buffer).equals(Buffer.from(whole.prompt!.buffer))).toBe(true);
      // A run.json task without a split was divided train first: resuming it with a task loaded the new
      // way (validation first) is refused, and the error says how to load it.
      delete record.task.split;
      writeFileSync(runJson, JSON.stringify(record, null, 2));
      await expect(run(old)).rejects.toThrow(
        /run\.json differs in task: its task's split is "train-first", this one's "validation-first"; load the task with split: "train-first"/,
      );
    } finally {
      model.dispose();
    }
  });
});

describe("a task without validation examples", () => {
  it("is refused before training when validation was asked for; validationCount 0 trains without scores", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      const path = join(tmp, "eight.txt");
      writeFileSync(path, Array.from({ length: 8 }, (_, i) => `What is ${i} + 1?\n${i + 1}`).join("\n"));
      // 8 examples, trainCount 8: validation got none, and every evaluation was NaN (exit 0).
      const full = await loadTask({ kind: "mathematics", path, trainCount: 8 });
      expect(full.validation).toHaveLength(0);
      await expect(tune({ model, task: full, prior, promptLength: 2, steps: 1 })).rejects.toThrow(
        /no validation examples \(trainCount took all 8 the source has\)/,
      );
      const none = await loadTask({ kind: "mathematics", path, trainCount: 8, validationCount: 0 });
      const r = await tune({ model, task: none, prior, promptLength: 2, steps: 1, maxNewTokens: 2 });
      expect(r.evals.at(-1)!.step).toBe(1);
    } finally {
      model.dispose();
    }
  });
});

describe("a run directory in use", () => {
  it("is refused while its process lives (two tunes interleaved their metrics); a dead one's lock is taken over", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const task = await loadTask({ kind: "arithmetic", trainCount: 4, validationCount: 2, seed: 1 });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      const runDir = join(tmp, "locked");
      const run = () => tune({ model, task, prior, promptLength: 2, steps: 1, maxNewTokens: 2, runDir });
      mkdirSync(runDir, { recursive: true });
      const other = spawn("sleep", ["60"]);
      try {
        writeFileSync(join(runDir, ".lock"), `${other.pid} ${hostname()}`);
        await expect(run()).rejects.toThrow(`${runDir}: the run directory is in use by process ${other.pid}`);
      } finally {
        other.kill();
      }
      // A process that has ended, and this pid in a lock this process does not hold (a container's earlier
      // run restarted as pid 1 was refused for good): both taken over.
      writeFileSync(join(runDir, ".lock"), "999999999");
      expect((await run()).steps).toBe(1);
      writeFileSync(join(runDir, ".lock"), `${process.pid} ${hostname()}`);
      expect((await run()).steps).toBe(1);
      expect(existsSync(join(runDir, ".lock"))).toBe(false);
      // Another host's lock cannot be checked: refused, saying how to clear it.
      writeFileSync(join(runDir, ".lock"), "1234 some-other-host");
      await expect(run()).rejects.toThrow(
        /locked by process 1234 on host some-other-host \(if it no longer runs, delete /,
      );
      rmSync(join(runDir, ".lock"));
      // A worker thread of this process holding it (each thread has its own modules: a lock with this pid
      // counted as stale, and two threads' tunes interleaved): refused, then taken once it is released.
      const files = join(dirname(fileURLToPath(import.meta.url)), "..", "lib", "files.ts");
      const worker = new Worker(
        `import { parentPort } from "node:worker_threads";
         import { register } from "tsx/esm/api";
         register();
         const { lockDirectory } = await import(${JSON.stringify(pathToFileURL(files).href)});
         const release = lockDirectory(${JSON.stringify(runDir)}, "the run directory");
         parentPort.postMessage("held");
         parentPort.once("message", () => { release(); parentPort.postMessage("released"); });`,
        { eval: true },
      );
      const next = () =>
        new Promise((done, fail) => {
          worker.once("message", done);
          worker.once("error", fail);
        });
      try {
        expect(await next()).toBe("held");
        await expect(run()).rejects.toThrow(
          `${runDir}: the run directory is in use by process ${process.pid} (this one)`,
        );
        worker.postMessage("release");
        expect(await next()).toBe("released");
        expect((await run()).steps).toBe(1);
      } finally {
        await worker.terminate();
      }
      // A worker terminated while it holds the lock (no JS release runs): its hold ends with it.
      const held = new Worker(
        `import { parentPort } from "node:worker_threads";
         import { register } from "tsx/esm/api";
         register();
         const { lockDirectory } = await import(${JSON.stringify(pathToFileURL(files).href)});
         lockDirectory(${JSON.stringify(runDir)}, "the run directory");
         parentPort.postMessage("held");`,
        { eval: true },
      );
      await new Promise((done, fail) => {
        held.once("message", done);
        held.once("error", fail);
      });
      await held.terminate();
      expect((await run()).steps).toBe(1);
      // Two spellings of one directory are one lock (the registry compares paths).
      const { lockDirectory } = await import("../lib/files.js");
      const release = lockDirectory(runDir, "the run directory");
      try {
        expect(() => lockDirectory(relative(process.cwd(), runDir), "the run directory")).toThrow(
          "(this one)",
        );
      } finally {
        release();
      }
    } finally {
      model.dispose();
    }
  });
});

describe("GPT-2's learned positions", () => {
  it("maxLength defaults to the model's positions when fewer; a longer one is refused before step 1", async () => {
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 2 }); // 64 positions
    try {
      const task = await loadTask({ kind: "arithmetic", trainCount: 4, validationCount: 2, seed: 1 });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      await expect(tune({ model, task, prior, promptLength: 4, steps: 1, maxLength: 100 })).rejects.toThrow(
        "maxLength: 100 exceeds the model's 64 positions",
      );
      // Default 256 before: trained, then failed at the final evaluation (20 + 34 + 15 > 64 positions).
      const r = await tune({ model, task, prior, promptLength: 20, steps: 1, batchSize: 2 });
      expect(r.evals.at(-1)!.step).toBe(1);
    } finally {
      model.dispose();
    }
  });
});

describe("texts as the tokenizer frames them", () => {
  it("a validation example that cannot fit is refused before step 1, naming it", async () => {
    const model = await loadModel(modelDir("gpt2-tiny"), { backend: "cpu", threads: 2 });
    try {
      const path = join(tmp, "long-validation.jsonl");
      const rec = (completion: string) => JSON.stringify({ prompt: "Q: name it\nA:", completion });
      writeFileSync(join(tmp, "short-train.jsonl"), `${rec(" cat")}\n${rec(" dog")}\n`);
      writeFileSync(path, `${rec(" owl")}\n${rec(` ${"very long answer ".repeat(30)}`)}\n`);
      const task = await loadTask({
        kind: "jsonl",
        path: join(tmp, "short-train.jsonl"),
        validationPath: path,
      });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      const runDir = join(tmp, "long-validation-run");
      // It trained every step, then failed at the final evaluation, before saving the prompt.
      await expect(
        tune({ model, task, prior, promptLength: 4, steps: 3, maxLength: 40, runDir }),
      ).rejects.toThrow(
        /task jsonl:short-train\.jsonl: validation example [12]: maxLength: 36 tokens cannot hold the completion \(\d+ tokens with EOS\)/,
      );
      expect(existsSync(join(runDir, "metrics.jsonl"))).toBe(false);
    } finally {
      model.dispose();
    }
  });

  it("special tokens (BOS) go before each text, recorded in run.json; end of text from tokenizer_config", async () => {
    // llama-tiny with a tokenizer that puts <|endoftext|> first, as Llama 3's puts <|begin_of_text|>.
    const dir = join(tmp, "llama-bos");
    copyModelDir("llama-tiny", dir);
    const tj = JSON.parse(readFileSync(join(dir, "tokenizer.json"), "utf8"));
    tj.post_processor = {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<|endoftext|>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ Sequence: { id: "A", type_id: 0 } }, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: {
        "<|endoftext|>": { id: "<|endoftext|>", ids: [tj.added_tokens[0].id], tokens: ["<|endoftext|>"] },
      },
    };
    writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tj));
    const model = await loadModel(dir, { backend: "cpu", threads: 2 });
    try {
      expect(model.tokenizer!.encode("x", { addSpecialTokens: true })[0]).toBe(tj.added_tokens[0].id);
      const task = await loadTask({ kind: "arithmetic", trainCount: 8, validationCount: 2, seed: 4 });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      const runDir = join(tmp, "bos-run");
      const short = { model, task, prior, promptLength: 2, steps: 2, batchSize: 4, maxNewTokens: 2 };
      const r = await tune({ ...short, runDir });
      expect(JSON.parse(readFileSync(join(runDir, "run.json"), "utf8")).addSpecialTokens).toBe(true);
      const evalWith = (addSpecialTokens: boolean) =>
        evaluatePrompt({
          model,
          task,
          prompt: r.prompt,
          maxLength: 254,
          maxNewTokens: 2,
          addSpecialTokens,
          scores: false,
        });
      const [withBos, without] = [await evalWith(true), await evalWith(false)];
      expect(r.evals.at(-1)!.validationLoss).toBe(withBos.validationLoss);
      expect(withBos.validationLoss).not.toBe(without.validationLoss);
      const off = await tune({ ...short, addSpecialTokens: false });
      expect(off.evals.at(-1)!.validationLoss).not.toBe(r.evals.at(-1)!.validationLoss);
    } finally {
      model.dispose();
    }
    // tokenizer_config.json's eos_token names the end of text (Llama 3 Instruct's <|eot_id|>), as a string
    // or an AddedToken object; without it, the usual names.
    const tok = (config: unknown) => {
      writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(config));
      return { tokenizer: loadTokenizer(dir) };
    };
    const id = (t: string) => loadTokenizer(dir).tokenToId(t);
    // A run recorded before the text encoding was (encoding 1) ends its answers with the usual name, as it
    // was trained; this version's (2) with the configured eos_token: their validation losses differ.
    tok({ eos_token: "a" });
    const reloaded = await loadModel(dir, { backend: "cpu", threads: 2 });
    try {
      const task = await loadTask({ kind: "arithmetic", trainCount: 2, validationCount: 2, seed: 4 });
      const loss = async (encoding: number) =>
        (await evaluatePrompt({ model: reloaded, task, maxLength: 60, encoding, scores: false }))
          .validationLoss;
      expect(await loss(1)).not.toBe(await loss(2));
      await expect(loss(3)).rejects.toThrow("encoding: 3 is not a text encoding this version knows (1 or 2)");
    } finally {
      reloaded.dispose();
    }
    expect(endOfText(tok({ eos_token: "a" }))).toBe(id("a"));
    expect(endOfText(tok({ eos_token: { content: "b", special: true } }))).toBe(id("b"));
    expect(endOfText(tok({}))).toBe(id("<|endoftext|>"));
    expect(endOfText(tok({ eos_token: "not-a-token" }))).toBe(id("<|endoftext|>"));
  });
});

describe("deep-hidden priors and learning rate", () => {
  it("deep vectors from their own priors, trained at deepLr; both recorded; misuse refused", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const task = await loadTask({ kind: "arithmetic", trainCount: 8, validationCount: 2, seed: 4 });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.02 }, { model });
      const wide = await createPrior({ kind: "gaussian", sigma: 3 }, { model });
      const runDir = join(tmp, "deep-priors");
      const base = { model, task, prior, mode: "deep-hidden" as const, promptLength: 3, batchSize: 4 };
      const r = await tune({
        ...base,
        deepLayers: [0, 1],
        deepPrior: [prior, wide],
        optimizer: { lr: 0.05, deepLr: 0 },
        steps: 3,
        maxNewTokens: 2,
        snapshotEvery: 1,
        runDir,
      });
      const first = readPromptFile(join(runDir, "snapshots", "step-000000.safetensors"));
      const std = (t: Float32Array) => Math.sqrt(t.reduce((s, x) => s + x * x, 0) / t.length);
      const deep0 = first.deepPrompts as { vectors: Float32Array[] };
      expect(std(first.prompt!)).toBeLessThan(0.05);
      expect(std(deep0.vectors[0]!)).toBeLessThan(0.05);
      expect(std(deep0.vectors[1]!)).toBeGreaterThan(2);
      // deepLr 0: the deep vectors stay where they started (no step, no decay); the soft prompt moves.
      const last = r.deepPrompts as { vectors: Float32Array[] };
      for (const [i, v] of last.vectors.entries()) expect(v).toEqual(deep0.vectors[i]);
      expect(r.prompt).not.toEqual(first.prompt);
      const record = JSON.parse(readFileSync(join(runDir, "run.json"), "utf8"));
      expect(record.deepPriors.map((p: { sigma: number }) => p.sigma)).toEqual([0.02, 3]);
      expect(record.optimizer.deepLr).toBe(0);
      const refused = (extra: object) => tune({ ...base, steps: 1, ...extra } as Parameters<typeof tune>[0]);
      await expect(refused({ mode: "soft", optimizer: { deepLr: 1e-3 } })).rejects.toThrow(
        "optimizer.deepLr: a soft-prompt run has no deep prompts",
      );
      await expect(refused({ mode: "deep-prefix", deepPrior: wide })).rejects.toThrow(
        'deepPrior: only deep-hidden runs draw deep vectors from a prior (mode is "deep-prefix")',
      );
      await expect(refused({ deepPrior: [wide] })).rejects.toThrow(
        "deepPrior: expected one prior or 3 (one per deep layer), got 1",
      );
    } finally {
      model.dispose();
    }
  });
});

describe("early stopping", () => {
  it("plateaued: patience evaluations in a row without a drop of more than minDelta of the best", () => {
    const ev = (...losses: number[]) =>
      losses.map((validationLoss, i) => ({ type: "eval" as const, step: i + 1, validationLoss, ms: 0 }));
    expect(plateaued(ev(3, 2, 2.5, 2.1), 2)).toBe(true);
    expect(plateaued(ev(3, 2, 2.5, 1.9), 2)).toBe(false);
    expect(plateaued(ev(3, 2, 1.99), 1, 0.01)).toBe(true); // 0.5% is not more than 1% of 2
    expect(plateaued(ev(3, Number.NaN, Number.NaN), 1)).toBe(false); // collapse-only records do not count
    expect(plateaued(ev(3), 1)).toBe(false);
  });

  it("a run whose validation loss stops improving ends there, finished; rerunning it trains no further", async () => {
    const model = await loadModel(modelDir("llama-tiny"), { backend: "cpu", threads: 2 });
    try {
      const task = await loadTask({ kind: "arithmetic", trainCount: 8, validationCount: 2, seed: 4 });
      const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
      const runDir = join(tmp, "early-stop");
      // lr 0: the loss cannot improve, so evaluations 2 and 3 are the two stale ones.
      const opts = {
        model,
        task,
        prior,
        promptLength: 2,
        steps: 10,
        batchSize: 4,
        maxNewTokens: 2,
        evalEvery: 1,
        earlyStopping: { patience: 2 },
        optimizer: { lr: 0 },
        checkpointEvery: 0,
        snapshotEvery: 0,
        runDir,
      };
      const r = await tune(opts);
      expect([r.steps, r.stoppedEarly, r.evals.length]).toEqual([3, true, 3]);
      expect(readPromptFile(join(runDir, "prompt.safetensors")).metadata.step).toBe("3");
      expect(existsSync(join(runDir, "snapshots", "step-000003.safetensors"))).toBe(true);
      expect(JSON.parse(readFileSync(join(runDir, "run.json"), "utf8")).earlyStopping).toEqual({
        patience: 2,
        minDelta: 0,
      });
      const again = await tune(opts);
      expect([again.steps, again.stoppedEarly, again.resumedFrom]).toEqual([3, true, 3]);
      // A run that reached its steps did not stop early, rerun or not (the rerun said it had).
      const full = { ...opts, steps: 2, runDir: join(tmp, "early-stop-full") };
      expect((await tune(full)).stoppedEarly).toBeUndefined();
      expect((await tune(full)).stoppedEarly).toBeUndefined();
      // Without validation examples there is no loss to watch (every evaluation NaN: it never stopped).
      const none = await loadTask({ kind: "arithmetic", trainCount: 8, validationCount: 0, seed: 4 });
      await expect(tune({ ...opts, task: none, runDir: undefined })).rejects.toThrow(
        "earlyStopping: task arithmetic has no validation examples to watch",
      );
      await expect(tune({ ...opts, runDir: undefined, evalEvery: 0 })).rejects.toThrow(
        "earlyStopping: needs evalEvery > 0",
      );
      await expect(tune({ ...opts, runDir: undefined, earlyStopping: { patience: 0 } })).rejects.toThrow(
        /earlyStopping\.patience/,
      );
    } finally {
      model.dispose();
    }
  });
});

describe("a run killed before its first checkpoint", () => {
  it("starts again, metrics included: one line per step", () => {
    const child = join(here, "support", "tune-child.ts");
    const early = join(tmp, "early");
    const crash = spawnSync(
      process.execPath,
      ["--import", "tsx", child, modelDir("llama-tiny"), early, "7"],
      {
        env: { ...process.env, CRASH_AT: "3" },
      },
    );
    expect(crash.signal).toBe("SIGKILL");
    expect(existsSync(join(early, "checkpoint.json"))).toBe(false);
    execFileSync(process.execPath, ["--import", "tsx", child, modelDir("llama-tiny"), early, "7"]);
    const steps = readFileSync(join(early, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
      .filter((l) => l.type === "step")
      .map((l) => l.step);
    expect(steps).toEqual([1, 2, 3, 4, 5, 6, 7]); // was [1, 2, 3, 1, ..., 7]
  });
});

describe("gradient accumulation", () => {
  it("weights each micro-batch by its labelled tokens: the mean over all of them", () => {
    const into = [new Float32Array(2)];
    const loss = combineMicroBatches(
      [
        { loss: 2, count: 1, grads: [new Float32Array([4, 0])] },
        { loss: 1, count: 3, grads: [new Float32Array([0, 8])] },
      ],
      into,
    );
    expect(loss).toBeCloseTo((2 * 1 + 1 * 3) / 4, 12); // not (2 + 1) / 2
    expect(Array.from(into[0]!)).toEqual([1, 6]);
  });
});

describe("schedules and batching", () => {
  it("learning-rate schedules", () => {
    expect(learningRate(0, 10, 1, "constant", 0)).toBe(1);
    expect(learningRate(0, 10, 1, "linear", 2)).toBe(0.5);
    expect(learningRate(1, 10, 1, "linear", 2)).toBe(1);
    expect(learningRate(10, 10, 1, "linear", 0)).toBe(0);
    expect(learningRate(5, 10, 1, "cosine", 0)).toBeCloseTo(0.5, 12);
  });
  it("length-bucketed batches cover every example once", () => {
    const batches = bucketBatches([5, 1, 9, 3, 7], 2);
    expect(batches).toEqual([[1, 3], [0, 4], [2]]);
  });
});
