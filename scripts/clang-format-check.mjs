#!/usr/bin/env node
// Checks (or with --fix, applies) clang-format on kernels/, native/ and tools/ using the clang-format npm
// package.
import { execFileSync } from "node:child_process";
import { readdirSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const fix = process.argv.includes("--fix");
const files = [];
const walk = (dir) => {
  for (const f of readdirSync(dir)) {
    const p = join(dir, f);
    if (statSync(p).isDirectory()) walk(p);
    else if (/\.(cpp|h|cu|cuh)$/.test(f)) files.push(p);
  }
};
walk("kernels");
walk("native");
walk("tools");
const bin = require.resolve("clang-format/index.js");
const args = fix ? ["-i", ...files] : ["--dry-run", "--Werror", ...files];
try {
  execFileSync(process.execPath, [bin, ...args], { stdio: "inherit" });
} catch {
  console.error("clang-format: formatting differs; run `npm run format`");
  process.exit(1);
}
