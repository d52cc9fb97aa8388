// Backend choice at run time. One addon binary serves every machine: CUDA is used only when this build
// has CUDA kernels for the requested work and a usable device answers the probe.
import { addon, type CudaInfo } from "./native.js";

export type BackendChoice = "auto" | "cpu" | "cuda";
export type Backend = "cpu" | "cuda";

export type Logger = (level: "info" | "warn", message: string) => void;

/** Default logger: warnings to stderr; info only when PRIORTUNE_LOG=info. */
export const defaultLogger: Logger = (level, message) => {
  if (level === "warn" || process.env.PRIORTUNE_LOG === "info")
    process.stderr.write(`priortune: ${message}\n`);
};

export function cudaStatus(): CudaInfo {
  return addon().cudaInfo();
}

/**
 * Resolves a backend request for whole-model work. `modelKernels` says whether this build has CUDA kernels
 * for the model (they arrive with the CUDA backend; until then "cuda" is refused with the reason).
 */
export function resolveBackend(
  choice: BackendChoice | undefined,
  logger: Logger = defaultLogger,
  modelKernels = false,
): { backend: Backend; reason: string } {
  const requested = choice ?? "auto";
  if (requested !== "auto" && requested !== "cpu" && requested !== "cuda") {
    throw new TypeError(`backend: expected "auto", "cpu" or "cuda", got ${JSON.stringify(choice)}`);
  }
  if (requested === "cpu") return { backend: "cpu", reason: "requested" };
  const cuda = cudaStatus();
  let why = "";
  if (!cuda.usable) why = cuda.reason;
  else if (!modelKernels)
    why = `CUDA device ${cuda.name} found, but this version has no CUDA model kernels yet`;
  if (!why)
    return {
      backend: "cuda",
      reason: `CUDA device ${cuda.name} (sm_${cuda.computeCapability.replace(".", "")})`,
    };
  if (requested === "cuda") throw new Error(`backend "cuda" is not available: ${why}`);
  logger("info", `using the CPU backend: ${why}`);
  return { backend: "cpu", reason: why };
}
