// Exact k-nearest-neighbour search of query vectors against a fixed set of rows (the "vocabulary": token
// embeddings, or any reference set such as dataset activations).
//
// Exact means: the result equals a float64 brute force over all rows, ties (equal float64 values) broken by
// the lower row index. Fast paths screen candidates in fp32 (CPU: the blocked GEMM micro-kernel; CUDA: TF32
// tensor cores), re-score the candidates in float64 and *certify* the result with a rigorous bound on the
// screening error; a query that cannot be certified is searched again with 4x the candidates, and finally
// by the float64 brute force (knn_exact_scan). See kernels/cpu/knn.cpp for the bound. (Two values closer than
// float64 rounding, ~1e-16 relative, are ordered as this code's float64 sums come out; another float64
// implementation summing in another order may order them differently. Exact duplicates always tie.)
//
// Metric values (float64, rounded to fp32 when returned):
//   cosine: q.v / (|q| |v|), defined as 0 when either norm is 0 (as torch's F.normalize convention); larger
//           is nearer
//   dot:    q.v; larger is nearer
//   l2:     |q - v|, the Euclidean distance (not squared); smaller is nearer
//
// Memory contract: every buffer is row-major fp32. Indices[Q, k] and scores[Q, k] are overwritten (=), best
// first. Inputs must be finite, and row norms must stay below 1e18 so that no fp32 product or squared norm
// overflows: both indexes check their rows as they compute their norms (std::invalid_argument with
// knn_check_rows's message: the first bad row, and the column of a non-finite value); the Node layer checks
// queries by knn_check_rows, and a search throws std::out_of_range for a query norm >= 1e18 it is handed
// unchecked.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "priortune/host_array.h"

namespace pt {

enum class KnnMetric { Cosine, L2, Dot };

constexpr int64_t kKnnMaxK = 1024;
constexpr double kKnnMaxNorm = 1e18;

KnnMetric knn_metric_from_name(const std::string& name);  // "cosine" | "l2" | "dot"; std::invalid_argument
const char* knn_metric_name(KnnMetric metric);

struct KnnResult {
  std::vector<int32_t> indices;   // [Q, k]
  std::vector<float> scores;      // [Q, k]
  int64_t recovered_queries = 0;  // queries that needed more than one screening round (see above)
  double device_ms = 0.0;         // CUDA: time the search's kernels took on the device, query preparation
                                  // included (events); 0 on the CPU
  double device_screen_ms = 0.0;  // the query preparation and screening part of device_ms (the rest: merging,
                                  // re-scoring)
};

// A search index over a copy of vocab[V, d]. search() is const and may run from several threads at once.
class KnnIndex {
 public:
  virtual ~KnnIndex() = default;
  // queries[Q, d]; 1 <= k <= min(kKnnMaxK, V - (exclude ? 1 : 0)). exclude[Q] (nullable): a row index that
  // query q must not return (its own row in a self-search), or -1.
  virtual KnnResult search(const float* queries, int64_t Q, int64_t k, const int32_t* exclude,
                           int threads) const = 0;
  virtual int64_t rows() const = 0;
  virtual int64_t dim() const = 0;
  virtual KnnMetric metric() const = 0;
  virtual const char* backend() const = 0;  // "cpu" | "cuda"
  virtual int64_t host_bytes() const = 0;
  virtual int64_t device_bytes() const = 0;
  // Row r of the original vocabulary (fp32, as given), in host memory on both backends. The rows are
  // contiguous (row(r) == row(0) + r * dim()) and never change: callers may read them, all at once too (the
  // collapse metrics fit their Gaussian to them), from any thread while the index lives.
  virtual const float* row(int64_t r) const = 0;
};

// CPU index: keeps the original rows (for float64 re-scoring) and a copy packed into the GEMM micro-kernel's
// panel layout (normalised for cosine), so a search streams the vocabulary once with no packing. The second
// form takes over `vocab` (V = vocab.size() / d rows) as its original rows instead of copying them.
std::unique_ptr<KnnIndex> knn_index_cpu(const float* vocab, int64_t V, int64_t d, KnnMetric metric,
                                        int threads);
std::unique_ptr<KnnIndex> knn_index_cpu(HostFloats&& vocab, int64_t d, KnnMetric metric, int threads);

// CPU index that borrows vocab (no copy, no packed copy; the caller keeps vocab alive and unchanged while the
// index lives) and packs each search's panels on the fly: for one-shot searches.
std::unique_ptr<KnnIndex> knn_index_cpu_borrowed(const float* vocab, int64_t V, int64_t d, KnnMetric metric,
                                                 int threads);

// CUDA index on device 0 (kernels/cuda/knn.cu): the rows stay resident on the device (original fp32 rows, a
// normalised copy for cosine, float64 norms), and the original rows on the host too (the last-resort scan,
// row()). Throws std::runtime_error when this build has no CUDA backend or the device fails. The second form
// takes over `vocab` as its host rows instead of copying them.
std::unique_ptr<KnnIndex> knn_index_cuda(const float* vocab, int64_t V, int64_t d, KnnMetric metric);
std::unique_ptr<KnnIndex> knn_index_cuda(HostFloats&& vocab, int64_t d, KnnMetric metric);

// The float64 brute force, the reference of both backends and their last resort: for each query, every row
// is scored in float64 and the best k are kept (ties to the lower index). Threads split the rows.
void knn_exact_scan(int32_t* indices, float* scores, const float* queries, int64_t Q, const float* vocab,
                    const double* row_norms, int64_t V, int64_t d, int64_t k, KnnMetric metric,
                    const int32_t* exclude, int threads);

// Test hook for the float64 re-scoring sums of one instruction set (isa: "avx512", "avx2" or "generic"):
// out[0, 4) = x . y_j computed alone, out[4, 8) = x . y_j and out[8, 12) = |x - y_j|^2 computed together,
// for y_j = y[j n, j n + n), widened to double before the call where y_double; out[12, 16) = x . y_j by
// the norms' dot product (32 lanes; this CPU's best form). False where this CPU lacks the instruction set.
// Every form must give the same bits (kernels/cpu/knn.cpp, dots4 and dot_f64).
bool knn_dots4_test(const std::string& isa, bool y_double, const float* x, const float* y, int64_t n,
                    double* out);

// Float64 L2 norms of the rows of x[n, d] (=).
void knn_row_norms(double* norms, const float* x, int64_t n, int64_t d, int threads);

// The start of a search, shared by the CPU and CUDA indexes: checks k against the V rows (throws naming the
// range), sizes res to Q x k (indices -1, scores 0), fills q_norms with the queries' float64 norms (throws on
// a norm >= kKnnMaxNorm) and answers the zero queries of a cosine search (every cosine with a zero vector is
// 0: the k lowest row indices other than the excluded one). Returns the queries still to search.
std::vector<int64_t> knn_search_begin(KnnResult& res, std::vector<double>& q_norms, const float* queries,
                                      int64_t Q, int64_t V, int64_t d, int64_t k, KnnMetric metric,
                                      const int32_t* exclude, int threads);

// Checks x[n, d] for non-finite values and rows with norm >= kKnnMaxNorm; returns "" or a message naming
// the first offending row and column (the caller prefixes the argument name).
std::string knn_check_rows(const float* x, int64_t n, int64_t d, int threads);

// The message of knn_check_rows for row r of x[*, d], known to have a non-finite value or a norm >=
// kKnnMaxNorm.
std::string knn_row_problem(const float* x, int64_t r, int64_t d);

}  // namespace pt
