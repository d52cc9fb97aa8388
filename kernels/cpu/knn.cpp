// Exact k-nearest-neighbour search on the CPU: the GEMM micro-kernel fused with per-query top-k selection,
// followed by float64 re-scoring of the candidates and a certificate of exactness (see knn.h).
//
// Memory contract. The index owns rows_[V, d] (the vocabulary, copied or handed over), norms in float64, and
// packed_, the rows in the micro-kernel's B-panel layout: panel p holds rows [p*nr, p*nr + nr) as d x nr,
// k-major, zero-padded; for cosine the packed rows are normalised (v / |v| in float64, rounded to fp32). A
// search packs its queries into A-panels the same way, computes a score tile of MC queries x NC rows into a
// thread-local buffer with the micro-kernel and scans it into per-query candidate buffers that keep at least
// the best c > k (CandBuf). The full Q x V score matrix never exists. Threads split the rows; their candidate
// lists are merged per query. A borrowed index (knn_index_cpu_borrowed, for one-shot searches) keeps only
// norms and packs each KC x NC block of rows into a thread-local buffer just before it is used.
//
// Screening value a(q, v) (fp32) and what it approximates, s(q, v):
//   cosine: a = fl(q^ . v^),             s = cos(q, v)
//   dot:    a = fl(q . v),               s = q . v
//   l2:     a = fl(q . v) - fl(|v|^2/2), s = q . v - |v|^2/2   (= (|q|^2 - |q - v|^2) / 2: same order)
// The fp32 dot product of length d with any summation order satisfies |fl(x.y) - x.y| <= g_d sum|x_i y_i|
// <= g_d |x||y|, g_d = d u / (1 - d u), u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms,
// 2nd ed., eq. 3.5); normalising adds 2u, the l2 shift another 2u (|q||v| + |v|^2). So |a - s| <= err with
//   cosine: err = 1.25 (d + 6) u            dot: err = 1.25 (d + 2) u |q| vmax
//   l2:     err = 1.25 (d + 4) u (|q| vmax + vmax^2)
// plus d * 2^-146 for subnormal products; vmax = the largest row norm, 1.25 covers g_d/(d u) and the float64
// re-scoring error. A row that was not re-scored has a <= B, B = the largest of the threads' buffer
// thresholds (-inf where a thread dropped no row) and of the cut of the pooled candidates to those re-scored,
// hence s <= B + err. If the k-th best re-scored candidate has s_k > B + err, no other row can reach the top
// k: the answer equals the float64 brute force. Otherwise more of the pooled candidates are re-scored (up to
// 2c), then the query is searched again with 4c candidates, and once c reaches V by knn_exact_scan.
#include "priortune/knn.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>

#include "priortune/gemm.h"
#include "priortune/parallel.h"

