// Publication figures for the paper's analyses, as Vega-Lite specifications rendered headlessly in Node:
// Vega-Lite compiles to Vega, Vega's headless view writes SVG, and @resvg/resvg-js rasterises the SVG to
// PNG. The same specifications are embedded, interactive, in the HTML report (lib/report.ts).
//
// Data go inline (`data.values`) so that a specification is self-contained; large point sets should be
// subsampled first (limitRows), since every point becomes an SVG element.
import { createRequire } from "node:module";
import { join } from "node:path";
import type * as vega from "vega";
import type { TopLevelSpec } from "vega-lite";
import { atomicWrite, ensureDir } from "./files.js";
import { Rng } from "./rng.js";

export type PlotSpec = TopLevelSpec;

/** Style shared by every figure: white background, readable sizes, colour-blind-safe categories. */
export const FIGURE_CONFIG = {
  background: "white",
  font: "DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif",
  padding: 8,
  view: { stroke: "#888" },
  axis: { labelFontSize: 11, titleFontSize: 12, grid: true, gridColor: "#e6e6e6" },
  legend: { labelFontSize: 11, titleFontSize: 12 },
  title: { fontSize: 14, anchor: "start" as const },
  range: { category: { scheme: "tableau10" } },
} as const;

/** At most `max` of the items, chosen uniformly with a seeded generator, in their original order. */
export function limitRows<T>(items: readonly T[], max: number, seed = 0): T[] {
  if (!Number.isInteger(max) || max < 0) throw new RangeError(`max: expected an integer >= 0, got ${max}`);
  if (items.length <= max) return [...items];
  const rng = new Rng(seed);
  const idx = rng.shuffle(Array.from({ length: items.length }, (_, i) => i)).slice(0, max);
  idx.sort((a, b) => a - b);
  return idx.map((i) => items[i]);
}

function base(title: string | undefined, width: number, height: number) {
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    ...(title ? { title } : {}),
    width,
    height,
    config: FIGURE_CONFIG,
  };
}

export interface ProjectedPoint {
  x: number;
  y: number;
  /** The legend entry: "vocabulary", "prior samples", "trained prompts", a task name, ... */
  group: string;
  /** Shown in the tooltip (a token, a run name, a vector index). */
  label?: string;
}

export interface ScatterOptions {
  title?: string;
  xTitle?: string;
  yTitle?: string;
  width?: number;
  height?: number;
  /** Groups drawn small and faint (a background such as the vocabulary). */
  background?: string[];
}

/**
 * Vocabulary vs prior samples vs trained prompts (paper, "Analyses": embedding space) or any labelled 2-D
 * projection: one colour and shape per group; background groups drawn small and faint underneath.
 */
export function scatterSpec(points: readonly ProjectedPoint[], options: ScatterOptions = {}): PlotSpec {
  const background = new Set(options.background ?? []);
  const values = points.map((p) => ({ ...p, background: background.has(p.group) }));
  return {
    ...base(options.title, options.width ?? 420, options.height ?? 360),
    data: { values },
    mark: { type: "point", filled: true, tooltip: true },
    params: [{ name: "zoom", select: "interval", bind: "scales" }],
    encoding: {
      x: { field: "x", type: "quantitative", title: options.xTitle ?? "component 1", scale: { zero: false } },
      y: { field: "y", type: "quantitative", title: options.yTitle ?? "component 2", scale: { zero: false } },
      color: { field: "group", type: "nominal", title: null },
      shape: { field: "group", type: "nominal", title: null },
      size: { condition: { test: "datum.background", value: 8 }, value: 40 },
      opacity: { condition: { test: "datum.background", value: 0.25 }, value: 0.85 },
      order: { field: "background", type: "nominal", sort: "descending" },
      tooltip: [
        { field: "group", type: "nominal" },
        { field: "label", type: "nominal" },
        { field: "x", type: "quantitative", format: ".3f" },
        { field: "y", type: "quantitative", format: ".3f" },
      ],
    },
  } as PlotSpec;
}

export interface TrajectoryPoint {
  x: number;
  y: number;
  step: number;
  /** The run (prior) the trajectory belongs to. */
  run: string;
  /** Which prompt vector (0..P-1) this point is. */
  vector: number;
}

