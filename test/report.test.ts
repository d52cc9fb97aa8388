// The report end to end: two tiny runs trained with tune() on the Llama fixture, the report built from their
// run directories, and the page opened in a real headless browser (Debian's chromium through playwright-core):
// no console errors, every plot rendered as a non-empty SVG, a screenshot saved.
import { existsSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadModel, type Model } from "../lib/model.js";
import { createPrior } from "../lib/priors.js";
import { buildReport, type ReportResult } from "../lib/report.js";
import { loadTask } from "../lib/tasks.js";
import { tune } from "../lib/train.js";
import { modelDir } from "./helpers.js";

const CHROMIUM = "/usr/bin/chromium";
const hasChromium = existsSync(CHROMIUM);

describe("priortune report", () => {
  const dir = mkdtempSync(join(tmpdir(), "priortune-report-"));
  let model: Model;
  let result: ReportResult;

  beforeAll(async () => {
    model = await loadModel(modelDir("llama-tiny"), { threads: 2 });
    const task = await loadTask({ kind: "arithmetic", trainCount: 16, validationCount: 4 });
    const runs: string[] = [];
    for (const [name, sigma] of [
      ["near", 0.5],
      ["far", 2],
    ] as const) {
      const prior = await createPrior({ kind: "gaussian", sigma }, { model });
      const runDir = join(dir, name);
      await tune({
        model,
        task,
        prior,
        promptLength: 4,
        steps: 6,
        batchSize: 4,
        evalEvery: 3,
        snapshotEvery: 2,
        maxNewTokens: 4,
        runDir,
        seed: 1,
      });
      runs.push(runDir);
    }
    result = await buildReport(runs, {
      outDir: join(dir, "report"),
      title: "Two priors on arithmetic",
      model,
      activations: {
        texts: 12,
        extraSets: [
          {
            name: "prose",
            texts: Array.from({ length: 12 }, (_, i) => `The river ran past house ${i} at dawn.`),
          },
        ],
      },
      threads: 2,
    });
  }, 300_000);

  afterAll(() => model?.dispose());

  it("writes the page, the numbers and every figure as SVG and PNG", () => {
    const { data } = result;
    expect(data.runs.map((r) => r.name)).toEqual(["near", "far"]);
    for (const r of data.runs) {
      expect(r.steps).toBe(6);
      expect(Number.isFinite(r.finalValidationLoss)).toBe(true);
      expect(r.accuracy).not.toBeNull();
      expect(r.collapseRate).not.toBeNull();
      expect(r.promptDisplacement).toBeGreaterThan(0);
    }
    // The level defaults to the highest final validation loss, which every run reaches.
    expect(data.runs.every((r) => r.convergenceStep !== null)).toBe(true);
    expect(data.figures.map((f) => f.name)).toEqual([
      "loss-curves",
      "convergence",
      "embedding-space",
      "prompt-trajectories",
      "activation-clusters",
      "activation-density",
    ]);
    // Two sets (arithmetic and prose) at every hidden-state index of the 3-layer model.
    expect(data.clusterDistances.map((c) => c.layer)).toEqual([0, 1, 2, 3]);
    for (const c of data.clusterDistances) {
      expect(c.frechet).toBeGreaterThan(0);
      expect(c.symmetricKl).toBeGreaterThan(0);
      expect(c.probeAccuracy).toBeGreaterThanOrEqual(0.5);
    }
    expect(data.trajectories).toHaveLength(8);
    for (const f of result.figures) {
      expect(statSync(f).size).toBeGreaterThan(1000);
      if (f.endsWith(".svg"))
        expect(readFileSync(f, "utf8")).toMatch(/^<svg[^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
      else expect(readFileSync(f).subarray(1, 4).toString()).toBe("PNG");
    }
    const html = readFileSync(result.html, "utf8");
    expect(html).toContain("Two priors on arithmetic");
    // Self-contained: the libraries are inline; no script or stylesheet is fetched.
    expect(html).not.toMatch(/<script[^>]+src=/);
    expect(html).not.toMatch(/<link[^>]+href=/);
  });

  it.skipIf(!hasChromium)(
    hasChromium
      ? "renders in headless chromium without console errors, every plot drawn"
      : "renders in headless chromium (skipped: /usr/bin/chromium is missing; apt-get install -y chromium)",
    async () => {
      const { chromium } = await import("playwright-core");
      const browser = await chromium.launch({
        executablePath: CHROMIUM,
        args: [
          "--headless",
          "--no-sandbox",
          "--disable-gpu",
          "--disable-background-networking",
          "--disable-component-update",
          "--disable-sync",
          "--no-first-run",
        ],
      });
      try {
        const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
        const errors: string[] = [];
        const requests: string[] = [];
        page.on("console", (m) => {
          if (m.type() === "error") errors.push(m.text());
        });
        page.on("pageerror", (e) => errors.push(String(e)));
        page.on("request", (r) => {
          if (!r.url().startsWith("file:")) requests.push(r.url());
        });
        await page.goto(`file://${result.html}`, { waitUntil: "load" });
        await page.waitForFunction(() => document.body.dataset.plots !== undefined, null, {
          timeout: 60_000,
        });
        expect(await page.evaluate(() => document.body.dataset.plots)).toBe("ready");
        const plots = await page.$$eval(".plot", (divs) =>
          divs.map((d) => {
            const svg = d.querySelector("svg");
            const box = svg?.getBoundingClientRect();
            return {
              width: box?.width ?? 0,
              height: box?.height ?? 0,
              marks: svg ? svg.querySelectorAll("path, line, rect, circle, text").length : 0,
            };
          }),
        );
        expect(plots).toHaveLength(result.data.figures.length);
        for (const p of plots) {
          expect(p.width).toBeGreaterThan(100);
          expect(p.height).toBeGreaterThan(50);
          expect(p.marks).toBeGreaterThan(10);
        }
        const shot = join(dir, "report.png");
        await page.screenshot({ path: shot, fullPage: true });
        expect(statSync(shot).size).toBeGreaterThan(10_000);
        expect(errors).toEqual([]);
        expect(requests).toEqual([]);
      } finally {
        await browser.close();
      }
    },
  );
});

describe("priortune report: unusual sets of runs", () => {
  const dir = mkdtempSync(join(tmpdir(), "priortune-report-odd-"));
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(modelDir("llama-tiny"), { threads: 2 });
  });
  afterAll(() => model?.dispose());

  it("an unfinished run's prompt is its newest checkpoint; priors told apart by any option; a prefix-only first run; extra sets renamed", async () => {
    const task = await loadTask({ kind: "arithmetic", trainCount: 8, validationCount: 2 });
    const base = { model, task, promptLength: 4, batchSize: 4, maxNewTokens: 2, seed: 1 } as const;
    // A prefix-only run first (no soft prompt): the prompt width came from it (Infinity) without a model.
    const prefix = join(dir, "prefix");
    await tune({
      ...base,
      prior: await createPrior({ kind: "gaussian", sigma: 0.5 }, { model }),
      mode: "deep-prefix",
      promptLength: 0,
      deepLayers: [1],
      deepLength: 2,
      steps: 2,
      runDir: prefix,
    });
    const finished = join(dir, "wide");
    await tune({
      ...base,
      prior: await createPrior({ kind: "uniform", range: 2 }, { model }),
      steps: 4,
      runDir: finished,
    });
    // Stopped after step 3: its snapshots are step 0 only, its checkpoint step 3 (an abort checkpoints).
    const killed = join(dir, "narrow");
    const stop = new AbortController();
    await expect(
      tune({
        ...base,
        prior: await createPrior({ kind: "uniform", range: 0.5 }, { model }),
        steps: 8,
        snapshotEvery: 100,
        checkpointEvery: 2,
        runDir: killed,
        signal: stop.signal,
        onStep: (r) => {
          if (r.step === 3) stop.abort();
        },
      }),
    ).rejects.toThrow("aborted");
    const { data } = await buildReport([prefix, killed, finished], {
      outDir: join(dir, "no-model"),
      model: null,
      threads: 2,
    });
    const byName = Object.fromEntries(data.runs.map((r) => [r.name, r]));
    // The initial prompt was taken as trained before (displacement 0).
    expect(byName.narrow!.promptDisplacement).toBeGreaterThan(0);
    expect(data.notes.join("\n")).toMatch(
      /narrow has no prompt\.safetensors \(unfinished\): its prompt is the step-3 checkpoint/,
    );
    expect(byName.narrow!.prior).toBe("uniform (range=0.5)");
    expect(byName.wide!.prior).toBe("uniform (range=2)"); // both read "uniform" before
    // A task name given to an extra set is told apart (it merged with the task's set before).
    const extra = await buildReport([finished], {
      outDir: join(dir, "extra"),
      model,
      activations: {
        texts: 4,
        layers: [1],
        extraSets: [{ name: "arithmetic", texts: ["one two three", "four five", "six", "seven eight"] }],
      },
      threads: 2,
    });
    expect(extra.data.clusterDistances.map((c) => [c.a, c.b])).toEqual([["arithmetic", "arithmetic'"]]);
    // Another model: noted when the prompts fit it, refused (naming the run) when they do not.
    const other = await buildReport([finished], {
      outDir: join(dir, "other"),
      model: modelDir("llama-tiny-untied"),
      activations: false,
      threads: 2,
    });
    expect(other.data.notes.join("\n")).toMatch(/wide was trained on another model \(.*llama-tiny\)/);
    const small = join(import.meta.dirname, "..", "models", "priortune-small");
    await expect(
      buildReport([finished], { outDir: join(dir, "small"), model: small, activations: false, threads: 2 }),
    ).rejects.toThrow(
      /wide: its prompt is 96 wide, the model's hidden size 256: it was trained on another model/,
    );
  }, 300_000);
});
