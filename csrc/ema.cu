// Multi-tensor EMA kernel (one launch per (target dtype, source dtype) group; see multi_tensor.h).
#include "cuda_check.h"
#include "dtype_convert.cuh"
#include "ema.h"
#include "multi_tensor.h"

#include <stdexcept>
#include <string>

namespace sslkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per vector access: 16 B of fp32, 8 B of fp16/bf16

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// The momentum is read on the device when it is a tensor (a scheduled momentum stays on the GPU: no
// host sync, CUDA-graph safe). 1 - m is formed in fp64 before rounding, so m close to 1 keeps its weight.
struct Momentum {
  const void* ptr;
  int dtype;
  double value;

  __device__ __forceinline__ double load() const {
    if (ptr == nullptr) return value;
    switch (static_cast<DType>(dtype)) {
      case DType::kFloat64: return *static_cast<const double*>(ptr);
      case DType::kFloat16: return __half2float(*static_cast<const __half*>(ptr));
      case DType::kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(ptr));
      default: return *static_cast<const float*>(ptr);
    }
  }
};

// fma(m, t, w*s), rounded once: m*t is never rounded on its own, so t == s stays a fixed point (as in the
// Triton kernel). Spelled out: nvcc's contraction of m*t + w*s could as well have fused w*s instead.
template <typename C>
__device__ __forceinline__ C ema_step(C m, C w, C t, C s) {
  return fma(m, t, w * s);
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
ema_multi_tensor_kernel(const TensorEntry* __restrict__ tensors, const ChunkEntry* __restrict__ chunks,
                        int64_t chunk_size, Momentum momentum) {
  using C = typename ComputeType<T>::type;
  const ChunkEntry chunk = chunks[blockIdx.x];
  const TensorEntry entry = tensors[chunk.tensor];
  const double m64 = momentum.load();
  const C m = static_cast<C>(m64);
  const C w = static_cast<C>(1.0 - m64);

  T* t = reinterpret_cast<T*>(entry.target_addr);
  const S* s = reinterpret_cast<const S*>(entry.source_addr);
  const int64_t begin = chunk.start;
  const int64_t end = min(begin + chunk_size, entry.numel);

  // Vector path when both base addresses allow it (torch allocations do; views at odd offsets may not).
  // chunk_size is a multiple of kVec, so every chunk of an aligned tensor starts aligned.
  int64_t scalar_from = begin;
  const bool aligned = entry.target_addr % sizeof(Vec<T>) == 0 && entry.source_addr % sizeof(Vec<S>) == 0;
  if (aligned) {
    const int64_t n_vec = (end - begin) / kVec;
    Vec<T>* tv = reinterpret_cast<Vec<T>*>(t + begin);
    const Vec<S>* sv = reinterpret_cast<const Vec<S>*>(s + begin);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      Vec<T> a = tv[i];
      const Vec<S> b = sv[i];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        a.v[k] = Store<T>::cast(ema_step(m, w, to_compute<C>(a.v[k]), to_compute<C>(b.v[k])));
      }
      tv[i] = a;
    }
    scalar_from = begin + n_vec * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    t[i] = Store<T>::cast(ema_step(m, w, to_compute<C>(t[i]), to_compute<C>(s[i])));
  }
}

}  // namespace

void ema_update(const EmaLaunch& a) {
  if (!valid_dtype(a.target_dtype) || !valid_dtype(a.source_dtype)) {
    throw std::invalid_argument("ema_update: unknown dtype code " + std::to_string(a.target_dtype) + "/" +
                                std::to_string(a.source_dtype));
  }
  if (a.momentum != 0 && !valid_dtype(a.momentum_dtype)) {
    throw std::invalid_argument("ema_update: unknown momentum dtype code " + std::to_string(a.momentum_dtype));
  }
  if (a.chunk_size <= 0 || a.chunk_size % kVec != 0) {
    throw std::invalid_argument("ema_update: chunk_size must be a positive multiple of 4, got " +
                                std::to_string(a.chunk_size));
  }
  if (a.n_chunks < 0 || a.n_chunks > 0x7fffffff) {
    throw std::invalid_argument("ema_update: n_chunks out of range: " + std::to_string(a.n_chunks));
  }
  if (a.n_chunks == 0) return;
  if (a.tensors == 0 || a.chunks == 0) throw std::invalid_argument("ema_update: null metadata pointer");

  const Momentum mom{reinterpret_cast<const void*>(a.momentum), a.momentum_dtype, a.momentum_value};
  const auto* tensors = reinterpret_cast<const TensorEntry*>(a.tensors);
  const auto* chunks = reinterpret_cast<const ChunkEntry*>(a.chunks);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  visit_dtype(a.target_dtype, [&](auto t_tag) {
    visit_dtype(a.source_dtype, [&](auto s_tag) {
      using T = decltype(t_tag);
      using S = decltype(s_tag);
      ema_multi_tensor_kernel<T, S>
          <<<static_cast<unsigned int>(a.n_chunks), kThreads, 0, stream>>>(tensors, chunks, a.chunk_size, mom);
    });
  });
  // Launch errors only (bad config, no device, no kernel image for this GPU); no synchronization.
  cuda_check(cudaGetLastError(), "ema_update kernel launch");
}

}  // namespace sslkernels
