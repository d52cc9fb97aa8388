// `priortune report`: one self-contained HTML page comparing prompt-tuning runs, and a folder of SVG/PNG
// figures. Tables: final losses and scores, collapse metrics, convergence step at a common validation loss
// (paper, finding 3); figures: loss curves per prior, the vocabulary with the runs' initial (prior) and
// trained (posterior) prompts, the prompt trajectories over training, and, when the model is at hand,
// activation clusters and densities per layer for the runs' tasks with the distances between them (paper,
// findings 1, 2 and 4). The page embeds vega, vega-lite and vega-embed inline: it needs no network to view.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { basename, dirname, join, resolve } from "node:path";
import { captureActivations } from "./activations.js";
import {
  convergenceByRun,
  fitGaussian,
  frechetDistance,
  gaussianKl,
  linearProbe,
  mmd,
  type RunMetrics,
  readMetrics,
  trajectoryStatistics,
} from "./analysis.js";
import { atomicWrite, ensureWritableDir } from "./files.js";
import { loadModel, type Model } from "./model.js";
import {
  barSpec,
  type ClusterPoint,
  clusterSpec,
  type DensityValue,
  densitySpec,
  type LossPoint,
  limitRows,
  lossCurveSpec,
  type PlotSpec,
  type ProjectedPoint,
  scatterSpec,
  type TrajectoryPoint,
  trajectorySpec,
  writeFigure,
} from "./plots.js";
import { fitPca, tsne, umap } from "./projection.js";
import { Rng } from "./rng.js";
import { readTensors } from "./safetensors.js";
import { concatRows } from "./stats.js";
import { loadRecordedTask } from "./tasks.js";
import { type EvalRecord, modelFingerprint, readPromptFile } from "./train.js";
import { checkRequiredOptions, type OptionKeys } from "./validate.js";

export interface ReportOptions {
  /** Where report.html, report.json and figures/ are written (created if missing). */
  outDir: string;
  title?: string;
  /** One name per run (default: the run directory's name). */
  names?: string[];
  /**
   * The model for the vocabulary and activation sections: a loaded Model, a model directory, or null to skip
   * both. Default: the first run's model directory from run.json, when it exists.
   */
  model?: Model | string | null;
  /** Projection of the embedding figure (default "pca"; trajectories always use the vocabulary's PCA). */
  projection?: "pca" | "tsne" | "umap";
  /** Vocabulary rows shown (a seeded subsample; the PCA is fitted on every row). Default 2000. */
  maxVocabularyPoints?: number;
  /** Validation-loss level of the convergence step (default: the highest final validation loss). */
  level?: number;
  /** Activation section: false to skip; otherwise which layers and how many texts per task. */
  activations?:
    | false
    | {
        layers?: number[];
        /** Validation texts per task (default 64). */
        texts?: number;
        /** More text sets to compare with the tasks (e.g. plain text as the pre-training stand-in). */
        extraSets?: { name: string; texts: string[] }[];
      };
  seed?: number;
  threads?: number;
  onProgress?: (message: string) => void;
}

const REPORT_KEYS = {
  outDir: true,
  title: true,
  names: true,
  model: true,
  projection: true,
  maxVocabularyPoints: true,
  level: true,
  activations: true,
  seed: true,
  threads: true,
  onProgress: true,
} satisfies OptionKeys<ReportOptions>;

const ACTIVATION_SECTION_KEYS = { layers: true, texts: true, extraSets: true } satisfies OptionKeys<
  Exclude<NonNullable<ReportOptions["activations"]>, false>
>;

export interface RunSummary {
  name: string;
  dir: string;
  prior: string;
  task: string;
  mode: string;
  steps: number;
  finalTrainLoss: number | null;
  finalValidationLoss: number | null;
  accuracy: number | null;
  exactMatch: number | null;
  f1: number | null;
  collapseRate: number | null;
  meanNearestCosine: number | null;
  meanDivergence: number | null;
  convergenceStep: number | null;
  /** Mean Euclidean distance between the initial and the trained prompt vectors. */
  promptDisplacement: number | null;
}

