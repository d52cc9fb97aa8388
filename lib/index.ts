// Public API of priortune. Names here are a contract (see README.md).
export { type Backend, type BackendChoice, cudaStatus, resolveBackend } from "./backend.js";
export {
  CollapseReference,
  type CollapseReferenceOptions,
  type CollapseReport,
  type CollapseReportOptions,
  type CollapseSource,
  collapseReport,
  createCollapseReference,
  type ModelLike,
  type NeighborEntry,
  type ReferenceSummary,
  type TokenDecoder,
  type VectorReport,
  type VectorSetSource,
} from "./collapse.js";
// --- nearest-neighbour search and collapse metrics ---
export {
  type KnnBackendChoice,
  type KnnMetric,
  MAX_K,
  type NeighborResult,
  nearestNeighbors,
  type SearchOptions,
  type SelfSearchOptions,
  VocabIndex,
  type VocabIndexOptions,
} from "./knn.js";
export {
  type AccuracyScores,
  arithmeticAccuracy,
  arithmeticCorrect,
  exactMatch,
  f1Score,
  normalizeAnswer,
  parseFirstNumber,
  type QaScores,
  qaScores,
  type Rational,
  scoreTask,
  type TaskScores,
} from "./metrics.js";
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

// --- tasks, data and evaluation metrics ---
export {
  type ArithmeticOperation,
  type ArithmeticOptions,
  type ArithmeticTaskSpec,
  type C4TaskSpec,
  CLOZE_TEMPLATE,
  type ClozeOptions,
  type ClozeRecord,
  type ClozeTaskSpec,
  type EncodedExample,
  type EncodeOptions,
  type Example,
  encodeExample,
  fillTemplate,
  generateArithmetic,
  generateCloze,
  generateQaFacts,
  IGNORE_INDEX,
  type JsonlTaskSpec,
  loadTask,
  MATH_TEMPLATE,
  type MathematicsTaskSpec,
  parseTaskSpec,
  type QaFactsOptions,
  type QaFactsTaskSpec,
  SQUAD_TEMPLATE,
  type SquadTaskSpec,
  TASK_KINDS,
  type Task,
  type TaskKind,
  type TaskMetric,
  type TaskSpec,
  writeArithmetic,
  writeCloze,
  writeQaFacts,
} from "./tasks.js";
export { loadTokenizer, type Tokenizer } from "./tokenizer.js";
