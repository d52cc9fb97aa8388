#!/usr/bin/env node
// Builds and runs the emulated CUDA check: every kernels/cuda source executed on the CPU by the emulator in
// tools/cuda-emu (read include/emu_cuda.h there for what it can and cannot prove), checked against the CPU
// implementation by tools/cuda-emu/check.cpp. Needs g++ (C++17, OpenMP) on x86-64 Linux; no GPU, no nvcc.
//
//   node scripts/cuda-emu.mjs [--asan] [--build-only] [SECTION...]
//
// --asan    AddressSanitizer build (catches out-of-bounds reads too; slower)
// --build-only  build what the sections need (build/cuda-emu/check, priortune-emu.node for addon), run nothing
// SECTION   addon selftest grad step prec extra cache misc knn smem99 (default: all; addon: the emulated Node
//           addon runs test/cuda.test.ts and the bundled gpu-check --tiny; not with --asan; smem99: the
//           attention self-test on a device with 99 KB of shared memory a block, as on Ada GPUs)
// The environment passes through: SEED=n shifts the fiber schedules, REVERSE=1 runs blocks last to first.
//
// The .cu/.cuh files are rewritten into build/cuda-emu/gen (launches, __shared__ poisoning, vector-access
// alignment checks), compiled with kernels/cpu/*.cpp (PRIORTUNE_WITH_CUDA defined, as in the CUDA build)
// and the emulator, in parallel and incrementally (an object is rebuilt when its command or any file in its
// g++ dependency list changed). Sections run as separate processes, one per core. Exits non-zero on a
// build error, a crash, an emulator error or any failed check.
import { spawn } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const asan = args.includes("--asan");
const buildOnly = args.includes("--build-only");
const unknown = args.filter((a) => a.startsWith("--") && a !== "--asan" && a !== "--build-only");
// "addon" builds the Node addon against the emulator and runs the JS-level CUDA suite with it (see below).
const allSections = ["addon", "extra", "selftest", "prec", "grad", "knn", "step", "smem99", "cache", "misc"]; // longest first
const picked = args.filter((a) => !a.startsWith("--")).flatMap((a) => a.split(","));
const badSection = picked.filter((s) => !allSections.includes(s));
if (asan && picked.includes("addon")) {
  console.error("cuda-emu: the addon section does not run with --asan (node would need libasan preloaded)");
  process.exit(2);
}
if (unknown.length || badSection.length) {
  console.error(`cuda-emu: unknown ${unknown.length ? `option ${unknown[0]}` : `section ${badSection[0]}`}`);
  console.error(`usage: node scripts/cuda-emu.mjs [--asan] [--build-only] [${allSections.join("|")}...]`);
  process.exit(2);
}
const sections = picked.length
  ? allSections.filter((s) => picked.includes(s))
  : allSections.filter((s) => !(asan && s === "addon"));

