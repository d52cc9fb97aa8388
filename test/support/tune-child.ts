// Runs a short tuning job in its own process for the resume test. With CRASH_AT=n it kills itself
// (SIGKILL, no cleanup) right after step n, as a machine failure would.
import { loadModel } from "../../lib/model.js";
import { createPrior } from "../../lib/priors.js";
import { loadTask } from "../../lib/tasks.js";
import { tune } from "../../lib/train.js";

const [modelDir, runDir, steps] = process.argv.slice(2) as [string, string, string];
const crashAt = Number(process.env.CRASH_AT ?? 0);
const model = await loadModel(modelDir, { backend: "cpu", threads: 2 });
const task = await loadTask({ kind: "arithmetic", trainCount: 48, validationCount: 4, seed: 3 });
const prior = await createPrior({ kind: "gaussian", sigma: 0.5 }, { model });
await tune({
  model,
  task,
  prior,
  promptLength: 4,
  steps: Number(steps),
  batchSize: 4,
  optimizer: { lr: 1e-2 },
  seed: 11,
  runDir,
  checkpointEvery: 5,
  snapshotEvery: 5,
  evalEvery: 0,
  onStep: (r) => {
    if (crashAt && r.step === crashAt) process.kill(process.pid, "SIGKILL");
  },
});
model.dispose();
