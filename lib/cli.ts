#!/usr/bin/env node
// The `priortune` command line.
import { realpathSync } from "node:fs";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Command } from "commander";
import { type CudaSelfTestPart, cudaSelfTest, cudaStatus } from "./backend.js";
import { integerArg, interruptible } from "./cli-args.js";
import { registerDataCommands } from "./cli-data.js";
import { registerPretrainCommand } from "./cli-pretrain.js";
import { registerReportCommands } from "./cli-report.js";
import { registerSamplePrior } from "./cli-sample-prior.js";
import { registerTuneCommands } from "./cli-tune.js";
import { demo, demoTables } from "./demo.js";
import { describeModel } from "./model.js";
import { addon } from "./native.js";

function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

export function infoText(dir: string): string {
  const info = describeModel(dir);
  const c = info.config;
  const rows: [string, string][] = [
    ["directory", info.dir],
    ["architecture", `${c.architecture} (${c.hfArchitecture})`],
    ["parameters", `${formatCount(info.parameterCount)} (${info.parameterCount})`],
    ["stored dtype", info.dtypes.join(", ")],
    ["weight files", String(info.weightFiles.length)],
    ["vocab size", String(c.vocabSize)],
    ["hidden size", String(c.hiddenSize)],
    ["layers", String(c.numLayers)],
    ["heads", `${c.numHeads} query / ${c.numKvHeads} key-value, head dim ${c.headDim}`],
    ["intermediate size", String(c.intermediateSize)],
    ["positions", String(c.maxPositions)],
    ["head", c.tiedHead ? "tied to the token embeddings" : "separate lm_head"],
  ];
  if (c.architecture === "llama") {
    const s = c.ropeScaling!;
    const scaling = s.type === "default" ? "" : `, ${s.type} scaling x${s.factor}`;
    rows.push(["rope", `theta ${c.ropeTheta}${scaling}`]);
  }
  rows.push([
    "tokenizer",
    info.tokenizer ? `${info.tokenizer.source}, ${info.tokenizer.vocabSize} entries` : "none found",
  ]);
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join("\n");
}

let epipeHandled = false;

export async function main(argv: string[]): Promise<void> {
  // Output piped into a reader that stops early (`| head`): end quietly, as Unix filters do.
  if (!epipeHandled) {
    epipeHandled = true;
    process.stdout.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE") throw e;
      process.exit(0);
    });
  }
  const program = new Command();
  program.name("priortune").description("Prompt-tuning priors and posteriors on frozen language models");
  // Before any subcommand exists: commander copies the setting to subcommands created after it, so bad
  // options anywhere end in our catch below rather than in process.exit.
  program.exitOverride();
  program
    .command("info")
    .description("describe a Hugging Face model directory (config, sizes, parameters, dtype, tokenizer)")
    .argument("<model-dir>", "directory with config.json, safetensors weights and tokenizer.json")
    .option("--json", "print JSON")
    .action((dir: string, opts: { json?: boolean }) => {
      if (opts.json) process.stdout.write(`${JSON.stringify(describeModel(dir), null, 2)}\n`);
      else process.stdout.write(`${infoText(dir)}\n`);
    });
  program
    .command("doctor")
    .description("show the native build: GEMM kernel, threads, CUDA status")
    .option(
      "--cuda-selftest [parts]",
      "also run the CUDA ops against their CPU reference (needs a usable device): all, or the comma-separated parts gemm, elementwise, attention",
    )
    .action(async (o: { cudaSelftest?: boolean | string }) => {
      const cpu = addon().cpuInfo();
      const cuda = cudaStatus();
      const peak = addon().fmaPeakGflops(cpu.hardwareThreads);
      process.stdout.write(
        `cpu gemm kernel  ${cpu.gemmKernel}\ncpu threads      ${cpu.hardwareThreads}\n` +
          `cpu fp32 peak    ${peak.toFixed(0)} GFLOP/s (measured: register-only FMA loop, all threads)\ncuda compiled    ${cuda.compiled}\n` +
          `cuda usable      ${cuda.usable}${cuda.usable ? ` (${cuda.name}, sm_${cuda.computeCapability})` : ` (${cuda.reason})`}\n`,
      );
      if (!o.cudaSelftest) return;
      const parts =
        typeof o.cudaSelftest === "string" && o.cudaSelftest !== "all"
          ? (o.cudaSelftest.split(",") as CudaSelfTestPart[])
          : undefined;
      const checks = await cudaSelfTest({ parts });
      for (const c of checks)
        process.stdout.write(
          `${c.pass ? "ok  " : "FAIL"} ${c.op} [${c.shape}] err ${c.err.toExponential(2)} (tol ${c.tol})\n`,
        );
      const bad = checks.filter((c) => !c.pass).length;
      process.stdout.write(`cuda self-test   ${checks.length - bad} of ${checks.length} pass\n`);
      if (bad) process.exitCode = 1;
    });
  registerTuneCommands(program);
  registerDataCommands(program);
  registerSamplePrior(program);
  registerPretrainCommand(program);
  registerReportCommands(program);
  program
    .command("demo")
    .description(
      "the paper's experiment in minutes on the shipped model: soft prompts on arithmetic and QA from three priors, with collapse metrics",
    )
    .option("--model <dir>", "model directory (default: the shipped models/priortune-small)")
    .option("--out <dir>", "where the run directories go (default runs/demo-<time>)")
    .option("--steps <n>", "optimizer steps per run", integerArg(1), 300)
    .option("--threads <n>", "CPU threads (default: all cores)", integerArg(1))
    .option("--json", "print the result rows as JSON")
    .action(async (o: { model?: string; out?: string; steps: number; threads?: number; json?: boolean }) => {
      const t0 = performance.now();
      const rows = await interruptible(
        "stopping after this step; its run is checkpointed and --out resumes",
        (signal) => demo({ modelDir: o.model, outDir: o.out, steps: o.steps, threads: o.threads, signal }),
      );
      if (o.json) process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
      else
        process.stdout.write(
          `\n${demoTables(rows)}\n\nruns: ${dirname(rows[0]!.runDir)} (${((performance.now() - t0) / 1e3).toFixed(0)} s in all)\n`,
        );
    });
  try {
    await program.parseAsync(argv);
  } catch (e) {
    const err = e as { code?: string; exitCode?: number; message: string };
    if (err.code?.startsWith("commander.")) {
      process.exitCode = err.exitCode ?? 1;
      return;
    }
    process.stderr.write(`priortune: ${err.message}\n`);
    process.exitCode = err.exitCode ?? 1; // an interrupted command's: 130 (SIGINT) or 143 (SIGTERM)
  }
}

// Run when executed directly (also through the npm bin link).
if (process.argv[1] && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url))
  await main(process.argv);
