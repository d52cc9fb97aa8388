// The package as a dependency sees it: what importing it loads, and what its exports resolve.
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

describe("priortune as a dependency", () => {
  it("importing it loads no plotting stack until a figure is drawn", () => {
    // resvg is a native module: once loaded it is among the process's shared objects.
    const script = `
      const m = await import(${JSON.stringify(join(root, "lib", "index.ts"))});
      const resvg = () => process.report.getReport().sharedObjects.filter((s) => /resvg/.test(s)).length;
      const before = resvg();
      m.svgToPng(await m.renderSvg({ data: { values: [{ x: 1 }] }, mark: "point", encoding: { x: { field: "x", type: "quantitative" } } }));
      console.log(JSON.stringify({ before, after: resvg() }));`;
    const r = spawnSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      cwd: root,
      encoding: "utf8",
    });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ before: 0, after: 1 });
  });

  it("exports its package.json (the shipped model's directory is found from it)", () => {
    const path = createRequire(import.meta.url).resolve("priortune/package.json");
    expect(path).toBe(join(root, "package.json"));
  });
});