export interface ClusterDistance {
  layer: number;
  a: string;
  b: string;
  frechet: number;
  symmetricKl: number;
  mmd2: number;
  probeAccuracy: number;
  /** The probe's chance level: the larger set's share of the rows. */
  probeChance: number;
}

export interface TrajectoryRow {
  set: string;
  layer: number;
  spreadRatio: number;
  meanRatio: number;
  mannWhitneyP: number;
  spreadP: number;
}

export interface ReportData {
  title: string;
  generated: string;
  convergenceLevel: number;
  runs: RunSummary[];
  clusterDistances: ClusterDistance[];
  trajectories: TrajectoryRow[];
  figures: { name: string; title: string }[];
  notes: string[];
}

export interface ReportResult {
  html: string;
  json: string;
  figures: string[];
  data: ReportData;
}

interface LoadedRun {
  name: string;
  dir: string;
  record: Record<string, unknown>;
  metrics: RunMetrics;
  initial: Float32Array | null;
  final: Float32Array | null;
  snapshots: { step: number; prompt: Float32Array }[];
  /** No prompt.safetensors: the step and file of the prompt taken as final instead (null: none either). */
  unfinished: { step: number; from: "snapshot" | "checkpoint" } | null;
}

function loadRun(dir: string, name: string): LoadedRun {
  const runJson = join(dir, "run.json");
  if (!existsSync(runJson)) throw new Error(`${dir}: no run.json (not a run directory written by tune)`);
  const record = JSON.parse(readFileSync(runJson, "utf8")) as Record<string, unknown>;
  const metrics = readMetrics(dir);
  const snapDir = join(dir, "snapshots");
  const snapshots = existsSync(snapDir)
    ? readdirSync(snapDir)
        .filter((f) => /^step-\d+\.safetensors$/.test(f))
        .sort()
        .map((f) => ({ step: Number(f.slice(5, -12)), prompt: readPromptFile(join(snapDir, f)).prompt }))
        .filter((s): s is { step: number; prompt: Float32Array } => s.prompt !== undefined)
    : [];
  const finalFile = join(dir, "prompt.safetensors");
  let final: Float32Array | null = null;
  let unfinished: LoadedRun["unfinished"] = null;
  if (existsSync(finalFile)) final = readPromptFile(finalFile).prompt ?? null;
  else {
    // An unfinished run (killed, crashed): its newest prompt is the checkpoint's when that is newer than
    // the last snapshot (sparse snapshots would otherwise give the initial prompt as "trained").
    const last = snapshots[snapshots.length - 1];
    final = last?.prompt ?? null;
    unfinished = last ? { step: last.step, from: "snapshot" } : null;
    const checkpoint = join(dir, "checkpoint.safetensors");
    if (Number(record.promptLength ?? 0) > 0 && existsSync(checkpoint)) {
      const { tensors, metadata } = readTensors(checkpoint);
      const step = metadata.state
        ? (JSON.parse(metadata.state) as { step: number }).step
        : Number(metadata.step);
      const prompt = tensors.get("param.0")?.data; // the soft prompt is the first trainable tensor
      if (prompt instanceof Float32Array && Number.isFinite(step) && step > (last?.step ?? -1)) {
        final = prompt;
        unfinished = { step, from: "checkpoint" };
      }
    }
  }
  return {
    name,
    dir,
    record,
    metrics,
    initial: snapshots[0]?.prompt ?? null,
    final,
    unfinished,
    snapshots,
  };
}

function describeRecord(r: unknown): string {
  if (!r || typeof r !== "object") return "?";
  const o = r as Record<string, unknown>;
  const kind = String(o.kind ?? o.name ?? "?");
  // Every scalar option, so that two priors differing in any one (range, mean, noise, ...) read differently;
  // file hashes left out, paths by their file name.
  const details = Object.keys(o)
    .filter((k) => k !== "kind" && k !== "name" && !/sha256$/i.test(k))
    .filter((k) => o[k] !== undefined && o[k] !== null && typeof o[k] !== "object")
    .map(
      (k) =>
        `${k}=${typeof o[k] === "string" && /[\\/]/.test(o[k] as string) ? basename(o[k] as string) : o[k]}`,
    );
  return details.length ? `${kind} (${details.join(", ")})` : kind;
}

