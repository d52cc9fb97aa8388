// The priortune command line, run as a user would (a child process, no terminal: plain log lines).
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { writeSafetensors } from "../lib/safetensors.js";
import { fixtures, modelDir } from "./helpers.js";

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

  it("sample-prior, make-data and doctor: seeds, bad vectors, failed writes, closed pipes, --cuda-selftest all", () => {
    const model = modelDir("llama-tiny");
    const wide = run(
      "sample-prior",
      model,
      "--prior",
      "gaussian",
      "--seed",
      "4294967296",
      "--out",
      join(tmp, "w.st"),
    );
    expect(wide.status).not.toBe(0); // it wrote seed 0's draw, recorded as seed 4294967296
    expect(wide.stderr).toMatch(
      /--seed <n>' argument '4294967296' is invalid\. expected an integer from 0 to 4294967295/,
    );
    // A posterior whose vectors are not finite is refused when read, not when the prompt is first used.
    const nan = join(tmp, "nan.safetensors");
    const hidden = JSON.parse(readFileSync(join(model, "config.json"), "utf8")).hidden_size as number;
    const data = new Float32Array(2 * hidden);
    data[hidden + 3] = Number.NaN;
    writeSafetensors(nan, [{ name: "prompt", dtype: "F32", shape: [2, hidden], data }]);
    const post = run(
      "sample-prior",
      model,
      "--prior",
      "posterior",
      "--path",
      nan,
      "--count",
      "2",
      "--out",
      join(tmp, "p.st"),
    );
    expect(post.status).not.toBe(0);
    expect(post.stderr).toMatch(/tensor "prompt": row 1, column 3 is NaN/);
    // Errors name the flag, not the library's option.
    const finite = new Float32Array(2 * hidden);
    const two = join(tmp, "two.safetensors");
    writeSafetensors(two, [{ name: "prompt", dtype: "F32", shape: [2, hidden], data: finite }]);
    const count = run(
      "sample-prior",
      model,
      "--prior",
      "posterior",
      "--path",
      two,
      "--count",
      "5",
      "--out",
      join(tmp, "c.st"),
    );
    expect(count.stderr).toMatch(/--count: the posterior holds 2 prompt vectors; asked for 5/);
    const rows = run(
      "sample-prior",
      model,
      "--prior",
      "knn",
      "--sample-rows",
      "0",
      "--out",
      join(tmp, "k.st"),
    );
    expect(rows.stderr).toMatch(/--sample-rows: expected an integer >= 1, got 0/);
    const dup = run(
      "make-data",
      "arithmetic",
      "-n",
      "500",
      "--digits",
      "1",
      "--operations",
      "add",
      "--phrasing",
      "plain",
      "--out",
      "-",
    );
    expect(dup.status).not.toBe(0);
    expect(dup.stderr).toMatch(/pass --allow-duplicates/);
    // A write that fails (file size limit) leaves the old file and no temporary file.
    const old = join(tmp, "old.safetensors");
    expect(run("sample-prior", model, "--prior", "gaussian", "--count", "2", "--out", old).status).toBe(0);
    const before = readFileSync(old);
    const limited = spawnSync(
      "bash",
      [
        "-c",
        `ulimit -f 8; exec "$0" --import tsx "$1" sample-prior "$2" --prior gaussian --count 64 --out "$3"`,
        process.execPath,
        cli,
        model,
        old,
      ],
      { encoding: "utf8" },
    );
    expect(limited.status).not.toBe(0);
    expect(limited.stderr).toMatch(/old\.safetensors\S*: EFBIG/); // the file named (Node's write errors do not)
    expect(readFileSync(old).equals(before)).toBe(true); // was a torn 8 KiB file
    expect(readdirSync(tmp).filter((f) => f.includes(".tmp-"))).toEqual([]);
    // make-data into a pipe that closes early ends quietly (was an unhandled EPIPE with a stack trace).
    const piped = spawnSync(
      "bash",
      [
        "-c",
        `"$0" --import tsx "$1" make-data arithmetic -n 200000 --digits 4 --out - | head -1; echo "status \${PIPESTATUS[0]}"`,
        process.execPath,
        cli,
      ],
      { encoding: "utf8" },
    );
    expect(piped.stdout).toMatch(/status 0/);
    expect(piped.stderr).not.toMatch(/EPIPE/);
    // "all" is what the help offers; without a device the answer is the device's absence.
    const doctor = run("doctor", "--cuda-selftest", "all");
    expect(doctor.stderr).not.toMatch(/unknown part/);
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

  it("Ctrl-C stops tune after its step, checkpointed (status 130); the same command resumes to the same prompt", async () => {
    const args = (runDir: string) => [
      "--import",
      "tsx",
      cli,
      "tune",
      modelDir("llama-tiny"),
      "--task",
      "arithmetic",
      "--train-count",
      "24",
      "--validation-count",
      "2",
      "--steps",
      "200",
      "--prompt-length",
      "4",
      "--eval-every",
      "200",
      "--checkpoint-every",
      "1000",
      "--max-length",
      "40",
      "--seed",
      "5",
      "--run-dir",
      runDir,
      "--threads",
      "2",
    ];
    const runDir = join(tmp, "interrupted");
    const metrics = join(runDir, "metrics.jsonl");
    const child = spawn(process.execPath, args(runDir));
    let stderr = "";
    child.stderr.on("data", (d) => {
      stderr += d;
    });
    // SIGINT once the first step is on record (long before the 200th).
    const poll = setInterval(() => {
      if (existsSync(metrics) && readFileSync(metrics, "utf8").includes('"type":"step"')) {
        clearInterval(poll);
        child.kill("SIGINT");
      }
    }, 20);
    const status = await new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
    clearInterval(poll);
    expect(status, stderr).toBe(130);
    expect(stderr).toMatch(/interrupted: stopping after this step; a checkpoint keeps it/);
    const m = /tune: aborted at step (\d+) \(checkpointed in /.exec(stderr);
    expect(m, stderr).not.toBeNull();
    const stopped = Number(m![1]);
    expect(stopped).toBeGreaterThan(0);
    expect(stopped).toBeLessThan(200);
    expect(JSON.parse(readFileSync(join(runDir, "checkpoint.json"), "utf8")).step).toBe(stopped);
    const resumed = spawnSync(process.execPath, args(runDir), { encoding: "utf8" });
    expect(resumed.status, resumed.stderr).toBe(0);
    const whole = join(tmp, "uninterrupted");
    expect(spawnSync(process.execPath, args(whole), { encoding: "utf8" }).status).toBe(0);
    const prompt = (dir: string) => readFileSync(join(dir, "prompt.safetensors"));
    expect(prompt(runDir).equals(prompt(whole))).toBe(true);
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
    // The phases before step 1 and the collapse reference's build (minutes on a large model) are named.
    expect(r.stderr).toMatch(/^loading .*llama-tiny\npreparing the gaussian prior\n/);
    expect(r.stderr.match(/building the collapse reference/g)).toHaveLength(1);
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

describe("tune --deep-prior", () => {
  it("fits one Gaussian per deep layer to that layer's input activations; --deep-lr is recorded", () => {
    const runDir = join(tmp, "deep-prior-run");
    const r = run(
      "tune",
      modelDir("llama-tiny"),
      "--task",
      "arithmetic",
      "--train-count",
      "8",
      "--validation-count",
      "2",
      "--steps",
      "1",
      "--prompt-length",
      "2",
      "--mode",
      "deep-hidden",
      "--deep-prior",
      "fitted-gaussian",
      "--deep-prior-opt",
      "source=activations",
      "--deep-prior-opt",
      `textsFile=${join(fixtures, "data", "prose.txt")}`,
      "--deep-lr",
      "0.001",
      "--max-new-tokens",
      "2",
      "--run-dir",
      runDir,
      "--threads",
      "2",
    );
    expect(r.status, r.stderr).toBe(0);
    const record = JSON.parse(readFileSync(join(runDir, "run.json"), "utf8"));
    expect(record.deepLayers).toEqual([0, 1, 2]);
    expect(record.deepPriors.map((p: { layer: number; source: string }) => `${p.source}@${p.layer}`)).toEqual(
      ["activations@0", "activations@1", "activations@2"],
    );
    expect(record.optimizer.deepLr).toBe(0.001);
    const lone = run("tune", modelDir("llama-tiny"), "--task", "arithmetic", "--deep-prior-opt", "sigma=1");
    expect(lone.status).not.toBe(0);
    expect(lone.stderr).toContain("--deep-prior-opt: give --deep-prior too");
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
