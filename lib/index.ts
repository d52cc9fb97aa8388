// Public API of priortune. Names here are a contract (see README.md).
export { type Backend, type BackendChoice, cudaStatus, resolveBackend } from "./backend.js";
export {
  type ForwardOptions,
  type ForwardOutput,
  type LoadOptions,
  type LossAndGrad,
  type LossAndGradOptions,
  loadModel,
  Model,
  type ModelConfig,
} from "./model.js";
export type { DeepPrompts } from "./native.js";
export { AdamW, type AdamWOptions, promptGrads, promptTensors } from "./optim.js";
export { loadTokenizer, type Tokenizer } from "./tokenizer.js";
// --- nearest-neighbour search and collapse metrics ---
