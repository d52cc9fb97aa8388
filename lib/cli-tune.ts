// `priortune tune` and `priortune eval`: the experiment loop from the command line.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { SingleBar } from "cli-progress";
import { type Command, InvalidArgumentError, Option } from "commander";
import {
  type BackendFlags,
  integerArg,
  integerListArg,
  interruptible,
  numberArg,
  seedArg,
  withBackend,
} from "./cli-args.js";
import { loadModel, type Model } from "./model.js";
import { createPrior, type Prior, type PriorRecord } from "./priors.js";
import { loadRecordedTask, loadTask, specForRunDirs, type TaskSpec } from "./tasks.js";
import {
  defaultDeepLayers,
  type EvalRecord,
  evaluatePrompt,
  readPromptFile,
  type StepRecord,
  type TuneMode,
  textBudget,
  tune,
} from "./train.js";

/** One value of key=value: true / false, a number, or the text itself. */
function scalar(raw: string): unknown {
  if (raw === "true" || raw === "false") return raw === "true";
  if (raw.trim() !== "" && Number.isFinite(Number(raw))) return Number(raw);
  return raw;
}

/**
 * key=value pairs: booleans and numbers are parsed, a comma-separated list of words or numbers is a list
 * (operations=add,mul; digits=1,2), a value starting with [ { or " is JSON (name="2024" keeps a string of
 * digits), the rest stay strings (template=Q: {q}, A: keeps its commas).
 */