function taskName(r: unknown): string {
  if (!r || typeof r !== "object") return "?";
  const o = r as Record<string, unknown>;
  return String(o.name ?? o.kind ?? "?");
}

function meanDisplacement(a: Float32Array | null, b: Float32Array | null, dim: number): number | null {
  if (!a || !b || a.length !== b.length) return null;
  const rows = a.length / dim;
  let s = 0;
  for (let r = 0; r < rows; r++) {
    let d2 = 0;
    for (let j = 0; j < dim; j++) d2 += (a[r * dim + j] - b[r * dim + j]) ** 2;
    s += Math.sqrt(d2);
  }
  return s / rows;
}

/** Builds the report of `runDirs` (see ReportOptions); returns the paths written and every number shown. */
export async function buildReport(runDirs: readonly string[], options: ReportOptions): Promise<ReportResult> {
  if (!Array.isArray(runDirs) || runDirs.length === 0)
    throw new TypeError("runDirs: expected at least one run directory");
  checkRequiredOptions(options, "buildReport options", REPORT_KEYS);
  if (typeof options?.outDir !== "string") throw new TypeError("outDir: expected a directory path");
  // Checked before the work (the level was read only at the convergence figure, after the analyses).
  if (options.level !== undefined && !(typeof options.level === "number" && Number.isFinite(options.level)))
    throw new TypeError(
      `level: expected a finite number, got ${typeof options.level} ${JSON.stringify(options.level)}`,
    );
  const projection: unknown = options.projection;
  if (projection !== undefined && projection !== "pca" && projection !== "tsne" && projection !== "umap")
    throw new TypeError(`projection: expected "pca", "tsne" or "umap", got ${JSON.stringify(projection)}`);
  if (options.activations !== undefined && options.activations !== false) {
    checkRequiredOptions(options.activations, "buildReport options.activations", ACTIVATION_SECTION_KEYS);
  }
  if (options.names && options.names.length !== runDirs.length)
    throw new RangeError(
      `names: expected ${runDirs.length} names (one per run), got ${options.names.length}`,
    );
  const progress = options.onProgress ?? (() => {});
  const seed = options.seed ?? 0;
  const outDir = resolve(options.outDir);
  const figDir = join(outDir, "figures");
  const names = options.names ?? runDirs.map((d) => basename(resolve(d)));
  if (new Set(names).size !== names.length)
    throw new RangeError(`names: run names must differ (${names.join(", ")})`);
  const runs = runDirs.map((d, i) => loadRun(resolve(d), names[i]));
  // After the runs are read (a failed read leaves no empty folder), before the work: a directory that cannot
  // be written fails now, not after the analyses.
  ensureWritableDir(figDir);
  const notes: string[] = [];
  for (const r of runs)
    if (r.unfinished)
      notes.push(
        `${r.name} has no prompt.safetensors (unfinished): its prompt is the step-${r.unfinished.step} ${r.unfinished.from}.`,
      );
  const figures: { name: string; title: string; spec: PlotSpec }[] = [];

  // Model: for the vocabulary and the activations.
  let model: Model | null = null;
  let ownsModel = false;
  if (options.model !== null) {
    if (options.model && typeof options.model !== "string") model = options.model;
    else {
      const dir =
        (options.model as string | undefined) ??
        ((runs[0].record.model as { dir?: string } | undefined)?.dir as string | undefined);
      if (typeof options.model === "string" && !existsSync(options.model))
        throw new Error(`model: ${options.model} does not exist`); // given, not recorded: a typo is an error
      if (dir && existsSync(dir)) {
        progress(`loading ${dir}`);
        model = await loadModel(dir, { threads: options.threads });
        ownsModel = true;
      } else
        notes.push(
          `The model directory ${dir ?? "(none recorded)"} is not available: no vocabulary or activation sections.`,
        );
    }
  }
  // Runs trained on another model than the one loaded: refused when their prompts do not fit it (the
  // message named neither the run nor the cause), noted when they fit but the model files differ.
  if (model) {
    let fingerprint: string | null = null;
    try {
      fingerprint = model.dir ? modelFingerprint(model.dir) : null;
    } catch {
      fingerprint = null; // a model made in memory has no directory to compare
    }
    for (const r of runs) {
      const P = Number(r.record.promptLength ?? 0);
      const recorded = r.record.model as { dir?: string; fingerprint?: string } | undefined;
      if (r.final && P > 0 && r.final.length !== P * model.config.hiddenSize) {
        if (ownsModel) model.dispose();
        throw new Error(
          `${r.name}: its prompt is ${r.final.length / P} wide, the model's hidden size ${model.config.hiddenSize}: ` +
            `it was trained on another model (${recorded?.dir ?? "not recorded"}); report it with that model or leave it out`,
        );
      }
      if (fingerprint && recorded?.fingerprint && recorded.fingerprint !== fingerprint)
        notes.push(
          `${r.name} was trained on another model (${recorded.dir ?? "?"}) than the one loaded (${model.dir}): its prompts are shown in the loaded model's space.`,
        );
    }
  }
  try {
    // Without a model, from a run that has a soft prompt (P rows of dim values).
    const withPrompt = runs.find((r) => r.final && Number(r.record.promptLength ?? 0) > 0);
    const dim =
      model?.config.hiddenSize ??
      (withPrompt ? withPrompt.final!.length / Number(withPrompt.record.promptLength) : 0);

    // Convergence and the summary table.
    const conv = convergenceByRun(
      runs.map((r) => ({ name: r.name, metrics: r.metrics })),
      { level: options.level },
    );
    // What the convergence column can and cannot say.
    const tasks = [...new Set(runs.map((r) => taskName(r.record.task)))];
    if (tasks.length > 1 && options.level === undefined)
      notes.push(
        `The runs span several tasks (${tasks.join(", ")}): the convergence level is one validation loss for all of them; report each task's runs separately to compare convergence.`,
      );
    const single = runs.filter(
      (r) => r.metrics.evals.filter((e) => Number.isFinite(e.validationLoss)).length <= 1,
    );
    if (single.length > 0)
      notes.push(
        `${single.map((r) => r.name).join(", ")}: one validation evaluation or none, so the convergence step is at most the last step (train with evalEvery for a curve).`,
      );
    const summaries: RunSummary[] = runs.map((r, i) => {
      const last: EvalRecord | undefined = r.metrics.evals[r.metrics.evals.length - 1];
      const lastStep = r.metrics.steps[r.metrics.steps.length - 1];
      return {
        name: r.name,
        dir: r.dir,
        prior: describeRecord(r.record.prior),
        task: taskName(r.record.task),
        mode: String(r.record.mode ?? "soft"),
        steps: lastStep?.step ?? 0,
        finalTrainLoss: lastStep?.loss ?? null,
        finalValidationLoss: last?.validationLoss ?? null,
        accuracy: last?.accuracy ?? null,
        exactMatch: last?.exactMatch ?? null,
        f1: last?.f1 ?? null,
        collapseRate: last?.collapse?.collapseRate ?? null,
        meanNearestCosine: last?.collapse?.meanNearestCosine ?? null,
        meanDivergence: last?.collapse?.meanDivergence ?? null,
        convergenceStep: conv.steps[i].step,
        promptDisplacement: dim > 0 ? meanDisplacement(r.initial, r.final, dim) : null,
      };
    });

    // Loss curves per prior.
    const loss: LossPoint[] = [];
    for (const r of runs) {
      for (const s of r.metrics.steps) loss.push({ step: s.step, loss: s.loss, run: r.name, kind: "train" });
      for (const e of r.metrics.evals)
        loss.push({ step: e.step, loss: e.validationLoss, run: r.name, kind: "validation" });
    }
    figures.push({
      name: "loss-curves",
      title: "Loss curves per prior",
      spec: lossCurveSpec(loss, { title: "Loss per prior" }),
    });
    figures.push({
      name: "convergence",
      title: `Steps to reach validation loss ${conv.level.toFixed(4)}`,
      spec: barSpec(
        conv.steps.map((s) => ({ name: s.name, value: s.step })),
        { title: `Steps to validation loss <= ${conv.level.toFixed(4)}`, valueTitle: "step" },
      ),
    });

    // Embedding space: vocabulary vs prior samples (initial prompts) vs trained prompts, and trajectories.
    const withPrompts = runs.filter((r) => r.initial && r.final);
    if (withPrompts.length > 0 && dim > 0) {
      progress("projecting prompts");
      const vocab = model ? model.tokenEmbeddings() : null;
      const vocabRows = vocab ? vocab.length / dim : 0;
      const basisRows = vocab ?? concatRows(withPrompts.flatMap((r) => [r.initial!, r.final!]));
      const basis = await fitPca(basisRows, dim, { components: 2, seed, threads: options.threads });
      const shownVocab = vocab
        ? limitRows(
            Array.from({ length: vocabRows }, (_, i) => i),
            options.maxVocabularyPoints ?? 2000,
            seed,
          )
        : [];
      const sets: { group: string; rows: Float32Array; labels: string[]; background?: boolean }[] = [];
      if (vocab) {
        const rows = concatRows(shownVocab.map((i) => vocab.subarray(i * dim, (i + 1) * dim)));
        const labels = shownVocab.map((i) => model?.tokenizer?.idToToken(i) ?? String(i));
        sets.push({ group: "vocabulary", rows, labels, background: true });
      }
      for (const r of withPrompts) {
        const p = r.initial!.length / dim;
        const idx = Array.from({ length: p }, (_, i) => `${r.name} #${i}`);
        sets.push({ group: `${r.name}: prior sample`, rows: r.initial!, labels: idx });
        sets.push({ group: `${r.name}: trained`, rows: r.final!, labels: idx });
      }
      const method = options.projection ?? "pca";
      if (method !== "pca" && method !== "tsne" && method !== "umap")
        throw new TypeError(`projection: expected "pca", "tsne" or "umap", got ${JSON.stringify(method)}`);
      let coords: Float64Array;
      const all = concatRows(sets.map((s) => s.rows));
      if (method === "pca") coords = basis.transform(all);
      else if (method === "tsne") coords = await tsne(all, dim, { seed, threads: options.threads });
      else coords = await umap(all, dim, { seed, threads: options.threads });
      const points: ProjectedPoint[] = [];
      let o = 0;
      for (const s of sets)
        s.labels.forEach((label) => {
          points.push({ x: coords[2 * o], y: coords[2 * o + 1], group: s.group, label });
          o++;
        });
      const axis =
        method === "pca"
          ? ["PC 1", "PC 2"]
          : method === "tsne"
            ? ["t-SNE 1", "t-SNE 2"]
            : ["UMAP 1", "UMAP 2"];
      figures.push({
        name: "embedding-space",
        title: "Vocabulary, prior samples and trained prompts",
        spec: scatterSpec(points, {
          title: `Embedding space (${method === "pca" ? (vocab ? "PCA of the vocabulary" : "PCA of the prompts") : `${method === "tsne" ? "t-SNE" : "UMAP"} of ${vocab ? "a vocabulary sample and " : ""}the prompts`})`,
          xTitle: axis[0],
          yTitle: axis[1],
          background: ["vocabulary"],
        }),
      });
      const traj: TrajectoryPoint[] = [];
      for (const r of runs)
        for (const s of r.snapshots) {
          const xy = basis.transform(s.prompt);
          for (let v = 0; v < xy.length / 2; v++)
            traj.push({ x: xy[2 * v], y: xy[2 * v + 1], step: s.step, run: r.name, vector: v });
        }
      if (traj.length > 0)
        figures.push({
          name: "prompt-trajectories",
          title: "Prompt trajectories over training",
          spec: trajectorySpec(traj, {
            title: `Prompt trajectories (${vocab ? "PCA of the vocabulary" : "PCA of the prompts"})`,
            xTitle: "PC 1",
            yTitle: "PC 2",
          }),
        });
    } else notes.push("No prompt snapshots found: no embedding-space or trajectory figures.");

    // Activations per task and layer.
    const clusterDistances: ClusterDistance[] = [];
    const trajectoryRows: TrajectoryRow[] = [];
    if (model && options.activations !== false) {
      const act = options.activations ?? {};
      const layers = act.layers ?? Array.from({ length: model.config.numLayers + 1 }, (_, i) => i);
      const perTask = act.texts ?? 64;
      const sets: { name: string; texts: string[] }[] = [];
      // A name taken already (two tasks of one kind, an extra set named like a task) is told apart.
      const addSet = (wanted: string, texts: string[]) => {
        let name = wanted;
        while (sets.some((s) => s.name === name)) name += "'";
        sets.push({ name, texts });
      };
      const seen = new Set<string>();
      for (const r of runs) {
        const key = JSON.stringify(r.record.task);
        if (seen.has(key)) continue;
        seen.add(key);
        try {
          const task = await loadRecordedTask(r.record.task as Record<string, unknown>);
          const texts = [...task.validation, ...task.train]
            .slice(0, perTask)
            .map((e) => e.prompt + e.completion);
          addSet(task.name, texts);
        } catch (e) {
          notes.push(
            `Task of ${r.name} could not be reloaded (${(e as Error).message}): left out of the activations.`,
          );
        }
      }
      for (const s of act.extraSets ?? []) addSet(s.name, s.texts.slice(0, perTask));
      if (sets.length > 0) {
        progress(`capturing activations of ${sets.length} text set(s) at ${layers.length} layers`);
        const captured = [];
        for (const s of sets)
          captured.push(await captureActivations(model, s.texts, { layers, pooling: "both" }));
        // Random walks over the vocabulary through the model: the baseline of the trajectory statistics.
        const rng = new Rng(seed);
        const walkLength = Math.max(2, Math.min(32, model.config.maxPositions));
        const walks = Array.from({ length: 32 }, () =>
          Int32Array.from({ length: walkLength }, () => rng.int(model!.config.vocabSize)),
        );
        const walkActs = await captureActivations(model, walks, { layers, pooling: "token" });
        const cluster: ClusterPoint[] = [];
        const density: DensityValue[] = [];
        for (const layer of layers) {
          const means = captured.map((c) => c.mean(layer));
          const joint = concatRows(means);
          const p = await fitPca(joint, dim, { components: 2, seed, threads: options.threads });
          const xy = p.transform(joint);
          let o = 0;
          sets.forEach((s, si) => {
            for (let t = 0; t < means[si].length / dim; t++, o++) {
              cluster.push({ x: xy[2 * o], y: xy[2 * o + 1], task: s.name, layer });
              density.push({ value: xy[2 * o], layer, group: s.name });
            }
          });
          for (let a = 0; a < sets.length; a++) {
            const ts = trajectoryStatistics(
              captured[a].trajectories(layer),
              walkActs.trajectories(layer),
              dim,
            );
            trajectoryRows.push({
              set: sets[a].name,
              layer,
              spreadRatio: ts.spreadRatio,
              meanRatio: ts.meanRatio,
              mannWhitneyP: ts.mannWhitney.pValue,
              spreadP: ts.spread.pValue,
            });
            for (let b = a + 1; b < sets.length; b++) {
              const na = means[a].length / dim;
              const nb = means[b].length / dim;
              if (na < 2 || nb < 2) {
                // A Gaussian, MMD or probe needs two rows a set: the pair gets NaN, the report goes on.
                clusterDistances.push({
                  layer,
                  a: sets[a].name,
                  b: sets[b].name,
                  frechet: Number.NaN,
                  symmetricKl: Number.NaN,
                  mmd2: Number.NaN,
                  probeAccuracy: Number.NaN,
                  probeChance: Math.max(na, nb) / (na + nb),
                });
                const note = `Sets with fewer than 2 texts (${sets[na < 2 ? a : b].name}) get no cluster distances.`;
                if (!notes.includes(note)) notes.push(note);
                continue;
              }
              const ga = await fitGaussian(means[a], dim, { threads: options.threads });
              const gb = await fitGaussian(means[b], dim, { threads: options.threads });
              const labels = new Int32Array(means[a].length / dim + means[b].length / dim);
              labels.fill(1, means[a].length / dim);
              const folds = Math.min(5, means[a].length / dim, means[b].length / dim);
              clusterDistances.push({
                layer,
                a: sets[a].name,
                b: sets[b].name,
                frechet: (await frechetDistance(ga, gb, { threads: options.threads })).distanceSquared,
                symmetricKl: (await gaussianKl(ga, gb, { threads: options.threads })).symmetric,
                mmd2: (await mmd(means[a], means[b], dim, { seed, threads: options.threads })).mmd2,
                probeAccuracy:
                  folds >= 2
                    ? (
                        await linearProbe(concatRows([means[a], means[b]]), labels, dim, {
                          folds,
                          seed,
                          threads: options.threads,
                        })
                      ).accuracy
                    : Number.NaN,
                probeChance: Math.max(na, nb) / (na + nb),
              });
            }
          }
        }
        const fewest = Math.min(...captured.map((c) => c.index.texts));
        if (sets.length > 1 && fewest <= dim)
          notes.push(
            `The Gaussians of the activation sets are fitted on ${fewest} or more texts in ${dim} dimensions: with ` +
              "fewer rows than dimensions the covariances are singular but for the ridge, which dominates the KL " +
              "divergence (Fréchet, MMD and the probe do not depend on it as much). Use more texts for KL.",
          );
        figures.push({
          name: "activation-clusters",
          title: "Activation clusters per task and layer",
          spec: clusterSpec(cluster, { title: "Per-text mean activations (PCA per layer)" }),
        });
        figures.push({
          name: "activation-density",
          title: "Density per layer",
          spec: densitySpec(density, { title: "Density of PC 1 per layer (Gaussian KDE)" }),
        });
      }
    }

    // Figures to disk, then the page.
    const written: string[] = [];
    for (const f of figures) {
      progress(`rendering ${f.name}`);
      const paths = await writeFigure(figDir, f.name, f.spec);
      written.push(paths.svg, paths.png);
    }
    const data: ReportData = {
      title: options.title ?? "priortune report",
      generated: new Date().toISOString(),
      convergenceLevel: conv.level,
      runs: summaries,
      clusterDistances,
      trajectories: trajectoryRows,
      figures: figures.map((f) => ({ name: f.name, title: f.title })),
      notes,
    };
    const json = join(outDir, "report.json");
    atomicWrite(json, `${JSON.stringify(data, null, 2)}\n`);
    const html = join(outDir, "report.html");
    atomicWrite(html, renderHtml(data, figures));
    return { html, json, figures: written, data };
  } finally {
    if (ownsModel) model?.dispose();
  }
}

