// The GPU check's same-call ratio table (scripts/gpu-check.sh's last step: `gpu-check.mjs ratios --logs DIR
// --results FILE`, bundled with scripts/gpu-check.ts): priortune's rows against the PyTorch peers' rows of the
// same device call, read from the JSON lines of the groups' logs. Steps: for each model and B x S, the
// default setup's ms (the steps table's first setup) and the best setup's, against PyTorch's fastest row at
// the same B and T = S (GPT-2: pt_step_manual with any attention and dtype, peft_prompt, pt_step_compiled;
// Llama: llama1b_pt_step); kNN: our device ms for each workload and metric (the default path and the fastest
// exact one) against each peer precision at the same Q, V and d. Pure functions (the parsing and the table)
// plus the one that reads the logs, so that test/gpu-ratios.test.ts covers them without a GPU. A missing log
// or row is a note or a row that says so, never an error: the step must not fail the run.
import { appendFileSync, existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

/** One JSON line of a log. */
export type JsonRow = Record<string, unknown>;

/** The JSON objects among a log's lines (console text, tables and lines that do not parse are skipped). */
export function jsonLines(text: string): JsonRow[] {
  const rows: JsonRow[] = [];
  for (const line of text.split("\n")) {
    const t = line.trim();
    if (!t.startsWith("{")) continue;
    try {
      const v: unknown = JSON.parse(t);
      if (v && typeof v === "object" && !Array.isArray(v)) rows.push(v as JsonRow);
    } catch {
      // a line cut short by a time limit, or text that only starts with a brace
    }
  }
  return rows;
}

// A finite number, or undefined (JSON writes NaN and Infinity as null; rows with an error carry no ms).
function num(v: unknown): number | undefined {
  return typeof v === "number" && Number.isFinite(v) ? v : undefined;
}

const str = (v: unknown) => (typeof v === "string" ? v : v === undefined || v === null ? "" : String(v));

// The name of a step row's setup: its own label (gpu-check.ts writes one), else rebuilt from its fields.
function setupLabel(r: JsonRow): string {
  if (typeof r.setup === "string") return r.setup;
  const kernel = str(r.gemmKernel);
  const attn = str(r.attention);
  return (
    `${str(r.precision)}${r.graphs === false ? " eager" : ""}${kernel && kernel !== "auto" ? ` (${kernel} GEMM)` : ""}` +
    `${r.peel ? " (peeled tails)" : ""}${r.splitk ? " (split-K)" : ""}${attn && attn !== "mma" ? ` (${attn} attention)` : ""}` +
    `${r.geluPass ? " (GELU as a separate pass)" : ""}`
  );
}

// Whether a step row's first loss and gradient norm matched the default setup's (gpu-check.ts's tolerances),
// so that it may stand as the best setup.
function stepOk(r: JsonRow): boolean {
  if (typeof r.lossOk === "boolean") return r.lossOk;
  const l = num(r.firstLossRelToDefault);
  const g = num(r.firstGradNormRelToDefault);
  return l !== undefined && g !== undefined && l <= 1e-2 && g <= 5e-2;
}

// A kNN row's Q, V and d: its own fields, else the workload's name ("160 x 50257 x 768 ...").
function knnShape(r: JsonRow): [number, number, number] | undefined {
  const Q = num(r.Q);
  const V = num(r.V);
  const d = num(r.d);
  if (Q !== undefined && V !== undefined && d !== undefined) return [Q, V, d];
  const m = /^(\d+) x (\d+) x (\d+)/.exec(str(r.workload));
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : undefined;
}

const ms = (v: number | undefined, digits: number) => (v === undefined ? "-" : v.toFixed(digits));
// PyTorch ms over ours: above 1, priortune is faster.
const ratio = (peer: number | undefined, ours: number | undefined) =>
  peer === undefined || ours === undefined || ours <= 0 ? "-" : `${(peer / ours).toFixed(2)}x`;

// The fastest of the rows that pass `keep`, by `key`.
function fastest(rows: JsonRow[], key: string, keep: (r: JsonRow) => boolean = () => true) {
  let best: JsonRow | undefined;
  for (const r of rows) {
    const v = num(r[key]);
    if (v === undefined || !keep(r)) continue;
    if (!best || v < num(best[key])!) best = r;
  }
  return best;
}

/**
 * The same-call ratio table (Markdown) from our rows (the priortune groups' JSON lines) and the peers' (the
 * PyTorch peers' JSON lines); `notes` go under it (which logs were found, which were not).
 */
export function ratiosTable(ours: JsonRow[], peers: JsonRow[], notes: string[] = []): string {
  const lines: string[] = [];
  // ---- steps: one row per model and B x S, in the order of the log ----
  const steps = ours.filter((r) => r.what === "step" && num(r.ms) !== undefined);
  const stepKeys = [...new Set(steps.map((r) => `${str(r.model)}\u0000${r.B}\u0000${r.S}`))];
  for (const key of stepKeys) {
    const rows = steps.filter((r) => `${str(r.model)}\u0000${r.B}\u0000${r.S}` === key);
    const first = rows[0]!;
    const B = num(first.B);
    const S = num(first.S);
    const model = str(first.model);
    // The default setup is the table's first (setupIndex 0); in a log without indices, the first row.
    const def =
      rows.find((r) => r.setupIndex === 0) ?? (rows.some((r) => "setupIndex" in r) ? undefined : first);
    const best = fastest(rows, "ms", stepOk);
    const llama = /llama/i.test(model);
    const candidates = peers.filter((p) =>
      llama
        ? p.what === "llama1b_pt_step" && p.B === B && p.T === S
        : (p.what === "pt_step_manual" || p.what === "peft_prompt" || p.what === "pt_step_compiled") &&
          p.B === B &&
          p.T === S,
    );
    const peer = fastest(candidates, "ms");
    const peerLabel = peer
      ? [str(peer.what), str(peer.attn), str(peer.dtype ?? peer.mode)].filter((s) => s).join(" ")
      : "";
    const defMs = def ? num(def.ms) : undefined;
    const bestMs = best ? num(best.ms) : undefined;
    const peerMs = peer ? num(peer.ms) : undefined;
    const goal = num(first.goalMs);
    // Memory beside the peer's peak (max_memory_allocated() / 1e9): ours in GB (1e9 B) too, weights + workspace.
    const ourGB = def
      ? (num(def.deviceGB) ?? (num(def.deviceMiB) ?? Number.NaN) * 2 ** 20 * 1e-9)
      : Number.NaN;
    const peerGB = peer ? num(peer.mem_GB) : undefined;
    const mem =
      Number.isFinite(ourGB) || peerGB !== undefined
        ? `${Number.isFinite(ourGB) ? ourGB.toFixed(2) : "-"} / ${peerGB === undefined ? "-" : peerGB.toFixed(2)}`
        : "";
    lines.push(
      `| step, ${model}, B=${B} x S=${S} | ${def ? ms(defMs, 2) : "no default row"} | ${best ? `${ms(bestMs, 2)} (${setupLabel(best)})` : "no row passing the first-loss check"} | ` +
        `${peer ? `${ms(peerMs, 2)} (${peerLabel})` : `no PyTorch row at B=${B}, T=${S} in this call`} | ${ratio(peerMs, defMs)} | ${ratio(peerMs, bestMs)} | ` +
        `${goal === undefined ? "" : goal} | ${mem} |`,
    );
  }
  if (stepKeys.length === 0) lines.push("| steps | no step rows in this call | | | | | | |");

  // ---- kNN: one row per workload, metric and peer precision ----
  const knn = ours.filter((r) => r.what === "knn" && num(r.cudaDeviceMs) !== undefined);
  const knnKeys = [...new Set(knn.map((r) => `${str(r.workload)}\u0000${str(r.metric)}`))];
  const order = ["fp32", "tf32", "bf16"];
  for (const key of knnKeys) {
    const rows = knn.filter((r) => `${str(r.workload)}\u0000${str(r.metric)}` === key);
    const first = rows[0]!;
    const shape = knnShape(first);
    const metric = str(first.metric);
    const def = rows.find((r) => r.path === "auto");
    // The fastest path whose results are the CPU index's (gpu-check.ts's check).
    const best = fastest(
      rows,
      "cudaDeviceMs",
      (r) => r.identicalIndices === true && (num(r.maxRelScoreError) ?? 1) < 1e-5,
    );
    const defMs = def ? num(def.cudaDeviceMs) : undefined;
    const bestMs = best ? num(best.cudaDeviceMs) : undefined;
    const goal = num(first.goalMs);
    const peerMetric = metric === "cosine" ? "cos" : metric;
    const found = new Map<string, JsonRow>();
    for (const p of peers) {
      const m = /^knn_(cos|l2)_(\w+)$/.exec(str(p.what));
      if (!m || m[1] !== peerMetric || !shape) continue;
      if (p.Q !== shape[0] || p.V !== shape[1] || p.d !== shape[2] || num(p.ms) === undefined) continue;
      const prev = found.get(m[2]!);
      if (!prev || num(p.ms)! < num(prev.ms)!) found.set(m[2]!, p);
    }
    const precisions = [...found.keys()].sort(
      (a, b) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99),
    );
    const head =
      `| kNN top-10, ${shape ? shape.join(" x ") : str(first.workload)}, ${metric} (device ms) | ` +
      `${def ? ms(defMs, 3) : "no auto-path row"} | ${best ? `${ms(bestMs, 3)} (${str(best.path)})` : "no exact row"} | `;
    if (precisions.length === 0)
      lines.push(`${head}no PyTorch row at this Q, V, d in this call | - | - | ${goal ?? ""} | |`);
    for (const prec of precisions) {
      const p = found.get(prec)!;
      const peerMs = num(p.ms);
      lines.push(
        `${head}${ms(peerMs, 3)} (${str(p.what)}${prec === "fp32" ? "" : ", not exact"}) | ${ratio(peerMs, defMs)} | ${ratio(peerMs, bestMs)} | ${goal ?? ""} | |`,
      );
    }
  }
  if (knnKeys.length === 0) lines.push("| kNN | no kNN rows in this call | | | | | | |");

  return (
    "Same-call ratios: priortune against PyTorch in this device call (ratio = PyTorch ms / priortune ms: " +
    "above 1, priortune is faster). Steps: median wall-clock ms per step; priortune's default setup (the " +
    "steps table's first) and its fastest setup whose first loss and gradient norm match the default's; " +
    "PyTorch's fastest row at the same B and T = S (GPT-2: pt_step_manual, any attention and dtype, " +
    "peft_prompt, pt_step_compiled; Llama: llama1b_pt_step). kNN: device ms by CUDA events (our query " +
    "preparation to the finalize kernel's end; the peer's normalise + matmul + topk), the default path (auto) " +
    "and the fastest path with the CPU index's results, against each peer precision at the same Q, V, d. " +
    "Goals: the issue's.\n" +
    "| workload | priortune default ms | priortune best ms (setup / path) | PyTorch ms (row) | PyTorch / default | PyTorch / best | goal ms (issue) | memory GB (1e9 B): ours default (weights + workspace) / PyTorch peak |\n" +
    "|---|---|---|---|---|---|---|---|\n" +
    lines.join("\n") +
    (notes.length ? `\n\n${notes.map((n) => `- ${n}`).join("\n")}` : "")
  );
}