export function keyValue(value: string, previous: Record<string, unknown> = {}): Record<string, unknown> {
  const eq = value.indexOf("=");
  if (eq <= 0) throw new InvalidArgumentError(`expected key=value, got ${value}`);
  const key = value.slice(0, eq);
  const raw = value.slice(eq + 1);
  let parsed: unknown;
  if (/^\s*[[{"]/u.test(raw)) {
    try {
      parsed = JSON.parse(raw);
    } catch (e) {
      throw new InvalidArgumentError(`${key}: not valid JSON (${(e as Error).message})`);
    }
  } else if (raw.includes(",") && raw.split(",").every((v) => /^[\w.+-]+$/u.test(v.trim())))
    parsed = raw.split(",").map((v) => scalar(v.trim())); // a list of words or numbers
  else parsed = scalar(raw); // text with commas and spaces (a template) stays one string
  return { ...previous, [key]: parsed };
}

interface TuneCliOptions extends BackendFlags {
  task: string;
  data?: string;
  trainCount?: number;
  validationCount?: number;
  template?: string;
  taskOpt: Record<string, unknown>;
  prior: string;
  priorOpt: Record<string, unknown>;
  deepPrior?: string;
  deepPriorOpt: Record<string, unknown>;
  deepLr?: number;
  mode: TuneMode;
  promptLength: number;
  deepLayers?: number[];
  deepLength?: number;
  steps: number;
  batchSize: number;
  lr: number;
  weightDecay: number;
  schedule: "constant" | "linear" | "cosine";
  warmup: number;
  clipNorm?: number;
  accumulate: number;
  regularizer?: "prior-nll" | "l2-init" | "nearest-vocab";
  lambda: number;
  lambdaSchedule: "constant" | "linear";
  evalEvery: number;
  earlyStopping?: number;
  minDelta?: number;
  evalExamples?: number;
  maxNewTokens: number;
  generationBatchSize?: number;
  collapseEvery?: number;
  snapshotEvery: number;
  checkpointEvery: number;
  maxLength?: number;
  specialTokens: boolean;
  seed: number;
  runDir?: string;
  threads?: number;
  json?: boolean;
}

export function taskSpec(
  o: Pick<
    TuneCliOptions,
    "task" | "data" | "trainCount" | "validationCount" | "template" | "taskOpt" | "seed"
  >,
): TaskSpec {
  // A list option given one item (operations=mul) is a one-item list.
  const { operations } = o.taskOpt;
  const taskOpt = typeof operations === "string" ? { ...o.taskOpt, operations: [operations] } : o.taskOpt;
  return {
    kind: o.task,
    path: o.data,
    trainCount: o.trainCount,
    validationCount: o.validationCount,
    template: o.template,
    seed: o.seed,
    ...taskOpt,
  } as TaskSpec;
}

/** An evaluation's progress as log lines: at the end, and at most one every `intervalMs` before it. */
function evalLog(intervalMs: number): (done: number, of: number) => void {
  let last = 0;
  return (done, of) => {
    if (done === of || performance.now() - last > intervalMs) {
      last = performance.now();
      process.stderr.write(`evaluating: ${done}/${of} batches\n`);
    }
  };
}

/** Progress on a terminal (a bar with loss and ETA), plain log lines otherwise (CI, files). */
function progress(total: number, start: number) {
  const tty = process.stderr.isTTY;
  const bar = tty
    ? new SingleBar({
        format: "tune [{bar}] {value}/{total} | loss {loss} | {rate} ms/step | ETA {eta_formatted}{phase}",
        stream: process.stderr,
      })
    : undefined;
  bar?.start(total, start, { loss: "-", rate: "-", phase: "" });
  let last = performance.now();
  const logEval = evalLog(10_000);
  return {
    /** Batches of an evaluation done (the bar shows them; a log line every 10 s otherwise). */
    evalProgress(done: number, of: number) {
      if (bar) bar.update({ phase: done < of ? ` | evaluating ${done}/${of}` : "" });
      else logEval(done, of);
    },
    step(r: StepRecord) {
      if (bar) bar.update(r.step, { loss: r.loss.toFixed(4), rate: r.ms.toFixed(0) });
      else if (r.step === 1 || r.step % 10 === 0 || r.step === total || performance.now() - last > 10_000) {
        last = performance.now();
        process.stderr.write(
          `step ${r.step}/${total} loss ${r.loss.toFixed(4)} lr ${r.lr.toExponential(2)} |g| ${r.gradNorm.toFixed(3)} ${r.ms.toFixed(0)} ms\n`,
        );
      }
    },
    /** A long phase that the bar does not count (the collapse reference's build). */
    status(message: string) {
      process.stderr.write(`${bar ? "\n" : ""}${message}\n`);
    },
    eval(e: EvalRecord) {
      const parts = [`eval @${e.step}: val loss ${e.validationLoss.toFixed(4)}`];
      if (e.exactMatch !== undefined)
        parts.push(`EM ${(100 * e.exactMatch).toFixed(1)} F1 ${(100 * e.f1!).toFixed(1)}`);
      if (e.accuracy !== undefined) parts.push(`accuracy ${(100 * e.accuracy).toFixed(1)}%`);
      if (e.collapse) parts.push(`collapse rate ${(100 * e.collapse.collapseRate).toFixed(0)}%`);
      const line = parts.join(", ");
      if (bar) bar.updateETA();
      process.stderr.write(`${bar ? "\n" : ""}${line}\n`);
    },
    stop() {
      bar?.stop();
    },
  };
}

// --deep-prior: one prior for every deep layer, or, for a prior fitted to activations without a layer, one
// per deep layer fitted to that layer's input (hidden_states[l], the states the vectors are prepended to).
async function deepPriorOf(o: TuneCliOptions, model: Model): Promise<Prior | Prior[] | undefined> {
  if (o.deepPrior === undefined) {
    if (Object.keys(o.deepPriorOpt).length > 0) throw new Error("--deep-prior-opt: give --deep-prior too");
    return undefined;
  }
  const record = { kind: o.deepPrior, ...o.deepPriorOpt } as PriorRecord;
  if (record["source"] !== "activations" || record["layer"] !== undefined)
    return createPrior(record, { model });
  const layers = o.deepLayers ?? defaultDeepLayers(model.config.numLayers);
  const priors: Prior[] = [];
  for (const layer of layers) priors.push(await createPrior({ ...record, layer } as PriorRecord, { model }));
  return priors;
}

export function registerTuneCommands(program: Command): void {
  withBackend(program.command("tune"))
    .description("prompt-tune a frozen model on a task from a prior, writing a resumable run directory")
    .argument("<model-dir>", "Hugging Face model directory")
    .requiredOption("--task <kind>", "task: squad | mathematics | c4 | jsonl | arithmetic | qa-facts | cloze")
    .option("--data <path>", "data file for squad / mathematics / c4 / jsonl / cloze (the source text)")
    .option("--train-count <n>", "training examples", integerArg(1))
    .option("--validation-count <n>", "validation examples", integerArg(0))
    .option("--template <text>", "prompt template with {placeholders} (default: the paper's for the task)")
    .option(
      "--task-opt <key=value>",
      'extra task option, repeatable (e.g. digits=2, negative=true, operations=add,mul, name="2024")',
      keyValue,
      {},
    )
    .option(
      "--prior <kind>",
      "prior: gaussian | xavier | uniform | vocab | class-label | fitted-gaussian | exclusion | interpolation | knn | posterior",
      "gaussian",
    )
    .option(
      "--prior-opt <key=value>",
      "prior option, repeatable (e.g. sigma=0.02, source=vocab, layer=8)",
      keyValue,
      {},
    )
    .option(
      "--deep-prior <kind>",
      "deep-hidden: prior of the deep vectors (default --prior); with source=activations and no layer, each " +
        "deep layer's own input activations (hidden_states[l])",
    )
    .option("--deep-prior-opt <key=value>", "deep prior option, repeatable (as --prior-opt)", keyValue, {})
    .option(
      "--deep-lr <x>",
      "learning rate of the deep prompts (default --lr; the paper: 1e-3 for activations)",
      numberArg,
    )
    .addOption(
      new Option("--mode <mode>", "what is trained")
        .choices(["soft", "deep-hidden", "deep-prefix"])
        .default("soft"),
    )
    .option("--prompt-length <n>", "soft-prompt vectors P", integerArg(0), 20)
    .option(
      "--deep-layers <list>",
      "deep-prompt layers, comma separated (default: the last three, as the paper; PEFT-style prefix tuning: " +
        "every layer with --mode deep-prefix --prompt-length 0)",
      integerListArg,
    )
    .option("--deep-length <n>", "deep-prompt vectors per layer (default: --prompt-length)", integerArg(1))
    .option("--steps <n>", "optimizer steps", integerArg(1), 100)
    .option("--batch-size <n>", "examples per micro-batch", integerArg(1), 2)
    .option("--lr <x>", "peak learning rate", numberArg, 5e-3)
    .option("--weight-decay <x>", "AdamW decoupled weight decay", numberArg, 0.01)
    .addOption(
      new Option("--schedule <kind>", "learning-rate schedule after warm-up")
        .choices(["constant", "linear", "cosine"])
        .default("constant"),
    )
    .option("--warmup <n>", "linear warm-up steps", integerArg(0), 0)
    .option("--clip-norm <x>", "clip the global gradient norm", numberArg)
    .option("--accumulate <n>", "micro-batches per update (gradient accumulation)", integerArg(1), 1)
    .addOption(
      new Option("--regularizer <kind>", "controllable-posterior regulariser").choices([
        "prior-nll",
        "l2-init",
        "nearest-vocab",
      ]),
    )
    .option("--lambda <x>", "regulariser weight", numberArg, 0.1)
    .addOption(
      new Option("--lambda-schedule <kind>", "regulariser weight over training")
        .choices(["constant", "linear"])
        .default("constant"),
    )
    .option("--eval-every <n>", "evaluate every n steps (0: at the end only)", integerArg(0), 0)
    .option(
      "--early-stopping <patience>",
      "stop once the validation loss has not improved for this many evaluations in a row (needs --eval-every)",
      integerArg(1),
    )
    .option(
      "--min-delta <x>",
      "with --early-stopping: an improvement is a drop by more than x of the best (0 <= x < 1; default 0)",
      numberArg,
    )
    .option("--eval-examples <n>", "validation examples per evaluation (default all)", integerArg(1))
    .option("--max-new-tokens <n>", "tokens generated per validation example", integerArg(1), 16)
    .option(
      "--generation-batch-size <n>",
      "validation examples decoded together at evaluation (default 16; a run directory keeps its own)",
      integerArg(1),
    )
    .option("--collapse-every <n>", "collapse metrics of the prompt every n steps", integerArg(0))
    .option("--snapshot-every <n>", "prompt snapshots (trajectory) every n steps", integerArg(0), 10)
    .option("--checkpoint-every <n>", "resumable checkpoints every n steps", integerArg(0), 10)
    .option(
      "--max-length <n>",
      "longest sequence, prompt included (default 256; a GPT-2 model's positions if fewer)",
      integerArg(1),
    )
    .option(
      "--no-special-tokens",
      "texts without the tokenizer's special tokens (Llama 3's BOS; default: with them, as Transformers; a run " +
        "directory keeps what it recorded)",
    )
    .option("--seed <n>", "seed of every random choice", seedArg, 0)
    .option("--run-dir <dir>", "run directory (created, or resumed when it holds the same run)")
    .option("--threads <n>", "CPU threads (default: all cores)", integerArg(1))
    .option("--json", "print the result as JSON")
    .action(async (dir: string, o: TuneCliOptions) => {
      // Lines for the phases before step 1 (a 1B model loads for tens of seconds, a kNN prior searches).
      process.stderr.write(`loading ${dir}\n`);
      const model = await loadModel(dir, { backend: o.backend, precision: o.precision, threads: o.threads });
      try {
        // A run directory of an earlier version resumes with the split it began with.
        const task = await loadTask(specForRunDirs(taskSpec(o), [o.runDir]));
        if (o.minDelta !== undefined && o.earlyStopping === undefined)
          throw new Error("--min-delta: give --early-stopping too");
        process.stderr.write(`preparing the ${o.prior} prior\n`);
        const prior = await createPrior({ kind: o.prior, ...o.priorOpt } as PriorRecord, { model });
        const deepPrior = await deepPriorOf(o, model);
        const regularizer = o.regularizer
          ? { regularizer: { kind: o.regularizer }, lambda: o.lambda, schedule: o.lambdaSchedule }
          : undefined;
        const resumed =
          o.runDir && existsSync(join(o.runDir, "checkpoint.json"))
            ? JSON.parse(readFileSync(join(o.runDir, "checkpoint.json"), "utf8")).step
            : 0;
        const bar = progress(o.steps, resumed);
        let result: Awaited<ReturnType<typeof tune>>;
        try {
          const stopping = o.runDir
            ? "stopping after this step; a checkpoint keeps it and the same command resumes"
            : "stopping after this step (no --run-dir: nothing is kept)";
          result = await interruptible(stopping, (signal) =>
            tune({
              model,
              task,
              prior,
              mode: o.mode,
              promptLength: o.promptLength,
              deepLayers: o.deepLayers,
              deepLength: o.deepLength,
              deepPrior,
              optimizer: {
                lr: o.lr,
                weightDecay: o.weightDecay,
                schedule: o.schedule,
                warmupSteps: o.warmup,
                clipNorm: o.clipNorm,
                accumulate: o.accumulate,
                deepLr: o.deepLr,
              },
              regularizer,
              steps: o.steps,
              batchSize: o.batchSize,
              evalEvery: o.evalEvery,
              earlyStopping:
                o.earlyStopping === undefined
                  ? undefined
                  : { patience: o.earlyStopping, minDelta: o.minDelta },
              evalExamples: o.evalExamples,
              maxNewTokens: o.maxNewTokens,
              generationBatchSize: o.generationBatchSize,
              collapseEvery: o.collapseEvery,
              snapshotEvery: o.snapshotEvery,
              checkpointEvery: o.checkpointEvery,
              maxLength: o.maxLength,
              // Unset unless given: a run directory then resumes as it was recorded.
              addSpecialTokens: o.specialTokens === false ? false : undefined,
              seed: o.seed,
              runDir: o.runDir,
              onStep: (r) => bar.step(r),
              onEval: (e) => bar.eval(e),
              onEvalProgress: (done, of) => bar.evalProgress(done, of),
              onStatus: (message) => bar.status(message),
              signal,
            }),
          );
        } finally {
          bar.stop();
        }
        const summary = {
          steps: result.steps,
          lastLoss: result.lastLoss,
          resumedFrom: result.resumedFrom ?? null,
          stoppedEarly: result.stoppedEarly ?? false,
          final: result.evals.at(-1) ?? null,
          runDir: result.runDir ?? null,
        };
        process.stdout.write(
          o.json
            ? `${JSON.stringify(summary, null, 2)}\n`
            : `done: ${summary.steps} steps${summary.stoppedEarly ? " (stopped early: the validation loss stopped improving)" : ""}, loss ${summary.lastLoss.toFixed(4)}${summary.runDir ? `, run in ${summary.runDir}` : ""}\n`,
        );
      } finally {
        model.dispose();
      }
    });

  withBackend(program.command("eval"))
    .description("evaluate a run's trained prompt (or a snapshot) on its task's validation set")
    .argument("<run-dir>", "a directory written by `priortune tune`")
    .option("--prompt <file>", "prompt file to evaluate (default: <run-dir>/prompt.safetensors)")
    .option("--model <dir>", "model directory (default: the one in run.json)")
    .option("--eval-examples <n>", "validation examples (default: all)", integerArg(1))
    .option("--max-new-tokens <n>", "tokens generated per example", integerArg(1))
    .option("--batch-size <n>", "examples per batch of the loss pass", integerArg(1))
    .option(
      "--generation-batch-size <n>",
      "examples decoded together (default: the run's; for a run recorded before the option, --batch-size, else its batch size)",
      integerArg(1),
    )
    .option("--threads <n>", "CPU threads", integerArg(1))
    .action(
      async (
        runDir: string,
        o: {
          prompt?: string;
          model?: string;
          evalExamples?: number;
          maxNewTokens?: number;
          batchSize?: number;
          generationBatchSize?: number;
          threads?: number;
        } & BackendFlags,
      ) => {
        const runPath = join(runDir, "run.json");
        if (!existsSync(runPath)) throw new Error(`${runDir}: no run.json (not a priortune run directory)`);
        const run = JSON.parse(readFileSync(runPath, "utf8"));
        const model = await loadModel(o.model ?? run.model.dir, {
          backend: o.backend,
          precision: o.precision,
          threads: o.threads,
        });
        try {
          const task = await loadRecordedTask(run.task);
          const saved = readPromptFile(o.prompt ?? join(runDir, "prompt.safetensors"));
          // The run's own token budget and seed, so that the numbers are those tune recorded.
          const P = saved.prompt ? saved.prompt.length / model.config.hiddenSize : 0;
          const record = await evaluatePrompt({
            model,
            task,
            prompt: saved.prompt,
            deepPrompts: saved.deepPrompts,
            batchSize: o.batchSize ?? run.batchSize,
            // Absent from run.json: recorded before the option, when generation decoded the loss pass's batches.
            generationBatchSize:
              o.generationBatchSize ?? run.generationBatchSize ?? o.batchSize ?? run.batchSize,
            evalExamples: o.evalExamples ?? run.evalExamples ?? undefined,
            maxNewTokens: o.maxNewTokens ?? run.maxNewTokens,
            maxLength: textBudget(run.maxLength, P, run.mode, run.deepLength ?? 0),
            addSpecialTokens: run.addSpecialTokens === true, // absent: recorded before the option, without
            encoding: run.encoding ?? 1, // absent: recorded before the field (train.ts TEXT_ENCODING)
            seed: run.seed,
            step: Number(saved.metadata.step ?? 0),
            onProgress: evalLog(5_000),
            onStatus: (message) => process.stderr.write(`${message}\n`),
          });
          process.stdout.write(`${JSON.stringify(record, null, 2)}\n`);
        } finally {
          model.dispose();
        }
      },
    );
}
