// Option parsers shared by the priortune subcommands (commander calls them with the raw string; an
// InvalidArgumentError becomes "option '--x <n>' argument 'y' is invalid. <message>").
import { type Command, InvalidArgumentError, Option } from "commander";
import type { BackendChoice } from "./backend.js";
import type { CudaPrecision } from "./native.js";

/** What --backend and --precision give a command (see withBackend). */
export interface BackendFlags {
  backend: BackendChoice;
  precision: CudaPrecision;
}

/** Adds --backend and --precision (the CUDA matrix-product precision) to a command that loads a model. */
export function withBackend(cmd: Command, description = "compute backend"): Command {
  return cmd
    .addOption(new Option("--backend <kind>", description).choices(["auto", "cpu", "cuda"]).default("auto"))
    .addOption(
      new Option("--precision <p>", "CUDA matrix products: bf16 (tensor cores), tf32, or fp32 (exact path)")
        .choices(["bf16", "tf32", "fp32"])
        .default("bf16"),
    );
}

/** An integer >= min (default: any integer). */
export const integerArg =
  (min = Number.MIN_SAFE_INTEGER) =>
  (value: string): number => {
    const n = Number(value);
    if (!/^\s*-?\d+\s*$/u.test(value) || !Number.isSafeInteger(n) || n < min) {
      throw new InvalidArgumentError(
        min === Number.MIN_SAFE_INTEGER
          ? `expected an integer, got ${value}`
          : `expected an integer >= ${min}, got ${value}`,
      );
    }
    return n;
  };

/** A seed: an integer from 0 to 2^32 - 1 (the RNG's width; a wider one would repeat another seed). */
export function seedArg(value: string): number {
  const n = integerArg(0)(value);
  if (n > 0xffffffff)
    throw new InvalidArgumentError(`expected an integer from 0 to 4294967295, got ${value}`);
  return n;
}

/** Any finite number. */
export function numberArg(value: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n))
    throw new InvalidArgumentError(`expected a number, got ${value}`);
  return n;
}

/** Comma-separated integers. */
export function integerListArg(value: string): number[] {
  return value.split(",").map((v) => integerArg()(v.trim()));
}

/**
 * Runs `work` so that Ctrl-C (SIGINT) or SIGTERM stops it cleanly: the first aborts the signal it is given
 * (the work stops at its next step boundary, keeping what it did) after printing `stopping`; a second ends
 * the process at once (status 130 or 143). The error of a stopped work carries that status as `exitCode`
 * (main() exits with it). The handlers are removed when the work settles.
 */
export async function interruptible<T>(
  stopping: string,
  work: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  const controller = new AbortController();
  let first: NodeJS.Signals | undefined;
  const statusOf = (s: NodeJS.Signals) => (s === "SIGINT" ? 130 : 143);
  const handler = (s: NodeJS.Signals) => {
    if (first) process.exit(statusOf(s));
    first = s;
    process.stderr.write(
      `\n${s === "SIGINT" ? "interrupted" : "terminated"}: ${stopping} (${s} again quits now)\n`,
    );
    controller.abort();
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
  try {
    return await work(controller.signal);
  } catch (e) {
    if (first && e instanceof Error) Object.assign(e, { exitCode: statusOf(first) });
    throw e;
  } finally {
    process.off("SIGINT", handler);
    process.off("SIGTERM", handler);
  }
}