/** Prompt trajectories over training: each prompt vector's snapshots joined in step order, one colour per run. */
export function trajectorySpec(
  points: readonly TrajectoryPoint[],
  options: { title?: string; xTitle?: string; yTitle?: string; width?: number; height?: number } = {},
): PlotSpec {
  const values = points.map((p) => ({ ...p, path: `${p.run}/${p.vector}` }));
  const x = {
    field: "x",
    type: "quantitative",
    title: options.xTitle ?? "component 1",
    scale: { zero: false },
  };
  const y = {
    field: "y",
    type: "quantitative",
    title: options.yTitle ?? "component 2",
    scale: { zero: false },
  };
  return {
    ...base(options.title, options.width ?? 420, options.height ?? 360),
    data: { values },
    layer: [
      {
        mark: { type: "line", strokeWidth: 1, opacity: 0.6 },
        encoding: {
          x,
          y,
          color: { field: "run", type: "nominal", title: "run" },
          detail: { field: "path", type: "nominal" },
          order: { field: "step", type: "quantitative" },
        },
      },
      {
        mark: { type: "point", filled: true, size: 18, tooltip: true },
        params: [{ name: "zoom", select: "interval", bind: "scales" }],
        encoding: {
          x,
          y,
          color: { field: "run", type: "nominal", title: "run" },
          opacity: { field: "step", type: "quantitative", title: "step", scale: { range: [0.25, 1] } },
          tooltip: [
            { field: "run", type: "nominal" },
            { field: "vector", type: "quantitative" },
            { field: "step", type: "quantitative" },
          ],
        },
      },
    ],
  } as PlotSpec;
}

export interface ClusterPoint {
  x: number;
  y: number;
  task: string;
  layer: number;
}

/** Activation clusters per task and layer (paper, finding 4): one panel per layer, one colour per task. */
export function clusterSpec(
  points: readonly ClusterPoint[],
  options: { title?: string; columns?: number; panelSize?: number } = {},
): PlotSpec {
  const size = options.panelSize ?? 200;
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    ...(options.title ? { title: options.title } : {}),
    config: FIGURE_CONFIG,
    data: { values: points.map((p) => ({ ...p })) },
    facet: { field: "layer", type: "ordinal", title: "layer" },
    columns: options.columns ?? 4,
    resolve: { scale: { x: "independent", y: "independent" } },
    spec: {
      width: size,
      height: size,
      mark: { type: "point", filled: true, size: 14, opacity: 0.7, tooltip: true },
      encoding: {
        x: { field: "x", type: "quantitative", title: "PC 1", scale: { zero: false } },
        y: { field: "y", type: "quantitative", title: "PC 2", scale: { zero: false } },
        color: { field: "task", type: "nominal", title: "task" },
      },
    },
  } as PlotSpec;
}

export interface DensityValue {
  value: number;
  layer: number;
  /** One curve per group within a layer's panel (e.g. task). */
  group?: string;
}

/**
 * Density per layer (paper, "Analyses": PCA with KDE per layer, roughly unimodal): Gaussian kernel density
 * estimates (Vega's density transform, Scott's bandwidth unless given) of a 1-D projection, one panel per
 * layer.
 */
export function densitySpec(
  values: readonly DensityValue[],
  options: {
    title?: string;
    xTitle?: string;
    bandwidth?: number;
    columns?: number;
    panelWidth?: number;
  } = {},
): PlotSpec {
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    ...(options.title ? { title: options.title } : {}),
    config: FIGURE_CONFIG,
    data: { values: values.map((v) => ({ group: "all", ...v })) },
    facet: { field: "layer", type: "ordinal", title: "layer" },
    columns: options.columns ?? 4,
    resolve: { scale: { x: "independent", y: "independent" } },
    spec: {
      width: options.panelWidth ?? 200,
      height: 140,
      transform: [
        {
          density: "value",
          groupby: ["layer", "group"],
          // Each layer's curve over its own range: the default samples every group over the range of all,
          // and layers whose scales differ by orders of magnitude got a flat line.
          resolve: "independent",
          ...(options.bandwidth ? { bandwidth: options.bandwidth } : {}),
          as: ["value", "density"],
        },
      ],
      mark: { type: "area", opacity: 0.45, line: true },
      encoding: {
        x: { field: "value", type: "quantitative", title: options.xTitle ?? "PC 1" },
        y: { field: "density", type: "quantitative", title: "density", stack: null },
        color: { field: "group", type: "nominal", title: null },
      },
    },
  } as PlotSpec;
}

export interface LossPoint {
  step: number;
  loss: number;
  /** The run, labelled by its prior. */
  run: string;
  kind: "train" | "validation";
}

