// What native/knn.cpp shares with the other native modules: the index behind a NativeKnnIndex, and reading
// rows of an index into JS.
#pragma once
#include <napi.h>

#include <memory>

#include "priortune/knn.h"

namespace ptn {

// The index of a built NativeKnnIndex (throws "Index is disposed" after dispose()), or nullptr when v is not
// a NativeKnnIndex. Holding the pointer keeps the index alive after a dispose().
std::shared_ptr<const pt::KnnIndex> knn_index_of(const Napi::Value& v);

// rowsAt(ids: Int32Array) -> Float32Array [ids.length, dim]: the listed rows of `index`, copied (a RangeError
// names an id outside its rows).
Napi::Value knn_rows_at(const Napi::CallbackInfo& info, const pt::KnnIndex& index);

}  // namespace ptn