namespace pt {

KnnMetric knn_metric_from_name(const std::string& name) {
  if (name == "cosine") return KnnMetric::Cosine;
  if (name == "l2") return KnnMetric::L2;
  if (name == "dot") return KnnMetric::Dot;
  throw std::invalid_argument("metric: expected \"cosine\", \"l2\" or \"dot\", got \"" + name + "\"");
}

const char* knn_metric_name(KnnMetric metric) {
  switch (metric) {
    case KnnMetric::Cosine:
      return "cosine";
    case KnnMetric::L2:
      return "l2";
    default:
      return "dot";
  }
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct HostDeleter {
  void operator()(void* p) const { host_free(p); }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], HostDeleter>;

// n uninitialised Ts from host_alloc: 64-byte aligned (2 MiB and huge pages from 8 MiB on).
template <class T>
AlignedArray<T> aligned_array(size_t n) {
  return AlignedArray<T>(static_cast<T*>(host_alloc(std::max<size_t>(n, 1) * sizeof(T))));
}

// Per-thread scratch reused across searches (OpenMP and libuv threads persist), so a search does not pay
// mmap + page faults for its tiles and packed queries every time; buffers above 16 MiB are not kept.
struct Scratch {
  AlignedArray<unsigned char> data;
  size_t cap = 0;
  void* get(size_t bytes) {
    if (bytes > cap || bytes > (size_t{16} << 20)) {
      data.reset();
      cap = 0;
      data = aligned_array<unsigned char>(bytes);
      if (bytes <= (size_t{16} << 20)) cap = bytes;
    }
    return data.get();
  }
};

template <class T>
T* scratch(Scratch& s, size_t count) {
  return static_cast<T*>(s.get(std::max<size_t>(count, 1) * sizeof(T)));
}

// ---------------------------------------------------------------------------------------------------------
// Float64 scoring. Products of two floats are exact in double, so only the summation order differs from a
// plain loop; one summation order for every row keeps duplicated rows bit-identical (their ties then go to
// the lower index), and one for every instruction set makes the answers the same on every CPU. dot_f64
// serves the norms; the candidates' values come from dots4 below.

inline double add_lanes(const double* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// a . b (the norms), element e summed into lane e % 32, the lanes added in one fixed order: the same bits
// on every CPU (the order is the source's, which no vectoriser may change without -ffast-math; a fused
// multiply-add of an exact product rounds as the add does). 32 lanes: four independent AVX-512 sums in
// flight (a norm pass over a 1 GB vocabulary is otherwise bound by one addition chain).
__attribute__((target_clones("avx512f", "avx2", "default"))) double dot_f64(const float* a, const float* b,
                                                                            int64_t n) {
  double l[32] = {};
  const int64_t body = n / 32 * 32;
  for (int64_t i = 0; i < body; i += 32)
    for (int j = 0; j < 32; ++j) l[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
  for (int64_t i = body; i < n; ++i) l[i - body] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  double f[8];
  for (int j = 0; j < 8; ++j) f[j] = (l[j] + l[j + 16]) + (l[j + 8] + l[j + 24]);
  return add_lanes(f);
}

// The metric value in float64 ("m": larger is better for cosine/dot, smaller for l2 = squared distance) and
// the screening-comparable value s (see the header comment).
struct Exact {
  double m, s;
};

// The float64 dot products of x with four vectors y[0..3] (and, with dist2, their squared distances), the
// four interleaved: four independent sums in flight and four vectors streaming at once. Every sum runs in
// eight lanes (element e into lane e % 8, the tail padded with zeros), by fused multiply-adds, and its lanes
// are added in one fixed order, whatever the instruction set. Products of floats are exact in double (so a
// multiply-add equals a multiply and an add, and x y = y x), and fl(x - y) = -fl(y - x) under
// round-to-nearest: so the bits depend neither on the instruction set, nor on the slot, nor on which vector
// is x, nor on whether y was widened to double beforehand. Equal rows get equal bits, and a query gets the
// same values searched alone or in any batch.

// Adds elements [body, n) (fewer than 8) into lanes 0.. of the sums s (and e), then adds up the lanes.
template <class Y>
inline void finish_lanes(const float* x, const Y* const* y, int64_t body, int64_t n, double (*s)[8],
                         double (*e)[8], double* dot, double* dist2) {
  for (int64_t i = body; i < n; ++i) {
    const double xv = x[i];
    for (int j = 0; j < 4; ++j) {
      const double yv = y[j][i];
      s[j][i - body] = std::fma(xv, yv, s[j][i - body]);
      if (e) e[j][i - body] = std::fma(xv - yv, xv - yv, e[j][i - body]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    dot[j] = add_lanes(s[j]);
    if (dist2) dist2[j] = add_lanes(e[j]);
  }
}

template <class Y>
void dots4_generic(const float* x, const Y* const* y, int64_t n, double* dot, double* dist2) {
  double s[4][8] = {}, e[4][8] = {};
  for (int64_t i = 0; i < n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const bool in = i + l < n;
      const double xv = in ? x[i + l] : 0.0;
      for (int j = 0; j < 4; ++j) {
        const double yv = in ? static_cast<double>(y[j][i + l]) : 0.0;
        s[j][l] += xv * yv;  // (exact product: the same as a fused multiply-add)
        // Not exact: fused as in the vector forms. Without hardware FMA, std::fma is a slow library call;
        // this form serves only CPUs without AVX2 (and tests).
        if (dist2) e[j][l] = std::fma(xv - yv, xv - yv, e[j][l]);
      }
    }
  finish_lanes(x, y, n, n, s, dist2 ? e : nullptr, dot, dist2);
}

__attribute__((target("avx512f"))) inline __m512d load8_pd(const float* p) {
  return _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(p));  // (GCC 12 warns of the unmasked form)
}
__attribute__((target("avx512f"))) inline __m512d load8_pd(const double* p) {
  return _mm512_loadu_pd(p);
}

template <class Y>
__attribute__((target("avx512f"))) void dots4_avx512(const float* x, const Y* const* y, int64_t n,
                                                     double* dot, double* dist2) {
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, e0 = s0, e1 = s0, e2 = s0, e3 = s0;
  const Y *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
  const int64_t body = n / 8 * 8;
  if (!dist2) {
    for (int64_t i = 0; i < body; i += 8) {
      const __m512d xv = load8_pd(x + i);
      s0 = _mm512_fmadd_pd(xv, load8_pd(y0 + i), s0);
      s1 = _mm512_fmadd_pd(xv, load8_pd(y1 + i), s1);
      s2 = _mm512_fmadd_pd(xv, load8_pd(y2 + i), s2);
      s3 = _mm512_fmadd_pd(xv, load8_pd(y3 + i), s3);
    }
  } else {
    for (int64_t i = 0; i < body; i += 8) {
      const __m512d xv = load8_pd(x + i), v0 = load8_pd(y0 + i), v1 = load8_pd(y1 + i), v2 = load8_pd(y2 + i),
                    v3 = load8_pd(y3 + i);
      s0 = _mm512_fmadd_pd(xv, v0, s0);
      s1 = _mm512_fmadd_pd(xv, v1, s1);
      s2 = _mm512_fmadd_pd(xv, v2, s2);
      s3 = _mm512_fmadd_pd(xv, v3, s3);
      const __m512d d0 = _mm512_sub_pd(xv, v0), d1 = _mm512_sub_pd(xv, v1), d2 = _mm512_sub_pd(xv, v2),
                    d3 = _mm512_sub_pd(xv, v3);
      e0 = _mm512_fmadd_pd(d0, d0, e0);
      e1 = _mm512_fmadd_pd(d1, d1, e1);
      e2 = _mm512_fmadd_pd(d2, d2, e2);
      e3 = _mm512_fmadd_pd(d3, d3, e3);
    }
  }
  double s[4][8], e[4][8];
  _mm512_storeu_pd(s[0], s0);
  _mm512_storeu_pd(s[1], s1);
  _mm512_storeu_pd(s[2], s2);
  _mm512_storeu_pd(s[3], s3);
  _mm512_storeu_pd(e[0], e0);
  _mm512_storeu_pd(e[1], e1);
  _mm512_storeu_pd(e[2], e2);
  _mm512_storeu_pd(e[3], e3);
  finish_lanes(x, y, body, n, s, dist2 ? e : nullptr, dot, dist2);
}

__attribute__((target("avx2"))) inline void load8_pd(const float* p, __m256d* lo, __m256d* hi) {
  *lo = _mm256_cvtps_pd(_mm_loadu_ps(p));
  *hi = _mm256_cvtps_pd(_mm_loadu_ps(p + 4));
}
__attribute__((target("avx2"))) inline void load8_pd(const double* p, __m256d* lo, __m256d* hi) {
  *lo = _mm256_loadu_pd(p);
  *hi = _mm256_loadu_pd(p + 4);
}

// AVX2: lanes 0-3 and 4-7 of each sum in two registers (the L2 form goes one vector at a time: 16 registers).
template <class Y>
__attribute__((target("avx2,fma"))) void dots4_avx2(const float* x, const Y* const* y, int64_t n, double* dot,
                                                    double* dist2) {
  const int64_t body = n / 8 * 8;
  double s[4][8], e[4][8];
  if (!dist2) {
    __m256d a[4][2];
    for (int j = 0; j < 4; ++j) a[j][0] = a[j][1] = _mm256_setzero_pd();
    for (int64_t i = 0; i < body; i += 8) {
      __m256d xl, xh;
      load8_pd(x + i, &xl, &xh);
      for (int j = 0; j < 4; ++j) {
        __m256d yl, yh;
        load8_pd(y[j] + i, &yl, &yh);
        a[j][0] = _mm256_fmadd_pd(xl, yl, a[j][0]);
        a[j][1] = _mm256_fmadd_pd(xh, yh, a[j][1]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_pd(s[j], a[j][0]);
      _mm256_storeu_pd(s[j] + 4, a[j][1]);
    }
  } else {
    for (int j = 0; j < 4; ++j) {  // one vector at a time: 4 registers of sums
      __m256d sl = _mm256_setzero_pd(), sh = sl, el = sl, eh = sl;
      const Y* yj = y[j];
      for (int64_t i = 0; i < body; i += 8) {
        __m256d xl, xh, yl, yh;
        load8_pd(x + i, &xl, &xh);
        load8_pd(yj + i, &yl, &yh);
        sl = _mm256_fmadd_pd(xl, yl, sl);
        sh = _mm256_fmadd_pd(xh, yh, sh);
        const __m256d dl = _mm256_sub_pd(xl, yl), dh = _mm256_sub_pd(xh, yh);
        el = _mm256_fmadd_pd(dl, dl, el);
        eh = _mm256_fmadd_pd(dh, dh, eh);
      }
      _mm256_storeu_pd(s[j], sl);
      _mm256_storeu_pd(s[j] + 4, sh);
      _mm256_storeu_pd(e[j], el);
      _mm256_storeu_pd(e[j] + 4, eh);
    }
  }
  finish_lanes(x, y, body, n, s, dist2 ? e : nullptr, dot, dist2);
}

template <class Y>
using Dots4 = void (*)(const float*, const Y* const*, int64_t, double*, double*);

// dots4 with y in floats (ff) and in doubles (fd), of one instruction set.
struct Dots4Paths {
  Dots4<float> ff;
  Dots4<double> fd;
};

constexpr Dots4Paths kDots4Avx512{dots4_avx512<float>, dots4_avx512<double>};
constexpr Dots4Paths kDots4Avx2{dots4_avx2<float>, dots4_avx2<double>};
constexpr Dots4Paths kDots4Generic{dots4_generic<float>, dots4_generic<double>};

// The metric value m and the screening-comparable s from a float64 dot product (and squared distance).
inline Exact exact_from(KnnMetric metric, double dot, double dist2, double q_norm, double v_norm) {
  if (metric == KnnMetric::L2) return {dist2, dot - 0.5 * v_norm * v_norm};
  if (metric == KnnMetric::Dot) return {dot, dot};
  const double c = (q_norm == 0.0 || v_norm == 0.0) ? 0.0 : dot / (q_norm * v_norm);
  return {c, c};
}

// The exact values of q against rows rows[i[j]], j < count <= 4 (the last repeated to fill four slots).
inline void exact_scores(Dots4<float> dots4, KnnMetric metric, const float* q, double q_norm,
                         const float* rows, const double* row_norms, int64_t d, const int32_t* i, int count,
                         Exact* out) {
  const float* v[4];
  for (int j = 0; j < 4; ++j) v[j] = rows + static_cast<int64_t>(i[std::min(j, count - 1)]) * d;
  double dot[4], dist2[4] = {};
  dots4(q, v, d, dot, metric == KnnMetric::L2 ? dist2 : nullptr);
  for (int j = 0; j < count; ++j) out[j] = exact_from(metric, dot[j], dist2[j], q_norm, row_norms[i[j]]);
}

// "a ranks before b": better metric value, then lower index.
inline bool ranks_before(KnnMetric metric, double ma, int32_t ia, double mb, int32_t ib) {
  if (ma != mb) return metric == KnnMetric::L2 ? ma < mb : ma > mb;
  return ia < ib;
}

inline float returned_score(KnnMetric metric, double m) {
  return static_cast<float>(metric == KnnMetric::L2 ? std::sqrt(m) : m);
}

// A re-scored candidate being ranked: key (rank_key of its metric value), row index, and where its values
// are.
struct Ranked {
  uint64_t key;
  int32_t i, slot;
};

// An unsigned key whose ascending order is the ranking order of metric value m, best first (the order of
// ranks_before up to the index).
inline uint64_t rank_key(KnnMetric metric, double m) {
  if (m == 0.0) m = 0.0;  // -0 with +0: they compare equal
  uint64_t u;
  std::memcpy(&u, &m, sizeof u);
  u = (u >> 63) ? ~u : u | (uint64_t{1} << 63);  // ascending in m
  return metric == KnnMetric::L2 ? u : ~u;
}

// Sorts a[0, n) by key, then index, into a (tmp: n entries): a least-significant-digit radix sort, one pass
// per key byte that differs between the keys, then runs of equal keys by index. At k = 1024 std::sort took
// a sixth of the search, its comparisons mispredicting.
void rank_sort(Ranked* a, Ranked* tmp, int64_t n) {
  if (n < 2) return;
  uint32_t hist[8][256] = {};
  for (int64_t r = 0; r < n; ++r) {
    const uint64_t key = a[r].key;
    for (int b = 0; b < 8; ++b) ++hist[b][(key >> (8 * b)) & 0xFF];
  }
  Ranked *src = a, *dst = tmp;
  for (int b = 0; b < 8; ++b) {
    uint32_t* h = hist[b];
    if (h[(src[0].key >> (8 * b)) & 0xFF] == static_cast<uint64_t>(n)) continue;  // all keys share this byte
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const uint32_t count = h[v];
      h[v] = sum;
      sum += count;
    }
    for (int64_t r = 0; r < n; ++r) dst[h[(src[r].key >> (8 * b)) & 0xFF]++] = src[r];
    std::swap(src, dst);
  }
  if (src != a) std::copy(src, src + n, a);
  for (int64_t r = 1; r < n; ++r) {  // ties (rare): by index
    if (a[r].key != a[r - 1].key) continue;
    int64_t e = r + 1;
    while (e < n && a[e].key == a[r].key) ++e;
    std::sort(a + r - 1, a + e, [](const Ranked& x, const Ranked& y) { return x.i < y.i; });
    r = e - 1;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Candidate buffers for the fp32 screening, one per query and thread. Screening values above the threshold
// thr are appended (values in a[], row indices in i[]); when the buffer is full it is cut back to between
// `keep` and `limit` entries, those above a new, higher thr. So a row that is not in the buffer always has a
// screening value <= thr, and the buffer holds at least the best `keep` rows seen. Appending is branch-free
// with AVX-512 (a compress per 16 values) and AVX2 (a permute per 8), and a cut is a few vector counting
// passes (see cut), once per (cap - keep) * 3/4 appended entries: cheaper than a heap, whose sift-downs
// mispredict at every level (at 160 x 8192 x 256 the heaps took 40% of the search).

struct Cand {
  float a;
  int32_t i;
};

struct CandBuf {
  float* a;
  int32_t* i;
  int32_t size, cap, keep;
  float thr;
};

__attribute__((target_clones("avx512f", "avx2", "default"))) int32_t count_above(const float* a, int32_t n,
                                                                                 float t) {
  int32_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int32_t r = 0; r < n; ++r) count += a[r] > t ? 1 : 0;
  return count;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void value_range(const float* a, int32_t n,
                                                                              float* lo, float* hi) {
  float l = a[0], h = a[0];
#pragma omp simd reduction(min : l) reduction(max : h)
  for (int32_t r = 0; r < n; ++r) {
    l = a[r] < l ? a[r] : l;
    h = a[r] > h ? a[r] : h;
  }
  *lo = l;
  *hi = h;
}

// Moves the entries with value > t to the front, in order; returns their number.
__attribute__((target("avx512f"))) int32_t keep_above_avx512(float* a, int32_t* idx, int32_t n, float t) {
  const __m512 tv = _mm512_set1_ps(t);
  int32_t w = 0;
  for (int32_t r = 0; r < n; r += 16) {
    const __mmask16 valid = n - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - r)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, a + r);
    const __m512i x = _mm512_maskz_loadu_epi32(valid, idx + r);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, v, tv, _CMP_GT_OQ);
    // w <= r: the masked stores write only below r + 16, over entries already read.
    _mm512_mask_storeu_ps(a + w, (1u << __builtin_popcount(keep)) - 1, _mm512_maskz_compress_ps(keep, v));
    _mm512_mask_storeu_epi32(idx + w, (1u << __builtin_popcount(keep)) - 1,
                             _mm512_maskz_compress_epi32(keep, x));
    w += __builtin_popcount(keep);
  }
  return w;
}

// Moves the entries from r on with value > t to w on (w <= r); returns the new end. The scalar form, and the
// vector forms' tails.
int32_t keep_above_from(float* a, int32_t* idx, int32_t r, int32_t w, int32_t n, float t) {
  for (; r < n; ++r)
    if (a[r] > t) {
      a[w] = a[r];
      idx[w++] = idx[r];
    }
  return w;
}

int32_t keep_above_generic(float* a, int32_t* idx, int32_t n, float t) {
  return keep_above_from(a, idx, 0, 0, n, t);
}

// Cuts a buffer back: finds by bisection a cut t with keep <= #(a > t) <= limit, keeps the entries above it
// and raises thr to t; a few vector counting passes instead of a selection. Where ties leave no such t (many
// equal values), keeps exactly the best `keep` by nth_element (tmp: cap floats).
using KeepAbove = int32_t (*)(float*, int32_t*, int32_t, float);

void cut(CandBuf* b, float* tmp, int32_t limit, KeepAbove keep_above) {
  float lo, hi;
  value_range(b->a, b->size, &lo, &hi);
  // Invariant: #(a > lo) >= keep (checked), #(a > hi) = 0 < keep.
  float t = lo;
  int32_t above = count_above(b->a, b->size, lo);
  bool found = above >= b->keep;
  while (found && above > limit) {
    const float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo && mid < hi)) {
      found = false;
      break;
    }
    const int32_t m = count_above(b->a, b->size, mid);
    if (m < b->keep) {
      hi = mid;
    } else {
      lo = mid;
      t = mid;
      above = m;
    }
  }
  int32_t w = 0;
  if (found) {
    w = keep_above(b->a, b->i, b->size, t);
  } else {
    std::copy(b->a, b->a + b->size, tmp);
    std::nth_element(tmp, tmp + (b->keep - 1), tmp + b->size, std::greater<float>());
    t = tmp[b->keep - 1];
    int32_t ties = b->keep - count_above(b->a, b->size, t);
    for (int32_t r = 0; r < b->size; ++r)
      if (b->a[r] > t || (b->a[r] == t && ties-- > 0)) {
        b->a[w] = b->a[r];
        b->i[w++] = b->i[r];
      }
  }
  b->size = w;
  b->thr = t;
}

// Cuts a full buffer (during a scan) back to at most a quarter of its spare room above `keep`.
void cut_full(CandBuf* b, float* tmp, KeepAbove keep_above) {
  cut(b, tmp, b->keep + (b->cap - b->keep) / 4, keep_above);
}

// Capacity of a candidate buffer that keeps c: at least a tile row (256) more, so that cuts are rare, and
// room for 16 values after any cut (a compress stores 16).
int64_t buffer_capacity(int64_t c) {
  return (c + std::max<int64_t>(c, 256) + 15) / 16 * 16;
}

// Scans one row of a score tile: values s[j] (minus sub[j] for l2) of rows base + j, j < n, except row
// `excl`, into the buffer. tmp: scratch for cuts.
__attribute__((target("avx512f"))) void scan_row_avx512(const float* s, const float* sub, int64_t n,
                                                        int32_t base, int32_t excl, CandBuf* buf,
                                                        float* tmp) {
  __m512 thr = _mm512_set1_ps(buf->thr);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(valid, s + j);
    if (sub) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(valid, sub + j));
    __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, v, thr, _CMP_GT_OQ);
    // No branch on hit: about half the chunks hold a value above a threshold that is a little stale, and
    // storing nothing costs less than the mispredictions.
    const int64_t e = static_cast<int64_t>(excl) - base - j;
    if (e >= 0 && e < 16) hit &= __mmask16(~(1u << e));
    if (buf->size + 16 > buf->cap) {
      cut_full(buf, tmp, keep_above_avx512);
      thr = _mm512_set1_ps(buf->thr);
      hit = _mm512_mask_cmp_ps_mask(hit, v, thr, _CMP_GT_OQ);
    }
    // Compress into a register, then store all 16 lanes: a compressing store is microcoded on some cores.
    const __m512i idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(base + static_cast<int32_t>(j)));
    _mm512_storeu_ps(buf->a + buf->size, _mm512_maskz_compress_ps(hit, v));
    _mm512_storeu_si512(buf->i + buf->size, _mm512_maskz_compress_epi32(hit, idx));
    buf->size += __builtin_popcount(hit);
  }
}

