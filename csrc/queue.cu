// MemoryQueue enqueue kernel (see queue.h): one warp per written row.
//
// The write position lives on the device and must be read by every block before any block advances it.
// Instead of a second launch (or a scratch counter), the read is an atomicAdd of 2^32 on `ptr` itself:
// the low 32 bits keep the position, the high 32 bits count the blocks that have read it, and the block
// that arrives last (count == gridDim.x - 1) knows every other block has its copy, so it stores the new
// position, clearing the count. One launch, no host read, and a CUDA graph replays it as it is.
// While the kernel runs, ptr's high bits hold that count: read ptr only stream-ordered after the launch
// (as every torch op on the caller's stream is), and keep it in [0, 2^32) (MemoryQueue checks it on load).
#include "cuda_check.h"
#include "dtype_convert.cuh"
#include "queue.h"

#include <stdexcept>
#include <string>

namespace sslkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = kThreads / kWarp;
constexpr unsigned long long kArrival = 1ull << 32;
constexpr unsigned long long kPositionMask = kArrival - 1;

template <typename C>
__device__ __forceinline__ C warp_sum(C x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Arithmetic in the keys' compute type (fp32, fp64 for fp64 keys), as reference.queue_enqueue_ does.
template <typename Q, typename K>
__global__ void __launch_bounds__(kThreads)
enqueue_kernel(Q* __restrict__ queue, unsigned long long* __restrict__ ptr, const K* __restrict__ keys,
               int64_t size, int64_t dim, int64_t n_keys, int64_t keep, int64_t queue_stride, int64_t keys_stride,
               bool normalize, bool cut) {
  using C = typename ComputeType<K>::type;
  __shared__ int64_t start_shared;
  if (threadIdx.x == 0) {
    const unsigned long long old = atomicAdd(ptr, kArrival);
    const int64_t start = static_cast<int64_t>(old & kPositionMask);
    if ((old >> 32) == gridDim.x - 1) {
      const int64_t next = cut ? (start + n_keys >= size ? 0 : start + n_keys) : (start + n_keys) % size;
      atomicExch(ptr, static_cast<unsigned long long>(next));
    }
    start_shared = start;
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  if (r >= keep) return;
  // A batch larger than the queue writes only its last `keep` rows, each where writing every row in order
  // would have left it. Cut (lightly's bank): the first rows, from ptr up to the end.
  const int64_t skip = cut ? 0 : n_keys - keep;
  const int64_t dst = cut ? start_shared + r : (start_shared + skip + r) % size;
  if (dst >= size) return;
  const K* src_row = keys + (skip + r) * keys_stride;
  Q* dst_row = queue + dst * queue_stride;

  C norm = C(1);
  if (normalize) {
    C ss = C(0);
    for (int64_t c = lane; c < dim; c += kWarp) {
      const C x = to_compute<C>(src_row[c]);
      ss += x * x;
    }
    // F.normalize: x / max(||x||, eps). A division, not a reciprocal multiply, to round as it does.
    norm = max(sqrt(warp_sum(ss)), C(1e-12));
  }
  for (int64_t c = lane; c < dim; c += kWarp) {
    const C x = to_compute<C>(src_row[c]);
    dst_row[c] = Store<Q>::cast(normalize ? x / norm : x);
  }
}

}  // namespace

void queue_enqueue(const EnqueueLaunch& a) {
  if (!valid_dtype(a.queue_dtype) || !valid_dtype(a.keys_dtype)) {
    throw std::invalid_argument("queue_enqueue: unknown dtype code " + std::to_string(a.queue_dtype) + "/" +
                                std::to_string(a.keys_dtype));
  }
  if (a.size <= 0 || a.size > static_cast<int64_t>(kPositionMask) || a.dim <= 0 || a.n_keys <= 0) {
    throw std::invalid_argument("queue_enqueue: need 0 < size < 2^32, dim > 0 and n_keys > 0; got size " +
                                std::to_string(a.size) + ", dim " + std::to_string(a.dim) + ", n_keys " +
                                std::to_string(a.n_keys));
  }
  if (a.queue_stride < a.dim || a.keys_stride < 0) {
    throw std::invalid_argument("queue_enqueue: bad row strides " + std::to_string(a.queue_stride) + "/" +
                                std::to_string(a.keys_stride));
  }
  if (a.queue == 0 || a.ptr == 0 || a.keys == 0) throw std::invalid_argument("queue_enqueue: null pointer");
  if (a.ptr % alignof(unsigned long long) != 0) {
    throw std::invalid_argument("queue_enqueue: ptr must be an 8-byte aligned int64");
  }
  const int64_t keep = a.n_keys < a.size ? a.n_keys : a.size;
  const int64_t blocks = (keep + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) throw std::invalid_argument("queue_enqueue: too many rows: " + std::to_string(keep));

  auto* ptr = reinterpret_cast<unsigned long long*>(a.ptr);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  visit_dtype(a.queue_dtype, [&](auto q_tag) {
    visit_dtype(a.keys_dtype, [&](auto k_tag) {
      using Q = decltype(q_tag);
      using K = decltype(k_tag);
      enqueue_kernel<Q, K><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          reinterpret_cast<Q*>(a.queue), ptr, reinterpret_cast<const K*>(a.keys), a.size, a.dim, a.n_keys, keep,
          a.queue_stride, a.keys_stride, a.normalize, a.cut);
    });
  });
  // Launch errors only (bad config, no device, no kernel image for this GPU); no synchronization.
  cuda_check(cudaGetLastError(), "queue_enqueue kernel launch");
}

}  // namespace sslkernels
