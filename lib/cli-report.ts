// `priortune report`: compare runs in one self-contained HTML page with a folder of SVG/PNG figures.
import { type Command, InvalidArgumentError, Option } from "commander";
import { integerArg, integerListArg, numberArg, seedArg } from "./cli-args.js";
import { readTexts } from "./priors.js";
import { buildReport } from "./report.js";

function nameFile(value: string, previous: { name: string; file: string }[] = []) {
  const eq = value.indexOf("=");
  if (eq <= 0 || eq === value.length - 1) throw new InvalidArgumentError(`expected name=file, got ${value}`);
  return [...previous, { name: value.slice(0, eq), file: value.slice(eq + 1) }];
}

interface ReportCliOptions {
  out: string;
  title?: string;
  names?: string;
  model?: string | false;
  projection: "pca" | "tsne" | "umap";
  maxVocabularyPoints: number;
  level?: number;
  activations: boolean;
  layers?: number[];
  texts: number;
  extraTexts: { name: string; file: string }[];
  seed: number;
  threads?: number;
}

export function registerReportCommands(program: Command): void {
  program
    .command("report")
    .description(
      "compare runs: report.html (tables and interactive plots, viewable offline), report.json and figures/ (SVG, PNG, Vega-Lite)",
    )
    .argument("<run-dir...>", "run directories written by `priortune tune`")
    .requiredOption("--out <dir>", "output directory (created if missing)")
    .option("--title <text>", "page title", "priortune report")
    .option("--names <list>", "run names, comma separated (default: the directories' names)")
    .option(
      "--model <dir>",
      "model for the vocabulary and activation sections (default: the first run's model)",
    )
    .option("--no-model", "skip the vocabulary and activation sections")
    .addOption(
      new Option("--projection <method>", "projection of the embedding-space figure")
        .choices(["pca", "tsne", "umap"])
        .default("pca"),
    )
    .option("--max-vocabulary-points <n>", "vocabulary rows drawn (a seeded subsample)", integerArg(0), 2000)
    .option(
      "--level <loss>",
      "validation loss of the convergence step (default: the highest final one)",
      numberArg,
    )
    .option("--no-activations", "skip the activation section (clusters, densities, distances, trajectories)")
    .option(
      "--layers <list>",
      "hidden-state indices of the activation section (default: all)",
      integerListArg,
    )
    .option("--texts <n>", "texts per task in the activation section", integerArg(1), 64)
    .option(
      "--extra-texts <name=file>",
      "another text set for the activation section (one text per line, or .jsonl/.json with a text field); repeatable",
      nameFile,
      [],
    )
    .option("--seed <n>", "seed of the subsamples and projections", seedArg, 0)
    .option("--threads <n>", "CPU threads (default: all cores)", integerArg(1))
    .action(async (runDirs: string[], o: ReportCliOptions) => {
      const names = o.names?.split(",").map((s) => s.trim());
      const result = await buildReport(runDirs, {
        outDir: o.out,
        title: o.title,
        names,
        model: o.model === false ? null : o.model,
        projection: o.projection,
        maxVocabularyPoints: o.maxVocabularyPoints,
        level: o.level,
        activations: o.activations
          ? {
              layers: o.layers,
              texts: o.texts,
              extraSets: o.extraTexts.map((e) => ({ name: e.name, texts: readTexts(e.file) })),
            }
          : false,
        seed: o.seed,
        threads: o.threads,
        onProgress: (m) => process.stderr.write(`${m}\n`),
      });
      process.stdout.write(
        `${result.html}\n${result.json}\n${result.figures.length / 2} figures (SVG and PNG, and each one's Vega-Lite spec) in ${o.out}/figures\n`,
      );
    });
}
