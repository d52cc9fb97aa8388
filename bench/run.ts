// Runs every bench/*.bench.ts in its own process (a fresh heap and thread pool per benchmark), or the
// ones named on the command line: `npm run bench -- forward knn`.
import { execFileSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { benchDir } from "./common.js";

const wanted = process.argv.slice(2);
const files = readdirSync(benchDir)
  .filter((f) => f.endsWith(".bench.ts"))
  .filter((f) => wanted.length === 0 || wanted.some((w) => f.startsWith(w)))
  .sort();
for (const f of files) {
  console.log(`\n== ${f}`);
  execFileSync(process.execPath, ["--import", "tsx", join(benchDir, f)], { stdio: "inherit" });
}
