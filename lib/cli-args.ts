// Option parsers shared by the priortune subcommands (commander calls them with the raw string; an
// InvalidArgumentError becomes "option '--x <n>' argument 'y' is invalid. <message>").
import { InvalidArgumentError } from "commander";

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