// Left-packing with AVX2: entry m lists the lanes set in the 8-bit mask m, in order (for vpermps).
struct PackTable {
  int32_t lanes[256][8];
  constexpr PackTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int w = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) lanes[m][w++] = l;
    }
  }
};
constexpr PackTable kPack{};

// Appends the lanes of v (indices idx) set in mask at a + size, i + size: stores all 8 lanes.
__attribute__((target("avx2"))) inline int32_t pack8(float* a, int32_t* ids, int32_t size, __m256 v,
                                                     __m256i idx, int mask) {
  const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPack.lanes[mask]));
  _mm256_storeu_ps(a + size, _mm256_permutevar8x32_ps(v, perm));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + size), _mm256_permutevar8x32_epi32(idx, perm));
  return size + __builtin_popcount(mask);
}

__attribute__((target("avx2"))) int32_t keep_above_avx2(float* a, int32_t* idx, int32_t n, float t) {
  const __m256 tv = _mm256_set1_ps(t);
  int32_t w = 0, r = 0;
  // w <= r: the 8-lane stores write below r + 8, over entries already read.
  for (; r + 8 <= n; r += 8) {
    const __m256 v = _mm256_loadu_ps(a + r);
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + r));
    w = pack8(a, idx, w, v, x, _mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_GT_OQ)));
  }
  return keep_above_from(a, idx, r, w, n, t);
}

