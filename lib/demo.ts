// `priortune demo`: the paper's experiment in miniature on the shipped model. 20-vector soft prompts are
// tuned on an arithmetic task and a language (extractive QA) task from three priors: the paper's isotropic
// Gaussian baseline, a Gaussian fitted to the vocabulary, and the exclusion prior (samples pushed out of the
// vocabulary's bulk). For each run it reports validation loss, task accuracy and where the posterior ended
// up (collapse metrics); every run is a run directory (lib/train.ts).
import { join, resolve } from "node:path";
import { readMetrics } from "./analysis.js";
import { type CollapseReference, createCollapseReference } from "./collapse.js";
import { loadModel } from "./model.js";
import { packageRoot } from "./native.js";
import { createPrior, type PriorRecord } from "./priors.js";
import { buildReport } from "./report.js";
import { Rng } from "./rng.js";
import { quantile } from "./stats.js";
import { loadTask, specForRunDirs, type TaskSpec } from "./tasks.js";
import { type EvalRecord, evaluatePrompt, tune } from "./train.js";

export interface DemoOptions {
  /** Model directory (default: the shipped models/priortune-small). */
  modelDir?: string;
  /** Where the run directories go (default runs/demo-<time>). */
  outDir?: string;
  /** Optimizer steps per run (default 300). */
  steps?: number;
  promptLength?: number;
  batchSize?: number;
  trainCount?: number;
  validationCount?: number;
  lr?: number;
  seed?: number;
  threads?: number;
  /** Which tasks and priors (default all). */
  tasks?: ("arithmetic" | "qa")[];
  priors?: ("gaussian" | "fitted-gaussian" | "exclusion")[];
  /** Write the comparison report (report/report.html and figures) after the runs (default true). */
  report?: boolean;
  log?: (line: string) => void;
  /** Stops at the next step boundary, the run under way checkpointed (the same outDir resumes it). */
  signal?: AbortSignal;
}

export interface DemoRow {
  task: string;
  prior: string;
  /** Mean training loss over the first and the last quarter of the steps. */
  firstLoss: number;
  lastLoss: number;
  /** Validation loss with the initial prompt (the prior's draw) and with the trained one. */
  initialValidationLoss: number;
  validationLoss: number;
  /** Accuracy (arithmetic) or exact match (QA), 0..1. */
  score: number;
  scoreName: "accuracy" | "exact match";
  f1?: number;
  collapseRate: number;
  meanNearestCosine: number;
  /** Median over prompt vectors of the nearest-token distance percentile (cosine) within the vocabulary's own. */
  medianDistancePercentile: number;
  /** The nearest token of each prompt vector, decoded (the projected prompt). */
  nearestTokens: string[];
  runDir: string;
  seconds: number;
}

export const DEMO_PRIORS: Record<string, PriorRecord> = {
  gaussian: { kind: "gaussian", sigma: 0.02 },
  "fitted-gaussian": { kind: "fitted-gaussian", source: "vocab" },
  exclusion: { kind: "exclusion", c: 5 },
};

const DEMO_TASKS: Record<
  string,
  (o: Required<Pick<DemoOptions, "trainCount" | "validationCount" | "seed">>) => TaskSpec
> = {
  arithmetic: (o) =>
    ({
      kind: "arithmetic",
      operations: ["add", "sub"],
      digits: 2,
      trainCount: o.trainCount,
      validationCount: o.validationCount,
      seed: o.seed,
    }) as TaskSpec,
  qa: (o) =>
    ({
      kind: "qa-facts",
      trainCount: o.trainCount,
      validationCount: o.validationCount,
      seed: o.seed,
    }) as TaskSpec,
};

