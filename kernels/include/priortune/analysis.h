// Float64 linear algebra behind the activation and prompt analyses (lib/analysis.ts, lib/projection.ts): the
// symmetric eigen-decomposition (exact PCA, the matrix square root of the Frechet distance), the two traces
// of the Gaussian distances, and pairwise squared distances (MMD, k-means, t-SNE/UMAP neighbours).
//
// Memory contract: row-major throughout; every output is overwritten (=), inputs are only read. Results are
// deterministic for a fixed thread count; the eigen-decomposition and the traces do not depend on it at all
// (every output element is computed by one thread in a fixed order).
#pragma once
#include <cstdint>

namespace pt {

// Eigen-decomposition of a symmetric a[d, d] (both triangles read; the caller symmetrises). values[d] (=),
// descending; when vectors is not null, vectors[d, d] (=) with row k the unit eigenvector of values[k] (sign:
// its largest-magnitude component is positive, so the result does not depend on rounding noise in the sign).
// Householder tridiagonalisation and implicit QL (the EISPACK tred2/tql2 pair, as in JAMA), O(d^3); the QL
// rotations of each sweep are applied to the eigenvector rows in parallel column blocks. Throws
// std::runtime_error when QL does not converge in 60 sweeps for one eigenvalue.
void analysis_symmetric_eigen(double* values, double* vectors, const double* a, int64_t d, int threads);

// out[na, nb] (=) = |a_i - b_j|^2 for the rows of a[na, d] and b[nb, d] (b may alias a). Both sets are first
// centred on the float64 mean of a's rows (distances do not change; the cancellation in |a|^2 + |b|^2 - 2 a.b
// shrinks to the data's spread), the cross products are one fp32 GEMM and the norms float64; negative values
// from rounding are clamped to 0 and the diagonal of a set against itself is exactly 0.
void analysis_pairwise_sq_distances(double* out, const float* a, int64_t na, const float* b, int64_t nb,
                                    int64_t d, int threads);

// tr sqrt(S1^(1/2) S2 S1^(1/2)) for symmetric positive semi-definite s1[d, d], s2[d, d]: the cross term of
// the Frechet distance (Dowson and Landau 1982). With s1 = V^T D V: the eigenvalues of S1^(1/2) S2 S1^(1/2)
// are those of D^(1/2) (V S2 V^T) D^(1/2), so one eigen-decomposition with vectors, two float64 matrix
// products and one without vectors; negative eigenvalues from rounding count as 0.
double analysis_trace_sqrt_product(const double* s1, const double* s2, int64_t d, int threads);

// tr(S2^-1 S1) = |L2^-1 L1|_F^2 for lower Cholesky factors l1[d, d], l2[d, d] (strict upper triangles zero)
// of S1 = L1 L1^T, S2 = L2 L2^T: the trace term of KL(N1 || N2). Forward substitution on the rows of L1,
// which keeps the lower-triangular shape (d^3 / 6 multiply-adds).
double analysis_trace_inverse_product(const double* l2, const double* l1, int64_t d, int threads);

}  // namespace pt