// Scans s[j0, n) one value at a time (the scalar scan; the AVX2 scan's tail), cutting with keep_above.
void scan_values(const float* s, const float* sub, int64_t j0, int64_t n, int32_t base, int32_t excl,
                 CandBuf* buf, float* tmp, KeepAbove keep_above) {
  for (int64_t j = j0; j < n; ++j) {
    const float v = sub ? s[j] - sub[j] : s[j];
    const int32_t idx = base + static_cast<int32_t>(j);
    if (v > buf->thr && idx != excl) {
      if (buf->size + 16 > buf->cap) cut_full(buf, tmp, keep_above);
      if (v > buf->thr) {
        buf->a[buf->size] = v;
        buf->i[buf->size++] = idx;
      }
    }
  }
}

void scan_row_scalar(const float* s, const float* sub, int64_t n, int32_t base, int32_t excl, CandBuf* buf,
                     float* tmp) {
  scan_values(s, sub, 0, n, base, excl, buf, tmp, keep_above_generic);
}

// The AVX-512 scan's AVX2 form: 8 values a step, a scalar tail.
__attribute__((target("avx2"))) void scan_row_avx2(const float* s, const float* sub, int64_t n, int32_t base,
                                                   int32_t excl, CandBuf* buf, float* tmp) {
  __m256 thr = _mm256_set1_ps(buf->thr);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int32_t size = buf->size;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(s + j);
    if (sub) v = _mm256_sub_ps(v, _mm256_loadu_ps(sub + j));
    int hit = _mm256_movemask_ps(_mm256_cmp_ps(v, thr, _CMP_GT_OQ));
    const int64_t e = static_cast<int64_t>(excl) - base - j;
    if (e >= 0 && e < 8) hit &= ~(1 << e);
    if (size + 16 > buf->cap) {
      buf->size = size;
      cut_full(buf, tmp, keep_above_avx2);
      size = buf->size;
      thr = _mm256_set1_ps(buf->thr);
      hit &= _mm256_movemask_ps(_mm256_cmp_ps(v, thr, _CMP_GT_OQ));
    }
    const __m256i idx = _mm256_add_epi32(lanes, _mm256_set1_epi32(base + static_cast<int32_t>(j)));
    size = pack8(buf->a, buf->i, size, v, idx, hit);
  }
  buf->size = size;
  scan_values(s, sub, j, n, base, excl, buf, tmp, keep_above_avx2);
}

// panel[k * w + j] *= scale[j] in float64, rounded to float.
__attribute__((target_clones("avx2", "default"))) void scale_panel_generic(float* panel, int64_t kc,
                                                                           int64_t w, const double* scale) {
  for (int64_t k = 0; k < kc; ++k, panel += w)
    for (int64_t j = 0; j < w; ++j) panel[j] = static_cast<float>(panel[j] * scale[j]);
}

__attribute__((target("avx512f"))) void scale_panel_avx512(float* panel, int64_t kc, int64_t w,
                                                           const double* scale) {
  if (w % 8) return scale_panel_generic(panel, kc, w, scale);
  for (int64_t k = 0; k < kc; ++k, panel += w)
    for (int64_t j = 0; j < w; j += 8) {
      // (The zero-masking forms: GCC 12 warns of the plain ones' undefined pass-through operand.)
      const __m512d x =
          _mm512_mul_pd(_mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(panel + j)), _mm512_loadu_pd(scale + j));
      _mm256_storeu_ps(panel + j, _mm512_maskz_cvtpd_ps(0xFF, x));
    }
}

// The candidate scan and cut, the rows' scaling and the float64 re-scoring of the instruction set of the GEMM
// micro-kernel in use (so that forcing a kernel in tests covers these too).
struct IsaPaths {
  void (*scan)(const float*, const float*, int64_t, int32_t, int32_t, CandBuf*, float*);
  KeepAbove keep_above;
  void (*scale_panel)(float*, int64_t, int64_t, const double*);
  Dots4Paths dots4;
};

IsaPaths isa_paths_for(const char* kernel_name) {
  if (!std::strcmp(kernel_name, "avx512"))
    return {scan_row_avx512, keep_above_avx512, scale_panel_avx512, kDots4Avx512};
  if (!std::strcmp(kernel_name, "avx2"))
    return {scan_row_avx2, keep_above_avx2, scale_panel_generic, kDots4Avx2};
  return {scan_row_scalar, keep_above_generic, scale_panel_generic, kDots4Generic};
}

constexpr int kMaxPanelRows = 64;  // the widest B panel (nr) pack_screen_rows scales

double screening_error(KnnMetric metric, int64_t d, double q_norm, double vmax) {
  const double u = std::ldexp(1.0, -24), tiny = static_cast<double>(d) * std::ldexp(1.0, -146);
  switch (metric) {
    case KnnMetric::Cosine:
      return 1.25 * (d + 6) * u + tiny;
    case KnnMetric::Dot:
      return 1.25 * (d + 2) * u * q_norm * vmax + tiny;
    default:
      return 1.25 * (d + 4) * u * (q_norm * vmax + vmax * vmax) + tiny;
  }
}

int64_t candidate_count(int64_t k) {
  return k + 32 + k / 8;
}

class CpuIndex final : public KnnIndex {
 public:
  // A reusable index: takes over `rows` (V x d) as its original rows and packs them. The form with `vocab`
  // borrows it instead (it must outlive the index, unchanged) and packs each search's panels on the fly: no
  // copy, no 2x memory, for one-shot searches.
  CpuIndex(HostFloats&& rows, int64_t d, KnnMetric metric, int threads)
      : V_(d > 0 ? static_cast<int64_t>(rows.size()) / d : 0),
        d_(d),
        metric_(metric),
        mk_(sgemm_micro_kernel()),
        isa_(isa_paths_for(mk_.name)) {
    if (d > 0 && static_cast<int64_t>(rows.size()) % d != 0)
      throw std::invalid_argument("vocab: expected a length that is a multiple of dim");
    rows_ = std::move(rows);
    rows_ptr_ = rows_.data();
    init(threads, true);
  }
  CpuIndex(const float* vocab, int64_t V, int64_t d, KnnMetric metric, int threads)
      : V_(V), d_(d), metric_(metric), mk_(sgemm_micro_kernel()), isa_(isa_paths_for(mk_.name)) {
    rows_ptr_ = vocab;
    init(threads, false);
  }

