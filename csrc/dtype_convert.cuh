// Device-side element types for the dtype codes of dtypes.h: conversions to the arithmetic type and back,
// and a dispatcher from a runtime code to a template argument. For .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtypes.h"

namespace sslkernels {

// Arithmetic type for a stored type: fp32 for every format narrower than fp64 (as the eager reference does).
template <typename T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };

template <typename C> __device__ __forceinline__ C to_compute(float x) { return static_cast<C>(x); }
template <typename C> __device__ __forceinline__ C to_compute(double x) { return static_cast<C>(x); }
template <typename C> __device__ __forceinline__ C to_compute(__half x) { return static_cast<C>(__half2float(x)); }
template <typename C> __device__ __forceinline__ C to_compute(__nv_bfloat16 x) {
  return static_cast<C>(__bfloat162float(x));
}

// Round-to-nearest-even back to the stored type.
template <typename T> struct Store;
template <> struct Store<float> {
  template <typename C> __device__ __forceinline__ static float cast(C x) { return static_cast<float>(x); }
};
template <> struct Store<double> {
  template <typename C> __device__ __forceinline__ static double cast(C x) { return static_cast<double>(x); }
};
template <> struct Store<__half> {
  __device__ __forceinline__ static __half cast(float x) { return __float2half_rn(x); }
};
template <> struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float x) { return __float2bfloat16_rn(x); }
};

// Calls fn(T{}) with the C++ type of a dtype code; false for an unknown code.
template <typename Fn> bool visit_dtype(int code, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: fn(float{}); return true;
    case DType::kFloat16: fn(__half{}); return true;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return true;
    case DType::kFloat64: fn(double{}); return true;
  }
  return false;
}

}  // namespace sslkernels