const jobs = Math.max(1, availableParallelism());
const cxx = process.env.CXX || "g++";
const out = join(root, "build", "cuda-emu");
const gen = join(out, "gen");
const objDir = join(out, asan ? "obj-asan" : "obj");
const bin = join(out, asan ? "check-asan" : "check");
const addonBin = join(out, asan ? "priortune-emu-asan.node" : "priortune-emu.node");
const emuDir = join(root, "tools", "cuda-emu");
const cudaDir = join(root, "kernels", "cuda");
const cpuDir = join(root, "kernels", "cpu");
const flags = [
  "-std=c++17",
  asan ? "-O1" : "-O2",
  "-fPIC", // the same objects serve the check program and the emulated addon
  "-fopenmp",
  "-fno-math-errno",
  "-Wno-unknown-pragmas",
  "-DPRIORTUNE_WITH_CUDA=1",
  "-DPRIORTUNE_CUDA_EMU=1", // kernels/cuda/mma.cuh: the emulator's ldmatrix/mma.sync instead of inline PTX
  "-I",
  join(emuDir, "include"),
  "-I",
  join(root, "kernels", "include"),
  ...(asan ? ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"] : []),
];

// ---- the .cu rewrite ----------------------------------------------------------------------------------

// Splits at commas outside brackets.
function splitTop(s) {
  const parts = [];
  let depth = 0;
  let cur = "";
  for (const ch of s) {
    if ("([{".includes(ch)) depth++;
    else if (")]}".includes(ch)) depth--;
    if (ch === "," && depth === 0) {
      parts.push(cur.trim());
      cur = "";
    } else cur += ch;
  }
  parts.push(cur.trim());
  return parts;
}

function transform(src, file) {
  const counts = { launches: 0, shared: 0, vectors: 0 };
  // kernel<<<grid, block[, smem[, stream]]>>>(args) -> emu::launch("kernel@file:line", kernel, grid, block,
  // smem, stream, args); the line breaks of the configuration are kept so that line numbers stay.
  let s = src.replace(/([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<([\s\S]*?)>>>\(/g, (m, name, cfg, at) => {
    const c = splitTop(cfg.replace(/\s+/g, " "));
    if (c.length < 2 || c.length > 4)
      throw new Error(`${file}: cannot parse the launch configuration <<<${cfg}>>>`);
    if (c.length < 3) c.push("0");
    if (c.length < 4) c.push("nullptr");
    const line = src.slice(0, at).split("\n").length;
    counts.launches++;
    const label = `${name.replace(/\s+/g, " ")}@${file}:${line}`;
    return `emu::launch(${JSON.stringify(label)}, ${name}, ${c.join(", ")},${"\n".repeat(m.split("\n").length - 1)} `;
  });
  // extern __shared__ T name[];  ->  T* name = emu::dyn_smem<T>();  (poisoned at each block start)
  s = s.replace(
    /extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?((?:unsigned\s+)?\w+)\s+(\w+)\s*\[\s*\]\s*;/g,
    (_m, type, name) => {
      counts.shared++;
      return `${type}* ${name} = emu::dyn_smem<${type}>();`;
    },
  );
  // __shared__ T a[..], b;  ->  the same declaration (a static), then each name poisoned once per block.
  s = s.replace(/^([ \t]*)__shared__\s+([^;]*);/gm, (m, _indent, decl) => {
    const names = splitTop(decl.replace(/^__align__\(\d+\)\s*/, "")).map((d) => {
      const n = /(\w+)\s*(?:\[[^\]]*\]\s*)*$/.exec(d);
      if (!n) throw new Error(`${file}: cannot parse the __shared__ declaration "${m.trim()}"`);
      return n[1];
    });
    counts.shared += names.length;
    return `${m} ${names.map((n) => `emu::poison_shared(&${n}, sizeof(${n}));`).join(" ")}`;
  });
  // reinterpret_cast<[const] float4/float2/uint4/uint2*>(e) -> EMU_VEC(...), which checks the alignment.
  const vec = /reinterpret_cast<(?:const\s+)?(?:float4|float2|uint4|uint2)\s*\*>\(/g;
  let res = "";
  let i = 0;
  for (let m = vec.exec(s); m; m = vec.exec(s)) {
    let j = m.index + m[0].length;
    for (let depth = 1; depth; j++) {
      if (j >= s.length) throw new Error(`${file}: unbalanced parentheses after ${m[0]}`);
      if (s[j] === "(") depth++;
      else if (s[j] === ")") depth--;
    }
    res += `${s.slice(i, m.index)}EMU_VEC(${s.slice(m.index, j)})`;
    counts.vectors++;
    i = j;
    vec.lastIndex = j;
  }
  s = res + s.slice(i);
  return { text: `#line 1 ${JSON.stringify(relative(root, join(cudaDir, file)))}\n${s}`, counts };
}

// Writes only when the content changed, so that unchanged files keep their mtime (and objects stay valid).
function writeIfChanged(path, text) {
  if (existsSync(path) && readFileSync(path, "utf8") === text) return;
  writeFileSync(path, text);
}

// ---- build --------------------------------------------------------------------------------------------

function run(cmd, argv, opts = {}) {
  return new Promise((done) => {
    const p = spawn(cmd, argv, { cwd: root, ...opts });
    let output = "";
    p.stdout?.on("data", (d) => {
      output += d;
    });
    p.stderr?.on("data", (d) => {
      output += d;
    });
    p.on("error", (e) => done({ code: -1, output: `${output}${e.message}\n` }));
    p.on("close", (code, signal) => done({ code: code ?? -1, signal, output }));
  });
}

async function pool(items, n, fn) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const k = next++;
      results[k] = await fn(items[k], k);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
  return results;
}

const mtime = (p) => (existsSync(p) ? statSync(p).mtimeMs : -1);

// An object is current when its command is unchanged and no file of its dependency list (g++ -MMD) is
// newer than it.
function upToDate(obj, cmdLine) {
  const dep = `${obj}.d`;
  const cmdFile = `${obj}.cmd`;
  if (!existsSync(obj) || !existsSync(dep) || !existsSync(cmdFile)) return false;
  if (readFileSync(cmdFile, "utf8") !== cmdLine) return false;
  const t = mtime(obj);
  const deps = readFileSync(dep, "utf8")
    .replace(/\\\n/g, " ")
    .replace(/^[^:]*:/, "")
    .split(/\s+/)
    .filter(Boolean);
  return deps.every((d) => {
    const m = mtime(resolve(root, d.replace(/\\ /g, " ")));
    return m >= 0 && m <= t;
  });
}

async function build() {
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new Error(`the emulator's fibers need x86-64 Linux (this is ${process.platform}/${process.arch})`);
  }
  mkdirSync(gen, { recursive: true });

  const cudaFiles = readdirSync(cudaDir)
    .filter((f) => /\.(cu|cuh)$/.test(f))
    .sort();
  const wanted = new Set();
  const counts = { launches: 0, shared: 0, vectors: 0 };
  for (const f of cudaFiles) {
    const { text, counts: c } = transform(readFileSync(join(cudaDir, f), "utf8"), f);
    const name = f.endsWith(".cu") ? f.replace(/\.cu$/, ".cpp") : f;
    wanted.add(name);
    writeIfChanged(join(gen, name), text);
    for (const k of Object.keys(counts)) counts[k] += c[k];
  }
  for (const f of readdirSync(gen)) if (!wanted.has(f)) rmSync(join(gen, f)); // a removed source

  // The reference's GEMMs with device-rounded operands (tools/cuda-emu/rounded_sgemm.cpp) in the check
  // program; the addon gets the real CPU backend. Its linear layers of 5 to 32 rows go through that GEMM
  // too (PRIORTUNE_FEW_ROWS_REFERENCE: the CPU backend streams them past it; see kernels/cpu/matmul.cpp).
  const rounded = {
    "matmul.cpp": ["-Dsgemm=sgemm_rounded", "-DPRIORTUNE_FEW_ROWS_REFERENCE"],
    "lm_head.cpp": ["-Dsgemm=sgemm_rounded"],
    "attention.cpp": ["-Dsgemm=sgemm_rounded_attention"],
  };
  const cudaUnits = [...wanted]
    .filter((f) => f.endsWith(".cpp"))
    .map((f) => ({ src: join(gen, f), obj: join("cuda", f) }));
  const cpuFiles = readdirSync(cpuDir)
    .filter((f) => f.endsWith(".cpp"))
    .sort();
  const emuUnit = (f) => ({ src: join(emuDir, f), obj: join("emu", f) });
  const checkUnits = [
    ...cudaUnits,
    ...cpuFiles.map((f) => ({ src: join(cpuDir, f), obj: join("cpu", f), extra: rounded[f] ?? [] })),
    ...["runtime.cpp", "rounded_sgemm.cpp", "check.cpp"].map(emuUnit),
  ];
  const targets = [{ bin, units: checkUnits, link: [] }];
  if (sections.includes("addon")) {
    const nodeInclude = nodeHeaders();
    const napi = ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"];
    const nativeFlags = [
      ...napi.map((d) => `-D${d}`),
      "-I",
      nodeInclude,
      "-I",
      join(root, "node_modules", "node-addon-api"),
    ];
    targets.push({
      bin: addonBin,
      units: [
        ...cudaUnits,
        ...cpuFiles.map((f) => ({ src: join(cpuDir, f), obj: join(rounded[f] ? "cpu-real" : "cpu", f) })),
        emuUnit("runtime.cpp"),
        ...readdirSync(join(root, "native"))
          .filter((f) => f.endsWith(".cpp"))
          .sort()
          .map((f) => ({ src: join(root, "native", f), obj: join("native", f), extra: nativeFlags })),
      ],
      link: ["-shared"], // node_api's symbols come from the node binary at load time
    });
  }
  // One compile per object (the CUDA and runtime objects serve both targets).
  const byObj = new Map();
  for (const t of targets) {
    t.units = t.units.map((u) => ({ ...u, obj: join(objDir, u.obj.replace(/\.cpp$/, ".o")) }));
    for (const u of t.units) byObj.set(u.obj, u);
  }
  const units = [...byObj.values()];
  for (const d of new Set(units.map((u) => dirname(u.obj)))) mkdirSync(d, { recursive: true });

  const stale = units.filter((u) => {
    u.argv = [...flags, ...(u.extra ?? []), "-MMD", "-MF", `${u.obj}.d`, "-c", u.src, "-o", u.obj];
    return !upToDate(u.obj, u.argv.join(" "));
  });
  console.log(
    `cuda-emu: ${cudaFiles.length} CUDA sources rewritten (${counts.launches} launches, ${counts.shared} ` +
      `__shared__ declarations, ${counts.vectors} vector casts); compiling ${stale.length} of ${units.length} files ` +
      `with ${jobs} job${jobs > 1 ? "s" : ""}`,
  );
  const t0 = Date.now();
  let failed = 0;
  await pool(stale, jobs, async (u) => {
    const r = await run(cxx, u.argv);
    if (r.code !== 0) {
      failed++;
      rmSync(u.obj, { force: true });
      console.error(`cuda-emu: ${cxx} failed on ${relative(root, u.src)}\n${r.output}`);
      return;
    }
    writeFileSync(`${u.obj}.cmd`, u.argv.join(" "));
  });
  if (failed) throw new Error(`${failed} file(s) failed to compile`);

  for (const t of targets) {
    const linkArgv = [...flags, ...t.link, ...t.units.map((u) => u.obj), "-o", t.bin];
    const linkCmd = `${t.bin}.cmd`;
    const current =
      existsSync(linkCmd) &&
      readFileSync(linkCmd, "utf8") === linkArgv.join(" ") &&
      t.units.every((u) => mtime(u.obj) <= mtime(t.bin));
    if (!current) {
      const r = await run(cxx, linkArgv);
      if (r.code !== 0) throw new Error(`link of ${relative(root, t.bin)} failed\n${r.output}`);
      writeFileSync(linkCmd, linkArgv.join(" "));
    }
    if (stale.length || !current)
      console.log(`cuda-emu: built ${relative(root, t.bin)} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }
}

// Node's C headers (node_api.h): next to this node binary (a system or nvm install), else node-gyp's or
// cmake-js's downloaded copies.
function nodeHeaders() {
  const version = process.version.slice(1);
  const home = process.env.HOME ?? "";
  const candidates = [
    join(dirname(dirname(process.execPath)), "include", "node"),
    join(home, ".cache", "node-gyp", version, "include", "node"),
    join(home, ".cmake-js", "node-x64", `v${version}`, "include", "node"),
  ];
  const found = candidates.find((d) => existsSync(join(d, "node_api.h")));
  if (!found) throw new Error(`no Node headers (node_api.h) found in ${candidates.join(", ")}`);
  return found;
}

// ---- run ----------------------------------------------------------------------------------------------

// The "addon" section: the JS-level CUDA suites (test/cuda.test.ts: lib's backend "cuda", the native
// bindings, PromptTrainer, tune(), graphs, errors; test/knn.test.ts: VocabIndex on CUDA) run by vitest with
// the emulated addon in place of the real one.
// It passes when every test ran (none skipped), none failed, and the emulator reported nothing.
async function runAddonSuite(env) {
  const vitest = join(root, "node_modules", "vitest", "vitest.mjs");
  // A 2 GiB emulated device: the out-of-memory check fails at its first large allocation.
  const suiteEnv = {
    ...env,
    PRIORTUNE_ADDON: addonBin,
    PRIORTUNE_CUDA_EMULATED: "1",
    EMU_DEVICE_MIB: "2048",
  };
  const files = ["test/cuda.test.ts", "test/knn.test.ts"]; // knn: its CUDA block runs on the emulated device
  const suite = await run(process.execPath, [vitest, "run", ...files, "--reporter=verbose"], {
    env: { ...suiteEnv, NO_COLOR: "1", FORCE_COLOR: "0" },
  });
  // The GPU check's bundle (what scripts/gpu-check.sh carries to a GPU machine) on tiny shapes.
  const bundle = join(out, "gpu-check.mjs");
  const { build: esbuild } = await import("esbuild");
  await esbuild({
    entryPoints: [join(root, "scripts", "gpu-check.ts")],
    bundle: true,
    platform: "node",
    format: "esm",
    outfile: bundle,
    external: ["*.node"],
    logLevel: "warning",
  });
  // The wgmma section's model checks read test/fixtures next to the bundle, as gpu-check.sh links them.
  rmSync(join(out, "fixtures"), { force: true });
  symlinkSync(join(root, "test", "fixtures"), join(out, "fixtures"));
  const results = join(out, "gpu-check-results.md");
  rmSync(results, { force: true });
  const check = await run(
    process.execPath,
    [bundle, "--tiny", "wgmma", "tma", "async", "gemm", "steps", "generate", "knn", "--results", results],
    {
      env: suiteEnv,
    },
  );
  // The tables must also have reached --results (gpu-check.sh collects them there).
  const tables = check.code === 0 && existsSync(results) ? readFileSync(results, "utf8") : "";
  for (const [section, head] of [
    ["knn", "| workload (Q x V x d, top-10) |"],
    ["generate", "| model | B x prompt tokens |"],
  ])
    if (check.code === 0 && !tables.includes(head)) {
      check.code = 1;
      check.output += `\ngpu-check --tiny: the ${section} table is missing from --results\n`;
    }
  const ansi = new RegExp(`${String.fromCharCode(27)}\\[[0-9;]*m`, "g"); // colour codes, if any remain
  const r = {
    code: suite.code || check.code,
    signal: suite.signal ?? check.signal,
    output: `${suite.output.replace(ansi, "")}\n-- gpu-check --tiny (bundled)\n${check.output}`,
  };
  const passed = Number(/Tests\s+(?:\d+ failed \| )?(\d+) passed/.exec(r.output)?.[1] ?? 0);
  const failed = Number(/Tests\s+(\d+) failed/.exec(r.output)?.[1] ?? 0);
  const skipped = Number(/Tests\s+.*?(\d+) skipped/.exec(r.output)?.[1] ?? 0);
  const emu = (r.output.match(/^EMU (ERROR|warning)/gm) ?? []).length;
  const ok = r.code === 0 && passed > 0 && failed === 0 && skipped === 0 && emu === 0;
  const summary =
    `addon suite: ${passed} passed, ${failed} failed, ${skipped} skipped, ${emu} emulator report(s); ` +
    `gpu-check --tiny exit ${check.code}\n` +
    `checks: ${passed + failed + skipped}, failed: ${ok ? 0 : Math.max(1, failed + skipped + emu)}\n`;
  return { ...r, output: r.output + summary };
}

async function runSections() {
  const t0 = Date.now();
  let checks = 0;
  let failedChecks = 0;
  const bad = [];
  const env = { ...process.env, OMP_NUM_THREADS: "1" };
  await pool(sections, jobs, async (section) => {
    const t = Date.now();
    // smem99: the attention self-test on a device with 99 KB of shared memory a block (Ada's).
    const sectionEnv = section === "smem99" ? { ...env, EMU_SMEM_OPTIN_KB: "99" } : env;
    const r = section === "addon" ? await runAddonSuite(env) : await run(bin, [section], { env: sectionEnv });
    const m = /^checks: (\d+), failed: (\d+)$/m.exec(r.output);
    if (m) {
      checks += Number(m[1]);
      failedChecks += Number(m[2]);
    }
    const ok = r.code === 0 && m && m[2] === "0";
    if (!ok) bad.push(section);
    const how = r.signal ? `killed by ${r.signal}` : `exit ${r.code}`;
    console.log(
      `== ${section}: ${ok ? "passed" : `FAILED (${how})`} in ${((Date.now() - t) / 1000).toFixed(1)} s`,
    );
    process.stdout.write(r.output);
  });
  const secs = ((Date.now() - t0) / 1000).toFixed(1);
  console.log(
    `cuda-emu: ${checks} checks, ${failedChecks} failed, in ${sections.length} section(s) (${secs} s)` +
      (bad.length ? `; failing sections: ${bad.join(", ")}` : ""),
  );
  return bad.length === 0;
}

try {
  await build();
  process.exitCode = buildOnly || (await runSections()) ? 0 : 1;
} catch (e) {
  console.error(`cuda-emu: ${e instanceof Error ? e.message : e}`);
  process.exitCode = 1;
}