 private:
  // Norms, half squared norms and (pack) the packed rows, from rows_ptr_.
  void init(int threads, bool pack) {
    const int64_t V = V_, d = d_;
    if (V <= 0 || d <= 0) throw std::invalid_argument("vocab: expected at least one row of dimension >= 1");
    if (mk_.nr > kMaxPanelRows) throw std::logic_error("kNN: a micro-kernel panel wider than 64 rows");
    if (V > std::numeric_limits<int32_t>::max() - 1)
      throw std::out_of_range("vocab: more than 2^31 - 2 rows");
    norms_.resize(V);
    half_sq_ = aligned_array<float>(static_cast<size_t>(V));
    float* half_sq = half_sq_.get();
    const float* vocab = rows_ptr_;
    double vmax = 0.0;
    int64_t first_bad = V;
    // The norms are the rows' check too (knn_check_rows, without a second pass over them): a non-finite
    // value makes a norm NaN or infinite.
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max                   \
                                                                         : vmax) reduction(min \
                                                                                           : first_bad)
    for (int64_t r = 0; r < V; ++r) {
      const double n2 = dot_f64(vocab + r * d, vocab + r * d, d), n = std::sqrt(n2);
      norms_[r] = n;
      half_sq[r] = n < kKnnMaxNorm ? static_cast<float>(0.5 * n2) : 0.0f;  // (no out-of-range cast)
      vmax = std::max(vmax, n);
      if (!(n < kKnnMaxNorm)) first_bad = std::min(first_bad, r);
    }
    if (first_bad < V) throw std::invalid_argument("vocab: " + knn_row_problem(vocab, first_bad, d));
    if (pack) {
      const int64_t nr = mk_.nr, panels = (V + nr - 1) / nr;
      packed_ = aligned_array<float>(static_cast<size_t>(panels * nr * d));
      float* packed = packed_.get();
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t p = 0; p < panels; ++p)  // panel by panel: scaled while it is in L2
        pack_screen_rows(p * nr, std::min(nr, V - p * nr), 0, d, packed + p * nr * d);
    }
    vmax_ = vmax;
  }

 public:
  int64_t rows() const override {
    return V_;
  }
  int64_t dim() const override {
    return d_;
  }
  KnnMetric metric() const override {
    return metric_;
  }
  const char* backend() const override {
    return "cpu";
  }
  int64_t host_bytes() const override {
    const int64_t panels = (V_ + mk_.nr - 1) / mk_.nr;
    return (packed_ ? (V_ * d_ + panels * mk_.nr * d_) * 4 : 0) + V_ * 4 + V_ * 8;
  }
  int64_t device_bytes() const override {
    return 0;
  }
  const float* row(int64_t r) const override {
    return rows_ptr_ + r * d_;
  }

  KnnResult search(const float* queries, int64_t Q, int64_t k, const int32_t* exclude,
                   int threads) const override {
    const int64_t available = V_ - (exclude ? 1 : 0);
    threads = std::max(1, threads);
    KnnResult res;
    std::vector<double> q_norms;
    std::vector<int64_t> pending =
        knn_search_begin(res, q_norms, queries, Q, V_, d_, k, metric_, exclude, threads);
    int64_t c = candidate_count(k);
    bool first = true;
    while (!pending.empty()) {
      if (c >= available || buffer_capacity(c) > (int64_t{1} << 30)) {  // (int32 sizes in CandBuf)
        exact_subset(pending, queries, q_norms, k, exclude, threads, &res);
        break;
      }
      std::vector<int64_t> failed;
      // Bound the candidate buffers (threads x chunk x capacity entries) to about 64 MiB.
      const int64_t chunk =
          std::clamp<int64_t>((int64_t{1} << 23) / (int64_t{threads} * buffer_capacity(c)), mk_.mr, 4096);
      for (size_t b = 0; b < pending.size(); b += chunk) {
        const size_t e = std::min(pending.size(), b + static_cast<size_t>(chunk));
        std::vector<int64_t> part(pending.begin() + b, pending.begin() + e);
        screen(part, queries, q_norms, k, c, exclude, threads, &res, &failed);
      }
      pending.swap(failed);
      // Those the first round could not certify (later rounds hold a subset of them).
      if (first) res.recovered_queries = static_cast<int64_t>(pending.size());
      c *= 4;
      first = false;
    }
    return res;
  }

 private:
  // Screens the queries `part` with c candidates each, re-scores, writes the certified results and appends
  // the queries that could not be certified to `failed`.
  void screen(const std::vector<int64_t>& part, const float* queries, const std::vector<double>& q_norms,
              int64_t k, int64_t c, const int32_t* exclude, int threads, KnnResult* res,
              std::vector<int64_t>* failed) const {
    const int64_t n = static_cast<int64_t>(part.size()), d = d_, mr = mk_.mr, nr = mk_.nr, KC = mk_.kc;
    const int64_t a_panels = (n + mr - 1) / mr;
    // A-panels: query panel ip holds queries [ip*mr, ip*mr + mr) as d x mr, k-major (normalised for cosine).
    thread_local Scratch packed_q_store;
    float* Ap_all = scratch<float>(packed_q_store, static_cast<size_t>(a_panels * mr * d));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ip = 0; ip < a_panels; ++ip) {
      float* dst = Ap_all + ip * mr * d;
      for (int64_t r = 0; r < mr; ++r) {
        const int64_t t = ip * mr + r;
        if (t >= n) {
          for (int64_t kk = 0; kk < d; ++kk) dst[kk * mr + r] = 0.0f;
          continue;
        }
        const float* src = queries + part[t] * d;
        if (metric_ == KnnMetric::Cosine) {
          const double inv = 1.0 / q_norms[part[t]];
          for (int64_t kk = 0; kk < d; ++kk) dst[kk * mr + r] = static_cast<float>(src[kk] * inv);
        } else {
          for (int64_t kk = 0; kk < d; ++kk) dst[kk * mr + r] = src[kk];
        }
      }
    }
    // Cache blocks: MC queries x NC rows. The MC queries' A-panels (MC x d) and the score tile (MC x NC) stay
    // in L2 (budget PRIORTUNE_KNN_L2_KIB, default 768 KiB) while the rows stream past once per query block;
    // query blocks are balanced so that a 160-query batch is one block, not 128 + 32.
    const int64_t NC = std::max<int64_t>(nr, (256 / nr) * nr);
    static const int64_t l2_bytes = [] {
      const char* env = std::getenv("PRIORTUNE_KNN_L2_KIB");
      return (env ? std::max(64L, std::atol(env)) : 768L) * 1024;
    }();
    const int64_t mc_max = std::clamp<int64_t>(l2_bytes / (4 * (d + NC)) / mr * mr, mr, 512);
    const int64_t q_blocks = (n + mc_max - 1) / mc_max;
    const int64_t MC = ((n + q_blocks - 1) / q_blocks + mr - 1) / mr * mr;
    const int64_t v_panels = (V_ + nr - 1) / nr;
    const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, v_panels)));
    const int64_t cap = buffer_capacity(c);
    thread_local Scratch value_scratch, index_scratch;
    float* value_store = scratch<float>(value_scratch, static_cast<size_t>(T * n * cap));
    int32_t* index_store = scratch<int32_t>(index_scratch, static_cast<size_t>(T * n * cap));
    std::vector<CandBuf> bufs(static_cast<size_t>(T) * n);
    for (int64_t i = 0; i < T * n; ++i)
      bufs[i] = CandBuf{value_store + i * cap,     index_store + i * cap,   0,
                        static_cast<int32_t>(cap), static_cast<int32_t>(c), kNegInf};
    const float* sub = metric_ == KnnMetric::L2 ? half_sq_.get() : nullptr;
    const float* packed = packed_.get();
    const auto kernel = mk_.run;
    std::atomic<bool> oom{false};

