// The priortune command line, run as a user would (a child process, no terminal: plain log lines).
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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
    const common = [
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
      "--max-length",
      "40",
      "--seed",
      "5",
      "--prior-opt",
      "sigma=0.5",
      "--run-dir",
      runDir,
      "--threads",
      "2",
    ];
    // The run is made as an earlier version made it: its task divided train first, and run.json's task
    // without the split (eval and a resumed tune must divide it so again).
    const r = run(...common, "--task-opt", "split=train-first");
    const runJson = join(runDir, "run.json");
    const record = JSON.parse(readFileSync(runJson, "utf8"));
    expect(record.task.split).toBe("train-first");
    delete record.task.split;
    writeFileSync(runJson, JSON.stringify(record, null, 2));
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/step 1\/6 loss \d+\.\d+/);
    expect(r.stderr).toMatch(/eval @6: val loss \d+\.\d+, accuracy/);
    expect(existsSync(join(runDir, "prompt.safetensors"))).toBe(true);
    const ev = JSON.parse(
      execFileSync(process.execPath, ["--import", "tsx", cli, "eval", runDir], { encoding: "utf8" }),
    );
    expect(ev.step).toBe(6);
    expect(ev.validationLoss).toBeGreaterThan(0);
    // The same numbers tune recorded at step 6: eval takes the run's token budget (--max-length 40 less
    // the prompt) and its seed (the collapse reference's divergence rows), not the defaults.
    const recorded = readFileSync(join(runDir, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
      .filter((l) => l.type === "eval" && l.step === 6)
      .at(-1);
    expect(ev.validationLoss).toBe(recorded.validationLoss);
    expect(ev.accuracy).toBe(recorded.accuracy);
    expect(ev.collapse.meanDivergence).toBe(recorded.collapse.meanDivergence);
    const again = run(...common, "--json");
    expect(again.status, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout).resumedFrom).toBe(6);
    // Another task in the same directory is named as the difference.
    const other = run(...common.map((a) => (a === "24" ? "25" : a)));
    expect(other.status).not.toBe(0);
    expect(other.stderr).toMatch(/holds a different run \(run\.json differs in task\)/);
  });
});

describe("--task-opt and --prior-opt values", () => {
  it("parses booleans, numbers, comma lists of numbers or words, and JSON", async () => {
    const { keyValue } = await import("../lib/cli-tune.js");
    expect(keyValue("negative=true")).toEqual({ negative: true });
    expect(keyValue("digits=2")).toEqual({ digits: 2 });
    expect(keyValue("digits=1,2")).toEqual({ digits: [1, 2] });
    expect(keyValue("operations=add,mul")).toEqual({ operations: ["add", "mul"] }); // refused before
    expect(keyValue("operations=mul")).toEqual({ operations: "mul" });
    expect(keyValue('name="2024"')).toEqual({ name: "2024" });
    expect(keyValue("template=Q: {q}, A:")).toEqual({ template: "Q: {q}, A:" });
    expect(keyValue('ops=["mul"]', { a: 1 })).toEqual({ a: 1, ops: ["mul"] });
    expect(() => keyValue("x=[1,")).toThrow("x: not valid JSON");
    const { taskSpec } = await import("../lib/cli-tune.js");
    const one = taskSpec({ task: "arithmetic", taskOpt: keyValue("operations=mul"), seed: 0 });
    expect((one as { operations?: string[] }).operations).toEqual(["mul"]);
  });
});
