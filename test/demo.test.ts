// The demo pipeline in a shortened form on the shipped model (models/priortune-small): every prior's run
// lowers the validation loss (same examples before and after: the comparison is free of batch noise),
// writes its run directory, and reports collapse metrics.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { demo, demoTables } from "../lib/demo.js";
import { packageRoot } from "../lib/native.js";

const shipped = join(packageRoot(), "models", "priortune-small", "model.safetensors");
const tmp = mkdtempSync(join(tmpdir(), "priortune-demo-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("demo (shortened) on the shipped model", () => {
  it("every prior lowers the validation loss on both tasks and reports where its prompt ended up", async () => {
    expect(existsSync(shipped), "the shipped model is part of the repository").toBe(true);
    const rows = await demo({
      steps: 16,
      trainCount: 128,
      validationCount: 16,
      outDir: tmp,
      threads: 2,
      log: () => {},
    });
    expect(rows.map((r) => `${r.task}/${r.prior}`)).toEqual([
      "arithmetic/gaussian",
      "arithmetic/fitted-gaussian",
      "arithmetic/exclusion",
      "qa/gaussian",
      "qa/fitted-gaussian",
      "qa/exclusion",
    ]);
    for (const r of rows) {
      expect(r.validationLoss, `${r.task}/${r.prior}`).toBeLessThan(r.initialValidationLoss);
      expect(existsSync(join(r.runDir, "prompt.safetensors"))).toBe(true);
      expect(r.collapseRate).toBeGreaterThanOrEqual(0);
      expect(r.nearestTokens).toHaveLength(20);
      expect(Number.isFinite(r.validationLoss)).toBe(true);
    }
    expect(existsSync(join(tmp, "report", "report.html"))).toBe(true);
    const text = demoTables(rows);
    expect(text).toContain("prior: exclusion");
    expect(text).toContain("nearest tokens");
    // Run again into the same directory: every run resumes finished (no step or eval callbacks fire), and
    // the table is the same, read from the run directories (it used to be all NaN).
    const again = await demo({
      steps: 16,
      trainCount: 128,
      validationCount: 16,
      outDir: tmp,
      threads: 2,
      report: false,
      log: () => {},
    });
    const numbers = (rs: typeof rows) =>
      rs.map((r) => [r.firstLoss, r.lastLoss, r.validationLoss, r.score, r.collapseRate]);
    expect(numbers(again)).toEqual(numbers(rows));
  });
});