#pragma omp parallel num_threads(T)
    {
      const int t = thread_id(), parts = team_size();
      int64_t p0, p1;
      split_range(v_panels, parts, t, 1, &p0, &p1);
      thread_local Scratch tile_store, bpack_store, cut_store;
      float* S = nullptr;
      float* bpack = nullptr;
      float* cut_tmp = nullptr;
      try {
        S = scratch<float>(tile_store, static_cast<size_t>(MC * NC));
        cut_tmp = scratch<float>(cut_store, static_cast<size_t>(cap));
        if (!packed) bpack = scratch<float>(bpack_store, static_cast<size_t>(KC * NC));
      } catch (...) {
        oom = true;
      }
      if (S && cut_tmp && (packed || bpack) && p0 < p1) {
        CandBuf* my_bufs = bufs.data() + static_cast<size_t>(t) * n;
        for (int64_t ic = 0; ic < a_panels; ic += MC / mr) {
          const int64_t mp = std::min<int64_t>(MC / mr, a_panels - ic);
          for (int64_t jc = p0; jc < p1; jc += NC / nr) {
            const int64_t np = std::min<int64_t>(NC / nr, p1 - jc);
            const int64_t row0 = jc * nr, ncols = std::min<int64_t>(np * nr, V_ - row0);
            for (int64_t pc = 0; pc < d; pc += KC) {
              const int64_t kc = std::min<int64_t>(KC, d - pc);
              const float beta = pc == 0 ? 0.0f : 1.0f;
              if (!packed)
                pack_screen_rows(row0, ncols, pc, kc, bpack);  // borrowed rows: pack this block now
              for (int64_t jp = 0; jp < np; ++jp) {
                const float* Bp = packed ? packed + (jc + jp) * nr * d + pc * nr : bpack + jp * kc * nr;
                const int ncol = static_cast<int>(std::min<int64_t>(nr, V_ - (jc + jp) * nr));
                // The slice used next (kc x nr: the next panel, else this block's first panel at the next
                // k-slice, else the next block's first panel) is fetched into L2 while the query panels pass
                // over this one, where there are enough of them to hide it (at 160 x 50257 x 768: about 7%
                // faster). With few queries the search is bound by reading the rows, and the prefetches only
                // cost (20 x 128256 x 2048: 6% slower with them).
                const float* Bn = nullptr;
                int64_t bn_floats = 0;
                if (packed && mp >= 8) {
                  if (jp + 1 < np) {
                    Bn = packed + (jc + jp + 1) * nr * d + pc * nr;
                    bn_floats = kc * nr;
                  } else if (pc + KC < d) {
                    Bn = packed + jc * nr * d + (pc + KC) * nr;
                    bn_floats = std::min<int64_t>(KC, d - pc - KC) * nr;
                  } else if (jc + np < p1) {
                    Bn = packed + (jc + np) * nr * d;
                    bn_floats = std::min<int64_t>(KC, d) * nr;
                  }
                }
                const int64_t bn_step = ((bn_floats + mp - 1) / mp + 15) / 16 * 16;
                int64_t bn = 0;
                for (int64_t ip = 0; ip < mp; ++ip) {
                  for (const int64_t e = std::min(bn_floats, bn + bn_step); bn < e; bn += 16)
                    _mm_prefetch(reinterpret_cast<const char*>(Bn + bn), _MM_HINT_T1);
                  const float* Ap = Ap_all + (ic + ip) * mr * d + pc * mr;
                  const int mrow = static_cast<int>(std::min<int64_t>(mr, n - (ic + ip) * mr));
                  kernel(kc, Ap, Bp, S + ip * mr * NC + jp * nr, NC, mrow, ncol, 1.0f, beta);
                }
              }
            }
            const int64_t q_end = std::min<int64_t>(n, (ic + mp) * mr);
            for (int64_t qi = ic * mr; qi < q_end; ++qi) {
              const int32_t excl = exclude ? exclude[part[qi]] : -1;
              isa_.scan(S + (qi - ic * mr) * NC, sub ? sub + row0 : nullptr, ncols,
                        static_cast<int32_t>(row0), excl, &my_bufs[qi], cut_tmp);
            }
          }
          // Leave the merge little more than c per thread to rank.
          for (int64_t qi = ic * mr; qi < std::min<int64_t>(n, (ic + mp) * mr); ++qi) {
            CandBuf* b = &my_bufs[qi];
            if (b->size > b->keep + 16) cut(b, cut_tmp, b->keep + 16, isa_.keep_above);
          }
        }
      }
    }
    if (oom) throw std::bad_alloc();
    merge(part, queries, q_norms, k, c, bufs, T, threads, res, failed);
  }

  // Merges each query's candidate buffers, re-scores in float64, ranks and certifies (see the header
  // comment). The pooled candidates are cut (as the buffers are) to the best want = k + 8 screening values,
  // up to 16 more; those are re-scored. A row not re-scored has s <= left + err, left = the larger of that
  // cut and the buffers' thresholds B; so once the k-th best re-scored s_k exceeds left + err the top k is
  // final. Where near-ties leave it uncertified, lazy_merge re-scores more of the pool.
  //
  // Re-scoring reads each candidate's row, V x d floats in all: with many candidates per row (at k = 1024,
  // 160 queries and 8192 rows, twenty) it goes row by row, each row read once for all the queries that kept
  // it (by query it read a row per candidate from L3, and took a quarter of the search waiting on them); with
  // few it goes query by query, four rows at a time. Both compute each value by the same dots4 sums, in
  // which the row and the query may swap roles: the same bits either way.
  void merge(const std::vector<int64_t>& part, const float* queries, const std::vector<double>& q_norms,
             int64_t k, int64_t c, const std::vector<CandBuf>& bufs, int T, int threads, KnnResult* res,
             std::vector<int64_t>* failed) const {
    const int64_t n = static_cast<int64_t>(part.size()), d = d_, want = k + 8, W = want + 16;
    const int64_t pool_cap = T * (c + 16);  // each buffer holds at most c + 16 after the final cut
    thread_local Scratch sel_store, count_store, pool_n_store, left_store, m_store, s_store;
    int32_t* sel = scratch<int32_t>(sel_store, static_cast<size_t>(n * W));  // query qi's rows: [qi * W, ...)
    int32_t* sel_n = scratch<int32_t>(count_store, static_cast<size_t>(n));  // how many (-1: too few)
    int32_t* pool_n = scratch<int32_t>(pool_n_store, static_cast<size_t>(n));  // of how many pooled
    double* left = scratch<double>(left_store, static_cast<size_t>(n));
    double* ms = scratch<double>(m_store, static_cast<size_t>(n * W));  // their m and s, same slots
    double* ss = scratch<double>(s_store, static_cast<size_t>(n * W));
    std::atomic<bool> merge_oom{false};
    const KeepAbove keep_above = isa_.keep_above;
#pragma omp parallel num_threads(threads)
    {
      thread_local Scratch pool_a_store, pool_i_store, pool_tmp_store;
      float *pa = nullptr, *tmp = nullptr;
      int32_t* pi = nullptr;
      try {
        pa = scratch<float>(pool_a_store, static_cast<size_t>(pool_cap));
        pi = scratch<int32_t>(pool_i_store, static_cast<size_t>(pool_cap));
        tmp = scratch<float>(pool_tmp_store, static_cast<size_t>(pool_cap));
      } catch (...) {
        merge_oom = true;
      }
#pragma omp for schedule(dynamic, 4)
      for (int64_t qi = 0; qi < n; ++qi) {
        sel_n[qi] = -1;
        if (!tmp) continue;
        int32_t size = 0;
        float bound = kNegInf;  // stays -inf where no thread dropped a row
        for (int tt = 0; tt < T; ++tt) {
          const CandBuf& b = bufs[static_cast<size_t>(tt) * n + qi];
          std::copy(b.a, b.a + b.size, pa + size);
          std::copy(b.i, b.i + b.size, pi + size);
          size += b.size;
          bound = std::max(bound, b.thr);
        }
        if (size < k) continue;  // cannot happen (each thread keeps min(c, its rows) >= k in all); retry
        CandBuf pool{pa,
                     pi,
                     size,
                     static_cast<int32_t>(std::min<int64_t>(pool_cap, std::numeric_limits<int32_t>::max())),
                     static_cast<int32_t>(want),
                     kNegInf};
        if (size > W) {
          cut(&pool, tmp, static_cast<int32_t>(W), keep_above);
          bound = std::max(bound, pool.thr);
        }
        std::copy(pi, pi + pool.size, sel + qi * W);
        sel_n[qi] = pool.size;
        pool_n[qi] = size;
        left[qi] = bound;
      }
    }
    if (merge_oom) throw std::bad_alloc();

    int64_t pairs = 0;
    for (int64_t qi = 0; qi < n; ++qi) pairs += std::max(0, sel_n[qi]);
    if (rescore_by_rows(pairs, n)) {
      // The queries widened to double once (they stay in L2 while the rows pass), and a counting sort of the
      // slots by row: row r's are order[start[r - 1], start[r]) (start[-1] = 0).
      thread_local Scratch start_store, order_store, wide_store;
      int32_t* start = scratch<int32_t>(start_store, static_cast<size_t>(V_ + 1));
      int32_t* order = scratch<int32_t>(order_store, static_cast<size_t>(pairs));
      double* wide = scratch<double>(wide_store, static_cast<size_t>(n * d));
      for (int64_t qi = 0; qi < n; ++qi)
        std::copy(queries + part[qi] * d, queries + part[qi] * d + d, wide + qi * d);
      std::fill(start, start + V_ + 1, 0);
      for (int64_t qi = 0; qi < n; ++qi)
        for (int32_t j = 0; j < sel_n[qi]; ++j) ++start[sel[qi * W + j] + 1];
      for (int64_t r = 0; r < V_; ++r) start[r + 1] += start[r];
      for (int64_t qi = 0; qi < n; ++qi)
        for (int32_t j = 0; j < sel_n[qi]; ++j)
          order[start[sel[qi * W + j]]++] = static_cast<int32_t>(qi * W + j);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 64)
      for (int64_t r = 0; r < V_; ++r) {
        const int32_t e1 = start[r];
        for (int32_t e = r == 0 ? 0 : start[r - 1]; e < e1; e += 4) {
          const int count = std::min(4, e1 - e);
          const double* qv[4];
          for (int j = 0; j < 4; ++j) qv[j] = wide + order[e + std::min(j, count - 1)] / W * d;
          double dot[4], dist2[4] = {};
          isa_.dots4.fd(rows_ptr_ + r * d, qv, d, dot, metric_ == KnnMetric::L2 ? dist2 : nullptr);
          for (int j = 0; j < count; ++j) {
            const int32_t slot = order[e + j];
            const Exact x = exact_from(metric_, dot[j], dist2[j], q_norms[part[slot / W]], norms_[r]);
            ms[slot] = x.m;
            ss[slot] = x.s;
          }
        }
      }
    } else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
      for (int64_t qi = 0; qi < n; ++qi) {
        const int64_t q = part[qi];
        for (int32_t j = 0; j < sel_n[qi]; j += 4) {
          const int count = std::min(4, sel_n[qi] - j);
          Exact x[4];
          exact_scores(isa_.dots4.ff, metric_, queries + q * d, q_norms[q], rows_ptr_, norms_.data(), d,
                       sel + qi * W + j, count, x);
          for (int t = 0; t < count; ++t) {
            ms[qi * W + j + t] = x[t].m;
            ss[qi * W + j + t] = x[t].s;
          }
        }
      }
    }

    std::vector<char> ok(n, 0);
