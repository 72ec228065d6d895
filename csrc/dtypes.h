// Element types the kernels accept, as small integer codes shared with Python (exposed as _C.dtypes).
// Host-only: bindings.cpp includes it; the device-side types and conversions are in dtype_convert.cuh.
#pragma once

#include <cstdint>

namespace sslkernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

inline bool valid_dtype(int code) { return code >= 0 && code <= 3; }

}  // namespace sslkernels
