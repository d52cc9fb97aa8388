// Entry point of the priortune addon: registers every native module (see modules.h).
#include "modules.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  ptn::init_system(env, exports);
  ptn::init_model(env, exports);
  ptn::init_ops(env, exports);
  ptn::init_knn(env, exports);
  ptn::init_priors(env, exports);
  ptn::init_analysis(env, exports);
  return exports;
}

NODE_API_MODULE(priortune, Init)