#pragma omp parallel num_threads(threads)
    {
      thread_local Scratch ranked_store;
      thread_local LazyMerge lazy;  // (its vectors keep their capacity from search to search)
      Ranked* ranked = nullptr;
      bool ready = false;
      try {
        ranked = scratch<Ranked>(ranked_store, static_cast<size_t>(4 * c));  // two arrays of 2c >= W
        lazy.reserve(pool_cap, 2 * c);
        ready = true;
      } catch (...) {
        merge_oom = true;
      }
#pragma omp for schedule(dynamic, 4)
      for (int64_t qi = 0; qi < n; ++qi) {
        if (!ready || sel_n[qi] < 0) continue;
        const int64_t q = part[qi], count = sel_n[qi];
        for (int64_t j = 0; j < count; ++j)
          ranked[j] = {rank_key(metric_, ms[qi * W + j]), sel[qi * W + j], static_cast<int32_t>(qi * W + j)};
        rank_sort(ranked, ranked + 2 * c, count);
        double s_k = std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < k; ++t) s_k = std::min(s_k, ss[ranked[t].slot]);
        const double err = screening_error(metric_, d, q_norms[q], vmax_);
        if (left[qi] == -std::numeric_limits<double>::infinity() || s_k > left[qi] + err) {
          for (int64_t t = 0; t < k; ++t) {
            res->indices[q * k + t] = ranked[t].i;
            res->scores[q * k + t] = returned_score(metric_, ms[ranked[t].slot]);
          }
          ok[qi] = 1;
        } else if (count < std::min<int64_t>(pool_n[qi], 2 * c)) {  // (else it would score the same again)
          ok[qi] =
              lazy_merge(qi, n, q, queries + q * d, q_norms[q], k, c, bufs, T, 2 * count, &lazy, ranked, res);
        }
      }
      if (lazy.cands.capacity() * sizeof(Cand) > (size_t{16} << 20)) lazy = LazyMerge();  // (as Scratch caps)
    }
    if (merge_oom) throw std::bad_alloc();
    for (int64_t qi = 0; qi < n; ++qi)
      if (!ok[qi]) failed->push_back(part[qi]);
  }

  // Re-scoring by rows pays where there are several candidates per row and the n queries, in double, stay in
  // L2 (1 MiB of them at most). PRIORTUNE_KNN_RESCORE = rows or queries forces either way, for tests (read
  // per search, from the worker thread: set it only while no search is running).
  bool rescore_by_rows(int64_t pairs, int64_t n) const {
    const char* env = std::getenv("PRIORTUNE_KNN_RESCORE");
    if (env && !std::strcmp(env, "rows")) return true;
    if (env && !std::strcmp(env, "queries")) return false;
    return pairs >= 2 * V_ && n * d_ * 8 <= (int64_t{1} << 20);
  }

  // The lazy merge's working space, reserved before the loop: no allocation inside the parallel region
  // (re-scores from scratch: it runs rarely).
  struct LazyMerge {
    struct Scored {
      double m, s;
      int32_t i;
    };
    std::vector<Cand> cands;
    std::vector<Scored> scored;
    void reserve(int64_t pool, int64_t scored_max) {
      cands.reserve(static_cast<size_t>(pool));
      scored.reserve(static_cast<size_t>(scored_max));
    }
  };

  // The merge of one query where the first re-scoring did not certify: pools the buffers again, keeps the
  // best 2c (the rest count as dropped), and re-scores the best `want` screening values, doubling until the
  // top k is certified or all 2c are scored (then false: the query is searched again with more candidates).
  // ranked: 4c entries of scratch.
  bool lazy_merge(int64_t qi, int64_t n, int64_t q, const float* qv, double q_norm, int64_t k, int64_t c,
                  const std::vector<CandBuf>& bufs, int T, int64_t want, LazyMerge* lm, Ranked* ranked,
                  KnnResult* res) const {
    auto& cands = lm->cands;
    auto& scored = lm->scored;
    cands.clear();
    scored.clear();
    double bound = -std::numeric_limits<double>::infinity();
    for (int tt = 0; tt < T; ++tt) {
      const CandBuf& b = bufs[static_cast<size_t>(tt) * n + qi];
      for (int32_t r = 0; r < b.size; ++r) cands.push_back({b.a[r], b.i[r]});
      bound = std::max(bound, static_cast<double>(b.thr));
    }
    const auto higher = [](const Cand& x, const Cand& y) { return x.a > y.a; };
    if (static_cast<int64_t>(cands.size()) > 2 * c) {
      std::nth_element(cands.begin(), cands.begin() + (2 * c - 1), cands.end(), higher);
      bound = std::max(bound, static_cast<double>(cands[2 * c - 1].a));
      cands.resize(2 * c);
    }
    const int64_t total = static_cast<int64_t>(cands.size());
    const double err = screening_error(metric_, d_, q_norm, vmax_);
    const KnnMetric metric = metric_;
    const auto better = [metric](const LazyMerge::Scored& x, const LazyMerge::Scored& y) {
      return ranks_before(metric, x.m, x.i, y.m, y.i);
    };
    int64_t done = 0;
    want = std::min(total, want);
    for (;;) {
      // The best `want` screening values to [0, want) (those from `done` on are scored now), the best of
      // the rest to `want`: selections, not a sort.
      if (want < total) std::nth_element(cands.begin() + done, cands.begin() + want, cands.end(), higher);
      for (; done < want; done += 4) {
        const int count = static_cast<int>(std::min<int64_t>(4, want - done));
        int32_t ids[4];
        Exact x[4];
        for (int j = 0; j < count; ++j) ids[j] = cands[done + j].i;
        exact_scores(isa_.dots4.ff, metric_, qv, q_norm, rows_ptr_, norms_.data(), d_, ids, count, x);
        for (int j = 0; j < count; ++j) scored.push_back({x[j].m, x[j].s, ids[j]});
      }
      done = want;
      std::nth_element(scored.begin(), scored.begin() + (k - 1), scored.end(), better);  // the best k first
      double s_k = std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < k; ++t) s_k = std::min(s_k, scored[t].s);
      const double next =
          done < total ? static_cast<double>(cands[done].a) : -std::numeric_limits<double>::infinity();
      const double limit = std::max(next, bound);
      if (limit == -std::numeric_limits<double>::infinity() || s_k > limit + err) break;
      if (done == total) return false;
      want = std::min(total, 2 * want);
    }
    for (int64_t t = 0; t < k; ++t)
      ranked[t] = {rank_key(metric_, scored[t].m), scored[t].i, static_cast<int32_t>(t)};
    rank_sort(ranked, ranked + 2 * c, k);
    for (int64_t t = 0; t < k; ++t) {
      res->indices[q * k + t] = ranked[t].i;
      res->scores[q * k + t] = returned_score(metric_, scored[ranked[t].slot].m);
    }
    return true;
  }

  void exact_subset(const std::vector<int64_t>& part, const float* queries,
                    const std::vector<double>& q_norms, int64_t k, const int32_t* exclude, int threads,
                    KnnResult* res) const {
    (void)q_norms;
    std::vector<int32_t> idx(k);
    std::vector<float> sc(k);
    for (int64_t q : part) {
      int32_t ex = exclude ? exclude[q] : -1;
      knn_exact_scan(idx.data(), sc.data(), queries + q * d_, 1, rows_ptr_, norms_.data(), V_, d_, k, metric_,
                     exclude ? &ex : nullptr, threads);
      std::copy(idx.begin(), idx.end(), res->indices.begin() + q * k);
      std::copy(sc.begin(), sc.end(), res->scores.begin() + q * k);
    }
  }

  int64_t V_, d_;
  KnnMetric metric_;
  SgemmMicroKernel mk_;
  IsaPaths isa_;
  // The fp32 screening copy of a row is row * screen_scale(|row|) (rounded): normalised for cosine.
  double screen_scale(double norm) const {
    return metric_ == KnnMetric::Cosine ? (norm > 0.0 ? 1.0 / norm : 0.0) : 1.0;
  }

  // Packs rows [r0, r0 + count), columns [k0, k0 + kc), as the kernel's B panels (kc x nr each, at out +
  // p * nr * kc) of screening copies: by the GEMM's packing (register transposes), then, for cosine, each
  // value times its row's scale 1/|v| (a double) in float64 arithmetic, rounded to float: the bits the
  // index has always had.
  void pack_screen_rows(int64_t r0, int64_t count, int64_t k0, int64_t kc, float* out) const {
    const int64_t nr = mk_.nr;
    mk_.pack_rows(rows_ptr_, d_, r0, count, k0, kc, static_cast<int>(nr), out);
    if (metric_ != KnnMetric::Cosine) return;
    double scale[kMaxPanelRows];  // (init() checks nr)
    for (int64_t p = 0; p < count; p += nr) {
      for (int64_t j = 0; j < nr; ++j) scale[j] = p + j < count ? screen_scale(norms_[r0 + p + j]) : 0.0;
      isa_.scale_panel(out + p * kc, kc, nr, scale);
    }
  }

  HostFloats rows_;                       // empty when borrowing
  AlignedArray<float> packed_, half_sq_;  // packed_ is empty when borrowing
  const float* rows_ptr_ = nullptr;
  std::vector<double> norms_;
  double vmax_ = 0.0;
};

}  // namespace

