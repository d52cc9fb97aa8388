// docs/paper-reproduction.md matches its data: every number in the document's tables is one of the numbers in
// docs/paper-reproduction.json (both written by scripts/reproduce-paper.ts). Regenerating them is
// `npm run reproduce` (minutes), too slow for the suite; this checks that the committed pair agrees.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { packageRoot } from "../lib/native.js";

const docs = join(packageRoot(), "docs");
const md = readFileSync(join(docs, "paper-reproduction.md"), "utf8");
const data = JSON.parse(readFileSync(join(docs, "paper-reproduction.json"), "utf8")) as Record<
  string,
  unknown
>;

function numbersOf(value: unknown, out: Set<number>): Set<number> {
  if (typeof value === "number") out.add(value);
  else if (Array.isArray(value)) for (const v of value) numbersOf(v, out);
  else if (value && typeof value === "object") for (const v of Object.values(value)) numbersOf(v, out);
  return out;
}

/** Body cells of every Markdown table (the header row and the separator row skipped). */
function tableCells(text: string): string[] {
  const cells: string[] = [];
  let inTable = false;
  let row = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith("|")) {
      inTable = false;
      continue;
    }
    row = inTable ? row + 1 : 0;
    inTable = true;
    if (row < 2) continue;
    cells.push(
      ...line
        .split("|")
        .slice(1, -1)
        .map((c) => c.trim()),
    );
  }
  return cells;
}

describe("docs/paper-reproduction.md", () => {
  it("shows in its tables only numbers that docs/paper-reproduction.json holds", () => {
    const known = numbersOf(data, new Set());
    const cells = tableCells(md);
    const shown = cells.flatMap((c) => c.match(/-?\d+(?:\.\d+)?(?:e[-+]?\d+)?/gi) ?? []).map(Number);
    expect(shown.length).toBeGreaterThan(50);
    const missing = shown.filter((n) => !known.has(n));
    expect(missing).toEqual([]);
  });

  it("states each finding's verdict as the data has it, and the command that regenerates it", () => {
    for (const f of ["finding1", "finding2", "finding3", "finding4", "finding5"]) {
      const verdict = (data[f] as { verdict: string }).verdict;
      const section = md.slice(md.indexOf(`## Finding ${f.slice(-1)}:`));
      expect(section.slice(0, section.indexOf("**Verdict:") + 100)).toContain(`**Verdict: ${verdict}.**`);
    }
    expect(md).toContain(`\`${data.command as string}\``);
    expect(md).toContain("--model <dir>");
  });
});
