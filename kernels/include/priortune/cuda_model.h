// The frozen model on a CUDA device: the prompt-tuning paths of pt::Model (forward, loss and prompt
// gradients for soft and deep prompts) run with the kernels of priortune/cuda_ops.h, plus a prompt-training
// step that keeps the trainable tensors and their AdamW state on the device.
//
// Weights are uploaded once from a loaded pt::Model: matrices in bf16 for GemmPrecision::BF16 (fp32 for
// TF32/FP32), norm weights and biases in fp32, the token (and GPT-2 position) table in fp32 for the
// embedding lookup (plus a bf16 copy when it is also the tied LM head). Activations are fp32.
//
// A training step of a shape seen before (same batch, lengths, prompts, label count and optimiser settings)
// replays a CUDA graph: its inputs (ids, masks, labelled rows, the step's learning rate and bias
// corrections) travel in one host-to-device copy before the launch, and the loss (and gradient norm) come
// back in one copy after it. The first call of a shape runs eagerly (allocating what it needs), the second
// captures the graph. Nothing synchronises the host inside a step.
//
// Generation (greedy, as pt::Model::generate) runs on the device from a key/value cache of the prompt batch's
// forward; the host weights are kept for the CPU paths.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "priortune/cuda_ops.h"
#include "priortune/model.h"

namespace pt {

struct CudaModelOptions {
  cuda::GemmPrecision precision = cuda::GemmPrecision::BF16;
  bool graphs = true;  // replay training steps as CUDA graphs
  // Time every stage (gemm, attention, norms, ...) with CUDA events; profiled calls run eagerly (no graphs)
  // and a little slower. DeviceModel::profile() returns the sums.
  bool profile = false;
};

struct DeviceMemoryInfo {
  size_t weights = 0;    // bytes of uploaded weights
  size_t workspace = 0;  // bytes of activations, scratch and trainables held now
  size_t device_free = 0, device_total = 0;
  std::string device;  // name of the device
};

// Trainable tensors in GradResult's layout (prompt [P, C]; deep: hidden [P_l, C] per listed layer, or prefix
// keys and values [Pp, KV, hd] per listed layer).
struct PromptTensors {
  DeepPrompts::Kind kind = DeepPrompts::Kind::None;
  std::vector<int> layers;  // deep-prompt layers
  std::vector<float> prompt;
  std::vector<std::vector<float>> deep, keys, values;
};

class DeviceModel {
 public:
  virtual ~DeviceModel() = default;
  virtual ForwardResult forward(const ForwardArgs& args) = 0;
  virtual GradResult loss_and_grad(const ForwardArgs& args) = 0;
  // pt::Model::generate's contract (same checks, [B, max_new] ids, -1 after a stop).
  virtual std::vector<int32_t> generate(const ForwardArgs& args, int64_t max_new, int32_t eos) = 0;
  // Device-resident prompt training: set_trainables copies args' prompt and deep prompts to the device and
  // resets the AdamW state; prompt_step then runs loss, gradients and one AdamW step on them for a batch
  // (args' own prompt and deep prompt pointers are ignored; their shapes must match). lr is the step's
  // learning rate (schedules live in the caller).
  virtual void set_trainables(const ForwardArgs& args) = 0;
  // Copies of the trainables (Param) or of AdamW's first or second moments, in the same layout.
  enum class Trainable { Param, AdamM, AdamV };
  virtual PromptTensors trainables(Trainable which = Trainable::Param) = 0;
  // AdamW steps taken since set_trainables (or set by set_optimizer_state).
  virtual int64_t optimizer_steps() = 0;
  // Restores AdamW's moments and step count (a resumed run): m and v shaped as the trainables.
  virtual void set_optimizer_state(const ForwardArgs& m, const ForwardArgs& v, int64_t steps) = 0;
  virtual TrainStats prompt_step(const ForwardArgs& batch, const AdamWConfig& adamw) = 0;
  virtual DeviceMemoryInfo memory() = 0;
  virtual std::string precision() const = 0;
  // Milliseconds per stage summed since the last call (empty unless CudaModelOptions::profile); resets.
  virtual std::vector<std::pair<std::string, double>> profile() = 0;
};

// Uploads `host`'s weights to CUDA device 0. Throws when this build has no CUDA backend, no usable device,
// or the weights do not fit.
std::unique_ptr<DeviceModel> cuda_model(const Model& host, const CudaModelOptions& options);

// Which kernels a GEMM benchmark times: ours (kernels/cuda/gemm.cu, what the model uses), or cuBLASLt loaded
// at run time where the machine has it ($PRIORTUNE_CUBLASLT, else libcublasLt.so.13/.12 on the loader path).
enum class GemmEngine { Ours, CublasLt };

struct GemmBenchResult {
  double ms = 0;           // median of the timed calls
  double max_rel_err = 0;  // max |C - R| / max |R| against our fp32 GEMM on the same operands
  std::string engine;      // "priortune", or the cuBLASLt library and version
};

// `iters` timed calls (CUDA events, after warm-up) of C[M, N] = A[M, K] . B[N, K]^T (b_transposed; else
// B[K, N], the NN product of input gradients) on random operands (never zeros; for BF16 the values are
// bf16-exact, so both engines and the reference see the same operands).
// For BF16 both engines take both operands in bf16, converted before the timed calls. The median
// of ours at BF16 8192^3 is the peak the model FLOP utilisation is reported against.
GemmBenchResult cuda_gemm_benchmark(cuda::GemmPrecision precision, int64_t M, int64_t N, int64_t K, int iters,
                                    GemmEngine engine = GemmEngine::Ours, bool b_transposed = true);

// Every CUDA op against its CPU reference (priortune/cuda_ops.h selftest_all), or those of the parts named
// (gemm, elementwise, attention); throws without CUDA.
std::vector<cuda::OpCheck> cuda_selftest(const std::vector<std::string>& parts = {});

}  // namespace pt