std::unique_ptr<KnnIndex> knn_index_cpu(const float* vocab, int64_t V, int64_t d, KnnMetric metric,
                                        int threads) {
  if (V <= 0 || d <= 0) throw std::invalid_argument("vocab: expected at least one row of dimension >= 1");
  return knn_index_cpu(host_copy(vocab, static_cast<size_t>(V * d), threads), d, metric, threads);
}

std::unique_ptr<KnnIndex> knn_index_cpu(HostFloats&& vocab, int64_t d, KnnMetric metric, int threads) {
  return std::make_unique<CpuIndex>(std::move(vocab), d, metric, std::max(1, threads));
}

std::unique_ptr<KnnIndex> knn_index_cpu_borrowed(const float* vocab, int64_t V, int64_t d, KnnMetric metric,
                                                 int threads) {
  return std::make_unique<CpuIndex>(vocab, V, d, metric, std::max(1, threads));
}

std::vector<int64_t> knn_search_begin(KnnResult& res, std::vector<double>& q_norms, const float* queries,
                                      int64_t Q, int64_t V, int64_t d, int64_t k, KnnMetric metric,
                                      const int32_t* exclude, int threads) {
  const int64_t available = V - (exclude ? 1 : 0);
  if (k < 1 || k > kKnnMaxK || k > available)
    throw std::out_of_range("k: expected an integer from 1 to " +
                            std::to_string(std::min(kKnnMaxK, available)) +
                            " (at most 1024 and at most the number of rows" +
                            (exclude ? std::string(" other than the query's own") : std::string()) +
                            "), got " + std::to_string(k));
  res.indices.assign(static_cast<size_t>(Q * k), -1);
  res.scores.assign(static_cast<size_t>(Q * k), 0.0f);
  q_norms.resize(Q);
  knn_row_norms(q_norms.data(), queries, Q, d, threads);
  for (int64_t q = 0; q < Q; ++q)
    if (!(q_norms[q] < kKnnMaxNorm)) throw std::out_of_range("queries: a row norm is 1e18 or more");
  std::vector<int64_t> pending;
  pending.reserve(Q);
  for (int64_t q = 0; q < Q; ++q) {
    if (metric == KnnMetric::Cosine && q_norms[q] == 0.0) {
      int32_t r = 0;
      for (int64_t t = 0; t < k; ++t, ++r) {
        if (exclude && r == exclude[q]) ++r;
        res.indices[q * k + t] = r;
      }
      continue;
    }
    pending.push_back(q);
  }
  return pending;
}

void knn_row_norms(double* norms, const float* x, int64_t n, int64_t d, int threads) {
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static) if (n * d > 65536)
  for (int64_t r = 0; r < n; ++r) norms[r] = std::sqrt(dot_f64(x + r * d, x + r * d, d));
}

std::string knn_check_rows(const float* x, int64_t n, int64_t d, int threads) {
  int64_t first_bad = n;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static) \
    reduction(min                                                           \
              : first_bad) if (n * d > 65536)
  for (int64_t r = 0; r < n; ++r) {
    // NaN or infinity in a row makes its squared norm NaN or infinite (finite floats cannot overflow a
    // double).
    const double n2 = dot_f64(x + r * d, x + r * d, d);
    if (!(std::sqrt(n2) < kKnnMaxNorm)) first_bad = std::min(first_bad, r);
  }
  return first_bad == n ? "" : knn_row_problem(x, first_bad, d);
}

std::string knn_row_problem(const float* x, int64_t r, int64_t d) {
  const float* row = x + r * d;
  for (int64_t k = 0; k < d; ++k)
    if (!std::isfinite(row[k]))
      return "row " + std::to_string(r) + " has a non-finite value (" +
             (std::isnan(row[k]) ? "NaN" : (row[k] > 0 ? "Infinity" : "-Infinity")) + ") at column " +
             std::to_string(k);
  return "row " + std::to_string(r) + " has a norm of 1e18 or more, which fp32 screening cannot represent";
}

bool knn_dots4_test(const std::string& isa, bool y_double, const float* x, const float* y, int64_t n,
                    double* out) {
  if (isa != "avx512" && isa != "avx2" && isa != "generic")
    throw std::invalid_argument("isa: expected \"avx512\", \"avx2\" or \"generic\", got \"" + isa + "\"");
  if (!sgemm_kernel_supported(isa.c_str())) return false;
  const Dots4Paths paths = isa_paths_for(isa.c_str()).dots4;
  if (y_double) {
    const std::vector<double> wide(y, y + 4 * n);
    const double* yd[4] = {wide.data(), wide.data() + n, wide.data() + 2 * n, wide.data() + 3 * n};
    paths.fd(x, yd, n, out, nullptr);
    paths.fd(x, yd, n, out + 4, out + 8);
  } else {
    const float* yf[4] = {y, y + n, y + 2 * n, y + 3 * n};
    paths.ff(x, yf, n, out, nullptr);
    paths.ff(x, yf, n, out + 4, out + 8);
  }
  for (int j = 0; j < 4; ++j) out[12 + j] = dot_f64(x, y + j * n, n);
  return true;
}

void knn_exact_scan(int32_t* indices, float* scores, const float* queries, int64_t Q, const float* vocab,
                    const double* row_norms, int64_t V, int64_t d, int64_t k, KnnMetric metric,
                    const int32_t* exclude, int threads) {
  struct Item {
    double m;
    int32_t i;
  };
  auto before = [metric](const Item& a, const Item& b) { return ranks_before(metric, a.m, a.i, b.m, b.i); };
  const Dots4<float> dots4 = isa_paths_for(sgemm_kernel_name()).dots4.ff;  // (the same bits with any)
  threads = std::max(1, threads);
  for (int64_t q = 0; q < Q; ++q) {
    const float* qv = queries + q * d;
    const double qn = std::sqrt(dot_f64(qv, qv, d));
    const int32_t excl = exclude ? exclude[q] : -1;
    std::vector<std::vector<Item>> parts(threads);
    std::atomic<bool> oom{false};
#pragma omp parallel num_threads(threads)
    {
      const int t = thread_id();
      int64_t b, e;
      split_range(V, team_size(), t, 1, &b, &e);
      std::vector<Item> heap;  // max-heap under `before`: the root is the worst kept item
      try {
        heap.reserve(k + 1);  // (then no push below allocates: no exception may leave the region)
      } catch (...) {
        oom = true;
        e = b;
      }
      for (int64_t r0 = b; r0 < e; r0 += 4) {
        const int count = static_cast<int>(std::min<int64_t>(4, e - r0));
        int32_t ids[4];
        Exact x[4];
        for (int j = 0; j < count; ++j) ids[j] = static_cast<int32_t>(r0 + j);
        exact_scores(dots4, metric, qv, qn, vocab, row_norms, d, ids, count, x);
        for (int j = 0; j < count; ++j) {
          const int64_t r = r0 + j;
          if (r == excl) continue;
          const Item it{x[j].m, static_cast<int32_t>(r)};
          if (static_cast<int64_t>(heap.size()) < k) {
            heap.push_back(it);
            std::push_heap(heap.begin(), heap.end(), before);
          } else if (before(it, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), before);
            heap.back() = it;
            std::push_heap(heap.begin(), heap.end(), before);
          }
        }
      }
      parts[t] = std::move(heap);
    }
    if (oom) throw std::bad_alloc();
    std::vector<Item> all;
    for (auto& p : parts) all.insert(all.end(), p.begin(), p.end());
    const int64_t kk = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + kk, all.end(), before);
    for (int64_t t = 0; t < k; ++t) {
      indices[q * k + t] = t < kk ? all[t].i : -1;
      scores[q * k + t] = t < kk ? returned_score(metric, all[t].m) : 0.0f;
    }
  }
}

}  // namespace pt