function mean(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

/** The median (the mean of the two middle values for an even count; the upper one was taken before). */
function median(xs: number[]): number {
  return quantile(Float64Array.from(xs).sort(), 0.5);
}

export async function demo(options: DemoOptions = {}): Promise<DemoRow[]> {
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const modelDir = resolve(options.modelDir ?? join(packageRoot(), "models", "priortune-small"));
  const steps = options.steps ?? 300;
  const o = {
    trainCount: options.trainCount ?? 512,
    validationCount: options.validationCount ?? 32,
    seed: options.seed ?? 0,
  };
  const outDir = resolve(
    options.outDir ?? join("runs", `demo-${new Date().toISOString().replace(/[:.]/g, "-")}`),
  );
  const tasks = options.tasks ?? ["arithmetic", "qa"];
  const priors = options.priors ?? ["gaussian", "fitted-gaussian", "exclusion"];
  // Named first: an interrupted demo goes on where it stopped when given this directory again.
  log(
    `runs in ${outDir}${options.outDir === undefined ? ` (to resume after an interruption: --out ${outDir})` : ""}`,
  );
  const model = await loadModel(modelDir, { backend: "auto", threads: options.threads });
  log(
    `model ${modelDir}: ${model.config.hfArchitecture}, ${(model.parameterCount / 1e6).toFixed(1)}M parameters, ${model.backend} backend, ${model.threads} threads`,
  );
  const rows: DemoRow[] = [];
  let reference: CollapseReference | undefined;
  try {
    reference = await createCollapseReference(model, { seed: o.seed });
    for (const taskName of tasks) {
      // Run directories of an earlier version resume with the split they began with.
      const runDirs = priors.map((p) => join(outDir, `${taskName}-${p}`));
      const task = await loadTask(specForRunDirs(DEMO_TASKS[taskName]!(o), runDirs));
      for (const priorName of priors) {
        const t0 = performance.now();
        const prior = await createPrior(DEMO_PRIORS[priorName]!, { model });
        const runDir = join(outDir, `${taskName}-${priorName}`);
        // The prior's draw as tune will make it (same seed, first draw), evaluated before any training.
        const initial = prior.sample(options.promptLength ?? 20, new Rng(o.seed));
        const before = await evaluatePrompt({
          model,
          task,
          prompt: initial,
          batchSize: options.batchSize ?? 8,
          scores: false,
        });
        const result = await tune({
          model,
          task,
          prior,
          promptLength: options.promptLength ?? 20,
          steps,
          batchSize: options.batchSize ?? 8,
          optimizer: { lr: options.lr ?? 3e-2, schedule: "cosine", warmupSteps: Math.min(10, steps) },
          evalEvery: 0,
          maxNewTokens: taskName === "arithmetic" ? 6 : 8,
          snapshotEvery: Math.max(1, Math.floor(steps / 10)),
          checkpointEvery: Math.max(1, Math.floor(steps / 10)),
          signal: options.signal,
          seed: o.seed,
          runDir,
          onStep: (r) => {
            if (r.step === 1 || r.step % Math.max(1, Math.floor(steps / 4)) === 0) {
              log(`  ${taskName} / ${priorName}: step ${r.step}/${steps}, loss ${r.taskLoss.toFixed(3)}`);
            }
          },
        });
        // From the run directory, not the callbacks: a rerun into the same --out resumes a finished run,
        // which returns at once without calling them.
        const losses = readMetrics(runDir).steps.map((r) => r.taskLoss);
        const lastEval: EvalRecord | undefined = result.evals.at(-1);
        const report = await reference.report(result.prompt!, { k: 1, perDimensionSpread: false });
        const qa = taskName === "qa";
        const row: DemoRow = {
          task: taskName,
          prior: priorName,
          firstLoss: mean(losses.slice(0, Math.max(1, Math.floor(losses.length / 4)))),
          lastLoss: mean(losses.slice(-Math.max(1, Math.floor(losses.length / 4)))),
          initialValidationLoss: before.validationLoss,
          validationLoss: lastEval?.validationLoss ?? Number.NaN,
          score: (qa ? lastEval?.exactMatch : lastEval?.accuracy) ?? Number.NaN,
          scoreName: qa ? "exact match" : "accuracy",
          f1: qa ? lastEval?.f1 : undefined,
          collapseRate: report.aggregate.collapseRate,
          meanNearestCosine: report.aggregate.meanNearestCosine,
          medianDistancePercentile: median(report.vectors.map((v) => v.nearestDistancePercentile.cosine)),
          nearestTokens: report.vectors.map((v) => v.nearest[0]!.token ?? `[id ${v.nearest[0]!.id}]`),
          runDir,
          seconds: (performance.now() - t0) / 1e3,
        };
        rows.push(row);
        log(`  ${taskName} / ${priorName}: done in ${row.seconds.toFixed(0)} s`);
      }
    }
    if (options.report ?? true) {
      const t0 = performance.now();
      const out = await buildReport(
        rows.map((r) => r.runDir),
        {
          outDir: join(outDir, "report"),
          title: "priortune demo: priors and posteriors on the shipped model",
          model,
          activations: { texts: 32 },
          seed: o.seed,
          threads: options.threads,
          onProgress: (m) => log(`  report: ${m}`),
        },
      );
      log(`report ${out.html} (${((performance.now() - t0) / 1e3).toFixed(0)} s)`);
    }
  } finally {
    reference?.dispose();
    model.dispose();
  }
  return rows;
}

/** One table per prior (rows: tasks), as the demo prints them. */
export function demoTables(rows: DemoRow[]): string {
  const out: string[] = [];
  for (const prior of [...new Set(rows.map((r) => r.prior))]) {
    out.push(`prior: ${prior} (${JSON.stringify(DEMO_PRIORS[prior])})`);
    const cells = rows
      .filter((r) => r.prior === prior)
      .map((r) => [
        r.task,
        `${r.firstLoss.toFixed(3)} -> ${r.lastLoss.toFixed(3)}`,
        `${r.initialValidationLoss.toFixed(3)} -> ${r.validationLoss.toFixed(3)}`,
        `${(100 * r.score).toFixed(1)}% ${r.scoreName}${r.f1 !== undefined ? `, F1 ${(100 * r.f1).toFixed(1)}%` : ""}`,
        `${(100 * r.collapseRate).toFixed(0)}%`,
        r.meanNearestCosine.toFixed(3),
        r.medianDistancePercentile.toFixed(1),
        JSON.stringify(r.nearestTokens.slice(0, 8).join("|")),
      ]);
    const head = [
      "task",
      "train loss",
      "val loss",
      "task score",
      "collapse",
      "nn cos",
      "nn pct",
      "nearest tokens (first 8)",
    ];
    const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
    const line = (c: string[]) => `| ${c.map((v, i) => v.padEnd(widths[i]!)).join(" | ")} |`;
    out.push(line(head), `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`, ...cells.map(line), "");
  }
  out.push(
    "collapse: share of prompt vectors whose nearest-token cosine is within the vocabulary's typical neighbour range;",
    "nn pct: median percentile of a prompt vector's nearest-token distance among the vocabulary's own nearest-neighbour distances.",
  );
  return out.join("\n");
}