/** The peers' logs, as gpu-check.sh's part() names them ($logs/NAME.log, NAME the script's name). */
export const PEER_LOGS = ["gpu_peer_llama.log", "gpu_peer.log"];

/**
 * Reads the groups' logs in `dir` (ours: priortune-*.log; the peers': PEER_LOGS) and returns the table with
 * notes on what was found.
 */
export function ratiosFromLogs(dir: string): string {
  const notes: string[] = [];
  const files = existsSync(dir) ? readdirSync(dir).sort() : [];
  if (!existsSync(dir)) notes.push(`no log folder ${dir}`);
  const ours: JsonRow[] = [];
  const ourLogs = files.filter((f) => f.startsWith("priortune-") && f.endsWith(".log"));
  for (const f of ourLogs) ours.push(...jsonLines(readFileSync(join(dir, f), "utf8")));
  notes.push(
    ourLogs.length
      ? `priortune logs: ${ourLogs.join(", ")}`
      : "no priortune log in this call (no group ran: see summary.txt)",
  );
  const peers: JsonRow[] = [];
  for (const f of PEER_LOGS) {
    if (!files.includes(f)) {
      notes.push(
        `${f}: not found (that peer did not run: PEERS=0, no script carried, or the budget was spent)`,
      );
      continue;
    }
    const rows = jsonLines(readFileSync(join(dir, f), "utf8"));
    peers.push(...rows);
    const errors = rows.filter((r) => r.error !== undefined).length;
    notes.push(
      `${f}: ${rows.length} JSON rows${errors ? `, ${errors} with an error` : ""}` +
        `${rows.some((r) => r.done === true) ? "" : " (did not finish: stopped by its time limit or an error)"}`,
    );
  }
  return ratiosTable(ours, peers, notes);
}

/**
 * The ratios mode: prints the table and appends it to `results` (when given). Never throws: a failure is a
 * note in its place.
 */
export function writeRatios(dir: string, results?: string): void {
  let table: string;
  try {
    table = ratiosFromLogs(dir);
  } catch (e) {
    table = `Same-call ratios: not built (${String(e).slice(0, 300)})`;
  }
  console.log(table);
  if (results) {
    try {
      appendFileSync(results, `${table}\n\n`);
    } catch (e) {
      console.log(`ratios: could not append to ${results}: ${String(e)}`);
    }
  }
}