/** Loss curves per prior (paper, finding 3): training loss as lines, validation loss as points and lines. */
export function lossCurveSpec(
  points: readonly LossPoint[],
  options: { title?: string; width?: number; height?: number; logScale?: boolean } = {},
): PlotSpec {
  const y = {
    field: "loss",
    type: "quantitative",
    title: "loss",
    scale: options.logScale ? { type: "log" } : { zero: false },
  };
  return {
    ...base(options.title, options.width ?? 480, options.height ?? 300),
    data: { values: points.map((p) => ({ ...p })) },
    encoding: {
      x: { field: "step", type: "quantitative", title: "step", axis: { format: "d", tickMinStep: 1 } },
      y,
      color: { field: "run", type: "nominal", title: "run (prior)" },
    },
    layer: [
      {
        mark: { type: "line", strokeWidth: 1.5 },
        encoding: { strokeDash: { field: "kind", type: "nominal", title: null } },
      },
      {
        transform: [{ filter: "datum.kind === 'validation'" }],
        mark: { type: "point", filled: true, size: 36, tooltip: true },
        encoding: {
          tooltip: [
            { field: "run", type: "nominal" },
            { field: "step", type: "quantitative" },
            { field: "loss", type: "quantitative", format: ".4f" },
          ],
        },
      },
    ],
  } as PlotSpec;
}

/** A bar chart of one number per run (e.g. convergence step by prior). */
export function barSpec(
  rows: readonly { name: string; value: number | null }[],
  options: { title?: string; valueTitle?: string; width?: number } = {},
): PlotSpec {
  return {
    ...base(options.title, options.width ?? 360, Math.max(60, 24 * rows.length)),
    data: { values: rows.filter((r) => r.value !== null && Number.isFinite(r.value)).map((r) => ({ ...r })) },
    mark: { type: "bar", tooltip: true },
    encoding: {
      y: { field: "name", type: "nominal", title: null, sort: null },
      x: { field: "value", type: "quantitative", title: options.valueTitle ?? "value" },
      color: { field: "name", type: "nominal", legend: null },
    },
  } as PlotSpec;
}

/** Compiles a Vega-Lite specification to Vega (what the browser and the headless view run). */
export async function toVega(spec: PlotSpec): Promise<vega.Spec> {
  const { compile } = await import("vega-lite");
  return compile(spec).spec as vega.Spec;
}

/** Renders a Vega-Lite specification to an SVG document, headlessly (no browser, no canvas). */
export async function renderSvg(spec: PlotSpec): Promise<string> {
  const vega = await import("vega");
  const view = new vega.View(vega.parse(await toVega(spec)), { renderer: "none", logLevel: vega.Error });
  try {
    return (await view.toSVG()).replace(XML_FORBIDDEN, "\uFFFD");
  } finally {
    view.finalize();
  }
}

/**
 * The characters XML forbids, removed from a figure's SVG (a token or run name may hold one: resvg,
 * and any XML reader, would refuse the document), each replaced by U+FFFD.
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: these are the characters being removed
const XML_FORBIDDEN = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\uFFFE\uFFFF]/gu;

/** Rasterises an SVG document to PNG with resvg at `scale` x its size (default 2: print resolution). */
export function svgToPng(svg: string, options: { scale?: number } = {}): Buffer {
  const { Resvg } = createRequire(import.meta.url)("@resvg/resvg-js") as typeof import("@resvg/resvg-js");
  const resvg = new Resvg(svg, {
    fitTo: { mode: "zoom", value: options.scale ?? 2 },
    background: "white",
    font: { loadSystemFonts: true, defaultFontFamily: "DejaVu Sans" },
  });
  return resvg.render().asPng();
}

/** Renders a specification to SVG and PNG. */
export async function renderFigure(
  spec: PlotSpec,
  options: { scale?: number } = {},
): Promise<{ svg: string; png: Buffer }> {
  const svg = await renderSvg(spec);
  return { svg, png: svgToPng(svg, options) };
}

/** Writes `<dir>/<name>.svg`, `.png` and `.vl.json` (the specification, to re-render or edit). */
export async function writeFigure(
  dir: string,
  name: string,
  spec: PlotSpec,
  options: { scale?: number } = {},
): Promise<{ svg: string; png: string; spec: string }> {
  if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new TypeError(`name: expected a file-name stem, got "${name}"`);
  ensureDir(dir);
  const { svg, png } = await renderFigure(spec, options);
  const paths = {
    svg: join(dir, `${name}.svg`),
    png: join(dir, `${name}.png`),
    spec: join(dir, `${name}.vl.json`),
  };
  atomicWrite(paths.svg, svg);
  atomicWrite(paths.png, png);
  atomicWrite(paths.spec, `${JSON.stringify(spec, null, 2)}\n`);
  return paths;
}
