// Backend choice at run time. One addon binary serves every machine: CUDA is used only when this build
// has CUDA kernels for the requested work and a usable device answers the probe.
import { addon, type CudaInfo, type CudaOpCheck } from "./native.js";
import { checkOptions } from "./validate.js";

export type BackendChoice = "auto" | "cpu" | "cuda";
export type Backend = "cpu" | "cuda";

export type Logger = (level: "info" | "warn", message: string) => void;

/** Default logger: warnings to stderr; info only when PRIORTUNE_LOG=info. */
export const defaultLogger: Logger = (level, message) => {
  if (level === "warn" || process.env.PRIORTUNE_LOG === "info")
    process.stderr.write(`priortune: ${message}\n`);
};

/** Whether the addon was built with CUDA and a device is usable now (with its name, or the reason not). */
export function cudaStatus(): CudaInfo {
  return addon().cudaInfo();
}

/** The self-test's parts: the GEMM kernels, the elementwise ops (norms, embedding, losses, AdamW...), attention. */
export const CUDA_SELFTEST_PARTS = ["gemm", "elementwise", "attention"] as const;
export type CudaSelfTestPart = (typeof CUDA_SELFTEST_PARTS)[number];

/**
 * Runs every CUDA op against its CPU reference on device 0 (random inputs, fixed seeds): one row per op and
 * shape with the error relative to the output's scale and the tolerance it must meet. `parts` limits it to
 * those parts (default: all). Rejects without a usable device, and on an unknown part.
 */
export function cudaSelfTest(options: { parts?: readonly CudaSelfTestPart[] } = {}): Promise<CudaOpCheck[]> {
  try {
    checkOptions(options, "cudaSelfTest options", { parts: true });
  } catch (e) {
    return Promise.reject(e);
  }
  const parts = options.parts;
  if (parts !== undefined) {
    const bad = Array.isArray(parts) ? parts.find((p) => !CUDA_SELFTEST_PARTS.includes(p)) : parts;
    if (!Array.isArray(parts) || bad !== undefined)
      return Promise.reject(
        new TypeError(
          `CUDA self-test: unknown part ${JSON.stringify(bad)} (the parts are ${CUDA_SELFTEST_PARTS.join(", ")})`,
        ),
      );
  }
  const info = cudaStatus();
  if (!info.usable) return Promise.reject(new Error(`CUDA self-test: ${info.reason}`));
  return addon().cudaSelfTest(parts === undefined ? undefined : [...parts]);
}

/**
 * Resolves a backend request for whole-model work: "cuda" when this build has the CUDA model kernels and a
 * usable device answers the probe; "auto" falls back to the CPU with the reason logged.
 */
export function resolveBackend(
  choice: BackendChoice | undefined,
  logger: Logger = defaultLogger,
): { backend: Backend; reason: string } {
  const requested = choice ?? "auto";
  if (requested !== "auto" && requested !== "cpu" && requested !== "cuda") {
    throw new TypeError(`backend: expected "auto", "cpu" or "cuda", got ${JSON.stringify(choice)}`);
  }
  if (requested === "cpu") return { backend: "cpu", reason: "requested" };
  const cuda = cudaStatus();
  let why = "";
  if (!cuda.usable) why = cuda.reason;
  else if (!cuda.modelKernels)
    why = `CUDA device ${cuda.name} found, but this build has no CUDA model kernels`;
  if (!why)
    return {
      backend: "cuda",
      reason: `CUDA device ${cuda.name} (sm_${cuda.computeCapability.replace(".", "")})`,
    };
  if (requested === "cuda") throw new Error(`backend "cuda" is not available: ${why}`);
  logger("info", `using the CPU backend: ${why}`);
  return { backend: "cpu", reason: why };
}
