// The priortune command line, run as a user would (a child process, no terminal: plain log lines).
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { modelDir } from "./helpers.js";

const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "lib", "cli.ts");
const run = (...args: string[]) =>
  spawnSync(process.execPath, ["--import", "tsx", cli, ...args], { encoding: "utf8" });
const tmp = mkdtempSync(join(tmpdir(), "priortune-cli-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("priortune CLI", () => {
  it("info describes a model directory", () => {
    const r = run("info", modelDir("llama-tiny"));
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/architecture\s+llama \(LlamaForCausalLM\)/);
    expect(r.stdout).toMatch(/parameters\s+295\.2k \(295200\)/);
    expect(r.stdout).toMatch(/stored dtype\s+BF16/);
    expect(r.stdout).toMatch(/rope\s+theta 10000, llama3 scaling x8/);
  });

  it("errors name the problem and exit non-zero", () => {
    const r = run("info", join(tmp, "missing"));
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/no config\.json/);
    const bad = run("tune", modelDir("llama-tiny"), "--task", "arithmetic", "--mode", "sideways");
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toMatch(/--mode <mode>' argument 'sideways' is invalid/);
  });

  it("tune --help documents every option", () => {
    const r = run("tune", "--help");
    expect(r.status).toBe(0);
    for (const opt of [
      "--task",
      "--prior",
      "--prior-opt",
      "--mode",
      "--deep-layers",
      "--regularizer",
      "--lambda",
      "--schedule",
      "--warmup",
      "--clip-norm",
      "--accumulate",
      "--eval-every",
      "--run-dir",
      "--seed",
    ]) {
      expect(r.stdout).toContain(opt);
    }
  });

  it("tune writes a run that eval reads back; a second tune on the finished run resumes at its end", () => {
    const runDir = join(tmp, "run");
    const args = [
      "tune",
      modelDir("llama-tiny"),
      "--task",
      "arithmetic",
      "--train-count",
      "24",
      "--validation-count",
      "4",
      "--steps",
      "6",
      "--prompt-length",
      "4",
      "--eval-every",
      "3",
      "--prior-opt",
      "sigma=0.5",
      "--run-dir",
      runDir,
      "--threads",
      "2",
    ];
    const r = run(...args);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/step 1\/6 loss \d+\.\d+/);
    expect(r.stderr).toMatch(/eval @6: val loss \d+\.\d+, accuracy/);
    expect(existsSync(join(runDir, "prompt.safetensors"))).toBe(true);
    const ev = JSON.parse(
      execFileSync(process.execPath, ["--import", "tsx", cli, "eval", runDir], { encoding: "utf8" }),
    );
    expect(ev.step).toBe(6);
    expect(ev.validationLoss).toBeGreaterThan(0);
    const again = run(...args, "--json");
    expect(again.status, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout).resumedFrom).toBe(6);
  });
});
