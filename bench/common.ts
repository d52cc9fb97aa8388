// Benchmark plumbing: machine description, the PyTorch peer (run in the same invocation), and tables.
import { execFileSync } from "node:child_process";
import { cpus, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { addon } from "../lib/native.js";

export const benchDir = dirname(fileURLToPath(import.meta.url));

export function machine(): string {
  const cpu = cpus()[0]?.model ?? "unknown CPU";
  const info = addon().cpuInfo();
  return `${cpu}, ${info.hardwareThreads} threads, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, gemm kernel ${info.gemmKernel}, node ${process.version}`;
}

/**
 * Runs a Python peer script and returns its JSON lines, or null (with the reason printed) when no Python
 * with the needed packages is available. PRIORTUNE_PYTHON selects the interpreter (default python3).
 */
export function runPythonPeer(script: string, args: string[] = []): Record<string, unknown>[] | null {
  const python = process.env.PRIORTUNE_PYTHON ?? "python3";
  try {
    const out = execFileSync(python, [join(benchDir, "peers", script), ...args], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, OMP_NUM_THREADS: args[0] ?? process.env.OMP_NUM_THREADS },
      maxBuffer: 16 * 2 ** 20,
    });
    return out
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l));
  } catch (e) {
    const msg =
      (e as { stderr?: string; message: string }).stderr?.split("\n").filter(Boolean).pop() ??
      (e as Error).message;
    console.log(`peer ${script} not run (${python}): ${msg}`);
    return null;
  }
}

export function table(rows: Record<string, string | number>[]): string {
  if (rows.length === 0) return "";
  const keys = Object.keys(rows[0]!);
  const fmt = (v: string | number) =>
    typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)) : v;
  const cells = rows.map((r) => keys.map((k) => String(fmt(r[k] ?? ""))));
  const widths = keys.map((k, i) => Math.max(k.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]) => `| ${c.map((v, i) => v.padEnd(widths[i]!)).join(" | ")} |`;
  return [line(keys), `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`, ...cells.map(line)].join("\n");
}

import { Bench } from "tinybench";

/** Median latency in ms of `fn` under tinybench (warm-up included), at least `iterations` runs. */
export async function medianMs(
  name: string,
  fn: () => unknown | Promise<unknown>,
  iterations = 5,
  time = 2000,
): Promise<number> {
  const bench = new Bench({ name, iterations, time, warmupIterations: 1, warmupTime: 0 });
  bench.add(name, fn);
  await bench.run();
  const result = bench.tasks[0]!.result as { state: string; latency?: { p50: number }; error?: Error };
  if (!result.latency)
    throw new Error(`benchmark ${name} did not complete (${result.state}): ${result.error?.message ?? ""}`);
  return result.latency.p50;
}
