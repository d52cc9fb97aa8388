// `priortune pretrain` end to end on a fixture config and tokenizer: the loss falls, the written directory
// loads with loadModel, and --resume continues from the last save.
import { spawn, spawnSync } from "node:child_process";
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { pretrain, tokenizeFiles, unigramPerplexity } from "../lib/cli-pretrain.js";
import { loadModel } from "../lib/model.js";
import { loadTokenizer } from "../lib/tokenizer.js";
import { fixtures, modelDir } from "./helpers.js";

const tmp = mkdtempSync(join(tmpdir(), "priortune-pretrain-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("pretrain", () => {
  const text = readFileSync(join(fixtures, "data", "prose.txt"), "utf8");
  const train = join(tmp, "train.txt");
  const validation = join(tmp, "validation.txt");
  writeFileSync(train, `${text}\n\n`.repeat(4));
  writeFileSync(validation, text);
  const base = {
    config: modelDir("llama-tiny"),
    tokenizer: modelDir("llama-tiny"),
    train: [train],
    validation: [validation],
    out: join(tmp, "model"),
    steps: 40,
    batchSize: 4,
    seqLen: 32,
    lr: 1e-2,
    minLr: 1e-3,
    warmup: 5,
    weightDecay: 0.1,
    evalEvery: 20,
    evalBatches: 1,
    saveEvery: 20,
    seed: 0,
    threads: 2,
  };

  it("trains from scratch: the loss falls and the directory loads", async () => {
    const result = await pretrain({ ...base }, () => {});
    const losses = result.curve.map((p) => p.loss!);
    const first = losses.slice(0, 5).reduce((a, b) => a + b) / 5;
    const last = losses.slice(-5).reduce((a, b) => a + b) / 5;
    expect(last).toBeLessThan(first - 0.5);
    expect(existsSync(join(base.out, "model.safetensors"))).toBe(true);
    const model = await loadModel(base.out, { backend: "cpu", threads: 1 });
    expect(model.config.vocabSize).toBe(500);
    expect(model.tokenizer).not.toBeNull();
    model.dispose();
  });

  it("--resume continues at the saved step", async () => {
    const lines: string[] = [];
    const result = await pretrain({ ...base, steps: 60, resume: true }, (l) => lines.push(l));
    expect(lines.join("\n")).toMatch(/resuming at step 40/);
    expect(result.curve.at(-1)!.step).toBe(60);
  });

  it("a resumed run ends bit-identical to an uninterrupted one (AdamW state saved); its options are kept", async () => {
    // Warm-up 3: the first three steps have the same learning rates whether the run is 3 or 6 steps long.
    const small = { ...base, steps: 6, warmup: 3, evalEvery: 3, saveEvery: 3, seqLen: 16, batchSize: 2 };
    const whole = join(tmp, "whole");
    const split = join(tmp, "split");
    await pretrain({ ...small, out: whole }, () => {});
    await pretrain({ ...small, out: split, steps: 3 }, () => {});
    const lines: string[] = [];
    // Only --steps given: the warm-up, lr and the rest come from the run (the defaults would change them).
    await pretrain(
      // (the CLI's defaults of the options left out; --eval-every, --save-every and --eval-batches were
      // dropped on resume before: a held-out loss over 8 batches instead of 1, at other steps)
      {
        ...small,
        out: split,
        steps: 6,
        resume: true,
        warmup: 100,
        lr: 3e-3,
        evalEvery: 100,
        saveEvery: 200,
        evalBatches: 8,
      },
      (l) => lines.push(l),
      new Set(["steps", "resume", "out"]),
    );
    // Resumed again with nothing given: the run's own --steps (6, not the default), so nothing is left to do.
    const again = await pretrain(
      { ...small, out: split, steps: 1000, resume: true },
      () => {},
      new Set(["resume"]),
    );
    expect(again.curve.at(-1)!.step).toBe(6);
    expect(lines.join("\n")).toMatch(/resuming at step 3 \(AdamW state restored\)/);
    const weights = (dir: string) => readFileSync(join(dir, "model.safetensors"));
    expect(weights(split).equals(weights(whole))).toBe(true); // the moments restarted before: 5.4518 vs 5.4590
    const curve = (dir: string) => JSON.parse(readFileSync(join(dir, "pretrain-state.json"), "utf8"));
    expect(curve(split).curve.map((p: { loss: number }) => p.loss)).toEqual(
      curve(whole).curve.map((p: { loss: number }) => p.loss),
    );
    expect(curve(split).tokens).toBe(curve(whole).tokens);
    // An option given explicitly that differs from the run's is refused.
    await expect(
      pretrain(
        { ...small, out: split, steps: 9, resume: true, lr: 5e-2 },
        () => {},
        new Set(["lr", "steps"]),
      ),
    ).rejects.toThrow("--resume: lr 0.05 differs from the run's 0.01");
    expect(curve(split).options).toMatchObject({ evalEvery: 3, saveEvery: 3, evalBatches: 1 });
    await expect(
      pretrain(
        { ...small, out: split, steps: 9, resume: true, evalBatches: 4 },
        () => {},
        new Set(["evalBatches"]),
      ),
    ).rejects.toThrow("--resume: evalBatches 4 differs from the run's 1");
    // Other data (or another tokenizer) would continue another run under this one's name.
    await expect(
      pretrain(
        { ...small, out: split, steps: 9, resume: true, train: [validation] },
        () => {},
        new Set(["train"]),
      ),
    ).rejects.toThrow(/--resume: --train .*validation\.txt is not the run's \(.*train\.txt\)/);
  });

  it("a save stopped among its renames is finished by --resume; one stopped before them is dropped", async () => {
    const small = { ...base, steps: 6, warmup: 3, evalEvery: 3, saveEvery: 3, seqLen: 16, batchSize: 2 };
    const whole = join(tmp, "renames-whole");
    await pretrain({ ...small, out: whole }, () => {});
    const weights = (dir: string) => readFileSync(join(dir, "model.safetensors"));
    // The step-6 save, stopped after its first two renames: --out has step 6's optimizer state and weights
    // and step 3's run state; the side directory holds the rest. It was unresumable ("a save stopped half way").
    // The side directory is inside --out (on its file system: --out may be a mount point, its parent
    // read-only); a file beside --out named as the old side directory is not touched.
    const stopped = join(tmp, "renames-stopped");
    writeFileSync(`${stopped}.saving`, "not the run's");
    await pretrain({ ...small, out: stopped, steps: 3 }, () => {});
    const side = join(stopped, ".saving");
    cpSync(whole, side, { recursive: true });
    for (const f of ["optimizer.safetensors", "model.safetensors"])
      renameSync(join(side, f), join(stopped, f));
    const lines: string[] = [];
    const done = await pretrain({ ...small, out: stopped, resume: true }, (l) => lines.push(l));
    expect(lines.join("\n")).toMatch(/completed the save that was interrupted/);
    expect(done.curve.at(-1)!.step).toBe(6);
    expect(existsSync(side)).toBe(false);
    expect(readFileSync(`${stopped}.saving`, "utf8")).toBe("not the run's");
    expect(weights(stopped).equals(weights(whole))).toBe(true);
    // Stopped before the renames (no run state in the side directory; here the side directory of saves
    // before it moved into --out): --out still holds step 3, resumed.
    const early = join(tmp, "renames-early");
    await pretrain({ ...small, out: early, steps: 3 }, () => {});
    mkdirSync(`${early}.saving`);
    writeFileSync(join(`${early}.saving`, "model.safetensors"), "torn");
    await pretrain({ ...small, out: early, resume: true }, () => {});
    expect(existsSync(`${early}.saving`)).toBe(false);
    expect(weights(early).equals(weights(whole))).toBe(true);
  });

  it("a save that fails (file size limit) names the file, keeps the last save whole, and --resume goes on", async () => {
    const small = { ...base, steps: 6, warmup: 3, evalEvery: 3, saveEvery: 3, seqLen: 16, batchSize: 2 };
    const whole = join(tmp, "failed-whole");
    await pretrain({ ...small, out: whole }, () => {});
    const out = join(tmp, "failed-save");
    await pretrain({ ...small, out, steps: 3 }, () => {});
    const state = () => JSON.parse(readFileSync(join(out, "pretrain-state.json"), "utf8")).step;
    // 64 KiB a file: the step-6 save's weights do not fit (a full disk fails the same way).
    const cli = join(import.meta.dirname, "..", "lib", "cli.ts");
    const flags = ["--config", small.config, "--tokenizer", small.tokenizer, "--train", train];
    const failed = spawnSync(
      "bash",
      [
        "-c",
        'ulimit -f 64; exec "$0" --import tsx "$@"',
        process.execPath,
        cli,
        "pretrain",
        ...flags,
        "--validation",
        validation,
        "--out",
        out,
        "--resume",
        "--steps",
        "6",
      ],
      { encoding: "utf8" },
    );
    expect(failed.status).not.toBe(0);
    expect(failed.stderr).toMatch(
      /\.saving\/model\.safetensors.*EFBIG.*the save of step 6 failed;.*rerun with --resume/s,
    );
    expect(state()).toBe(3);
    expect(existsSync(join(out, ".saving"))).toBe(false);
    await pretrain({ ...small, out, resume: true }, () => {});
    expect(state()).toBe(6);
    const weights = (dir: string) => readFileSync(join(dir, "model.safetensors"));
    expect(weights(out).equals(weights(whole))).toBe(true);
  });

  it("Ctrl-C saves the steps done and stops (status 130); --resume goes on from them", async () => {
    const out = join(tmp, "interrupted");
    const cli = join(import.meta.dirname, "..", "lib", "cli.ts");
    const child = spawn(process.execPath, [
      "--import",
      "tsx",
      cli,
      "pretrain",
      ...[
        "--config",
        base.config,
        "--tokenizer",
        base.tokenizer,
        "--train",
        train,
        "--validation",
        validation,
      ],
      ...["--out", out, "--steps", "100000", "--save-every", "100000", "--eval-every", "100000"],
      ...["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--threads", "2"],
    ]);
    let stderr = "";
    let sent = false;
    child.stderr.on("data", (d) => {
      stderr += d;
      // Once training has begun (the line after tokenizing), give it a few steps.
      if (!sent && /unigram perplexity/.test(stderr)) {
        sent = true;
        setTimeout(() => child.kill("SIGINT"), 300);
      }
    });
    const status = await new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
    expect(status, stderr).toBe(130);
    const m = /saving step (\d+) before stopping/.exec(stderr);
    expect(m, stderr).not.toBeNull();
    const stopped = Number(m![1]);
    expect(stderr).toContain(`pretrain: stopped at step ${stopped}; ${out} holds it: rerun with --resume`);
    expect(JSON.parse(readFileSync(join(out, "pretrain-state.json"), "utf8")).step).toBe(stopped);
    const lines: string[] = [];
    const more = await pretrain(
      { ...base, out, resume: true, steps: stopped + 2, seqLen: 16, batchSize: 2 },
      (l) => lines.push(l),
      new Set(["steps"]),
    );
    expect(more.curve.at(-1)!.step).toBe(stopped + 2);
  });

  it("a finished run in --out is not replaced without --force; a directory in use is refused", async () => {
    const small = { ...base, steps: 2, warmup: 1, evalEvery: 2, saveEvery: 2, seqLen: 16, batchSize: 2 };
    const out = join(tmp, "guarded");
    await pretrain({ ...small, out }, () => {});
    const before = readFileSync(join(out, "model.safetensors"));
    // Forgetting --resume replaced the saved run at its first save.
    await expect(pretrain({ ...small, out, seed: 5 }, () => {})).rejects.toThrow(
      /holds a pretraining run \(pretrain-state\.json\): --resume continues it, --force replaces it/,
    );
    expect(readFileSync(join(out, "model.safetensors")).equals(before)).toBe(true);
    await pretrain({ ...small, out, seed: 5, force: true }, () => {});
    expect(readFileSync(join(out, "model.safetensors")).equals(before)).toBe(false);
    // A live process's lock refuses a second run before it touches anything (a half-made save included);
    // a dead process's is taken over.
    const other = spawn("sleep", ["60"]);
    try {
      writeFileSync(join(out, ".lock"), `${other.pid} ${hostname()}`);
      mkdirSync(join(out, ".saving"));
      await expect(pretrain({ ...small, out, seed: 5, resume: true }, () => {})).rejects.toThrow(
        `${out}: the pretraining run is in use by process ${other.pid}`,
      );
      expect(existsSync(join(out, ".saving"))).toBe(true); // deleted by the refused run before
      rmSync(join(out, ".saving"), { recursive: true });
    } finally {
      other.kill();
    }
    writeFileSync(join(out, ".lock"), "999999999");
    await pretrain({ ...small, out, seed: 5, resume: true, steps: 3 }, () => {});
    expect(existsSync(join(out, ".lock"))).toBe(false);
  });

  it("--config takes a config.json file as well as a directory; bad options fail before any work", async () => {
    const cfg = join(tmp, "cfg.json");
    writeFileSync(cfg, readFileSync(join(modelDir("llama-tiny"), "config.json")));
    const out = join(tmp, "from-file");
    await pretrain({ ...base, config: cfg, out, steps: 2, evalEvery: 2, saveEvery: 2 }, () => {});
    const model = await loadModel(out, { backend: "cpu", threads: 1 });
    expect(model.tokenizer).not.toBeNull(); // copied from --tokenizer
    model.dispose();
    await expect(pretrain({ ...base, out: join(tmp, "bad"), minLr: -1e-3 }, () => {})).rejects.toThrow(
      "--min-lr: expected a number >= 0, got -0.001",
    );
    expect(existsSync(join(tmp, "bad"))).toBe(false);
  });

  it("a tokenizer of its own: its files alone, its end-of-text ids, model_max_length within the positions", async () => {
    // --config a model directory whose tokenizer is another (bos 1 / eos 2, a special_tokens_map.json and
    // generation_config.json of its own): the output held a mix of both tokenizers' files and those ids.
    const config = join(tmp, "other-config");
    cpSync(modelDir("llama-tiny"), config, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(config, "config.json"), "utf8"));
    writeFileSync(join(config, "config.json"), JSON.stringify({ ...cfg, bos_token_id: 1, eos_token_id: 2 }));
    writeFileSync(join(config, "special_tokens_map.json"), JSON.stringify({ eos_token: "</s>" }));
    const tokDir = join(tmp, "own-tokenizer");
    mkdirSync(tokDir);
    cpSync(join(modelDir("llama-tiny"), "tokenizer.json"), join(tokDir, "tokenizer.json"));
    const tokConfig = JSON.parse(readFileSync(join(modelDir("llama-tiny"), "tokenizer_config.json"), "utf8"));
    writeFileSync(
      join(tokDir, "tokenizer_config.json"),
      JSON.stringify({ ...tokConfig, model_max_length: 256 }),
    );
    const out = join(tmp, "own-tokenizer-model");
    const ids = () => {
      const c = JSON.parse(readFileSync(join(out, "config.json"), "utf8"));
      return [c.bos_token_id, c.eos_token_id];
    };
    // First with the --config directory's own tokenizer: its files and ids, kept on resume (the model is
    // then read from --out: the resumed save took its bos for the end of text).
    const short = { ...base, config, out, steps: 2, evalEvery: 2, saveEvery: 2 };
    await pretrain({ ...short, tokenizer: config }, () => {});
    expect(ids()).toEqual([1, 2]);
    await pretrain(
      { ...short, tokenizer: config, steps: 3, resume: true },
      () => {},
      new Set(["steps", "resume"]),
    );
    expect(ids()).toEqual([1, 2]);
    expect(existsSync(join(out, "generation_config.json"))).toBe(true);
    const end = loadTokenizer(tokDir).tokenToId("<|endoftext|>");
    expect(JSON.parse(readFileSync(join(out, "pretrain-state.json"), "utf8")).separator).toBe(end);
    // Then --force with a tokenizer of its own: no file of the first survives in --out.
    await pretrain({ ...short, tokenizer: tokDir, force: true }, () => {});
    expect(existsSync(join(out, "special_tokens_map.json"))).toBe(false);
    expect(existsSync(join(out, "generation_config.json"))).toBe(false);
    expect(ids()).toEqual([end, end]);
    expect(JSON.parse(readFileSync(join(out, "tokenizer_config.json"), "utf8")).model_max_length).toBe(64);
    expect(readFileSync(join(out, "tokenizer.json"), "utf8")).toBe(
      readFileSync(join(tokDir, "tokenizer.json"), "utf8"),
    );
  });

  it("the unigram baseline is the add-one smoothed perplexity", () => {
    const tok = loadTokenizer(modelDir("llama-tiny"));
    const ids = tokenizeFiles(tok, [validation], undefined);
    expect(ids.length).toBeGreaterThan(10);
    // A uniform stream over 4 symbols, counted on itself, has perplexity close to 4 (smoothing adds a little).
    const uniform = Int32Array.from({ length: 4000 }, (_, i) => i % 4);
    expect(unigramPerplexity(uniform, uniform, 4)).toBeCloseTo(4, 1);
  });
});