// ---------------------------------------------------------------------------------------------------------
// HTML

function escapeHtml(s: string): string {
  return s.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!,
  );
}

/** A script's text made safe inside <script>: no "</script" (or "<!--") can close or confuse the element. */
function scriptText(js: string): string {
  return js.replace(/<\/(script)/gi, "<\\/$1").replace(/<!--/g, "<\\!--");
}

function vendorScript(pkg: string, file: string): string {
  const require = createRequire(import.meta.url);
  return readFileSync(join(dirname(require.resolve(pkg)), file), "utf8");
}

function fmt(v: number | null | undefined, digits = 4): string {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toFixed(digits);
}

function table(headers: string[], rows: (string | number | null)[][]): string {
  const head = headers.map((h) => `<th>${escapeHtml(h)}</th>`).join("");
  const body = rows
    .map(
      (r) =>
        `<tr>${r.map((c) => (typeof c === "number" || c === null ? `<td class="num">${fmt(c)}</td>` : `<td>${escapeHtml(c)}</td>`)).join("")}</tr>`,
    )
    .join("\n");
  return `<table><thead><tr>${head}</tr></thead><tbody>\n${body}\n</tbody></table>`;
}

export function renderHtml(
  data: ReportData,
  figures: { name: string; title: string; spec: PlotSpec }[],
): string {
  const runs = table(
    [
      "run",
      "prior",
      "task",
      "mode",
      "steps",
      "train loss",
      "validation loss",
      "accuracy",
      "exact match",
      "F1",
    ],
    data.runs.map((r) => [
      r.name,
      r.prior,
      r.task,
      r.mode,
      r.steps,
      r.finalTrainLoss,
      r.finalValidationLoss,
      r.accuracy,
      r.exactMatch,
      r.f1,
    ]),
  );
  const collapse = table(
    [
      "run",
      "collapse rate",
      "mean nearest cosine",
      "mean divergence",
      "initial → trained distance",
      `convergence step (≤ ${fmt(data.convergenceLevel)})`,
    ],
    data.runs.map((r) => [
      r.name,
      r.collapseRate,
      r.meanNearestCosine,
      r.meanDivergence,
      r.promptDisplacement,
      r.convergenceStep,
    ]),
  );
  const clusters = data.clusterDistances.length
    ? `<h2>Distances between activation clusters</h2>
<p>Per-text mean activations per layer. Fréchet: squared 2-Wasserstein distance of fitted Gaussians; KL: symmetric KL of the Gaussians (ridge 1e-3 of the mean variance); MMD²: unbiased, RBF kernel with the median-heuristic bandwidth; probe: cross-validated accuracy of a linear classifier (chance, the larger set's share, means inseparable; 1 = separable).</p>
${table(
  ["layer", "set A", "set B", "Fréchet", "symmetric KL", "MMD²", "probe accuracy", "probe chance"],
  data.clusterDistances.map((c) => [
    c.layer,
    c.a,
    c.b,
    c.frechet,
    c.symmetricKl,
    c.mmd2,
    c.probeAccuracy,
    c.probeChance,
  ]),
)}`
    : "";
  const traj = data.trajectories.length
    ? `<h2>Sentence trajectories against a random walk over the vocabulary</h2>
<p>Step lengths between consecutive token positions, compared with random token sequences through the same model. Spread ratio below 1: the sentences' steps spread less than the random walk's.</p>
${table(
  ["set", "layer", "spread ratio", "mean ratio", "Mann-Whitney p", "Brown-Forsythe p"],
  data.trajectories.map((t) => [t.set, t.layer, t.spreadRatio, t.meanRatio, t.mannWhitneyP, t.spreadP]),
)}`
    : "";
  const figureHtml = figures
    .map(
      (f, i) =>
        `<figure><figcaption>${escapeHtml(f.title)} <a href="figures/${f.name}.svg">SVG</a> <a href="figures/${f.name}.png">PNG</a></figcaption><div class="plot" id="plot-${i}"></div></figure>`,
    )
    .join("\n");
  const specs = JSON.stringify(figures.map((f) => f.spec));
  const notes = data.notes.length
    ? `<ul class="notes">${data.notes.map((n) => `<li>${escapeHtml(n)}</li>`).join("")}</ul>`
    : "";
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(data.title)}</title>
<style>
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0; } figcaption { font-weight: bold; margin-bottom: 0.4rem; }
figcaption a { font-weight: normal; font-size: 0.85rem; margin-left: 0.5rem; }
.meta, .notes { color: #555; font-size: 0.9rem; }
</style>
</head>
<body>
<h1>${escapeHtml(data.title)}</h1>
<p class="meta">Generated ${escapeHtml(data.generated)} by priortune from ${data.runs.length} run(s). Numbers: <a href="report.json">report.json</a>.</p>
${notes}
<h2>Runs</h2>
${runs}
<h2>Collapse and convergence</h2>
${collapse}
${clusters}
${traj}
<h2>Figures</h2>
${figureHtml}
<script>${scriptText(vendorScript("vega", "vega.min.js"))}</script>
<script>${scriptText(vendorScript("vega-lite", "vega-lite.min.js"))}</script>
<script>${scriptText(vendorScript("vega-embed", "vega-embed.min.js"))}</script>
<script>
const specs = ${scriptText(specs)};
window.plotsRendered = Promise.all(specs.map((spec, i) =>
  vegaEmbed("#plot-" + i, spec, { renderer: "svg", actions: { export: true, source: false, compiled: false, editor: false } })));
window.plotsRendered.then(() => { document.body.dataset.plots = "ready"; },
  (e) => { document.body.dataset.plots = "failed"; console.error(e); });
</script>
</body>
</html>
`;
}
