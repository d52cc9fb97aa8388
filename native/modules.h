// Each native module adds its functions and classes to the addon's exports.
#pragma once
#include <napi.h>

namespace ptn {
void init_system(Napi::Env env, Napi::Object exports);  // system.cpp: backend probe, threads, GEMM, peak
void init_model(Napi::Env env, Napi::Object exports);   // model.cpp: the frozen language model
void init_ops(Napi::Env env,
              Napi::Object exports);  // ops.cpp: single CPU ops, for the finite-difference tests
void init_knn(Napi::Env env,
              Napi::Object exports);  // knn.cpp: exact nearest-neighbour index, collapse linear algebra
void init_priors(Napi::Env env, Napi::Object exports);    // priors.cpp: Gaussian priors, regularisers
void init_analysis(Napi::Env env, Napi::Object exports);  // analysis.cpp: eigen, distances, Gaussian traces
}  // namespace ptn
