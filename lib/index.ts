// Public API of priortune. Names here are a contract (see README.md).
export { type Backend, type BackendChoice, cudaStatus, resolveBackend } from "./backend.js";
export { loadModel, Model, type ForwardOptions, type ForwardOutput, type LoadOptions, type ModelConfig } from "./model.js";
export { loadTokenizer, type Tokenizer } from "./tokenizer.js";
// --- nearest-neighbour search and collapse metrics ---
