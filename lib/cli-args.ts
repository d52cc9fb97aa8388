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
 * Ctrl-C (SIGINT) or SIGTERM during a command that can stop cleanly: the first aborts `signal` (the work
 * stops at its next step boundary, keeping what it did) after printing `stopping`; a second ends the process
 * at once (status 130 or 143). `release` removes the handlers. `exitCode` is the status for the stop.
 */
export function interruptible(stopping: string): {
  signal: AbortSignal;
  release: () => void;
  exitCode: () => number;
} {
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
  return {
    signal: controller.signal,
    release: () => {
      process.off("SIGINT", handler);
      process.off("SIGTERM", handler);
    },
    exitCode: () => (first ? statusOf(first) : 1),
  };
}
