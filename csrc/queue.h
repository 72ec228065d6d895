// MemoryQueue enqueue: optional L2-normalization, dtype cast and the ring-buffer scatter in one launch, with
// the write position read from, and advanced in, the device-side int64 `ptr` (no host sync, graph-safe).
#pragma once

#include <cstdint>

namespace sslkernels {

struct EnqueueLaunch {
  std::uintptr_t queue;  // device [size, dim] rows, unit stride along dim
  std::uintptr_t ptr;    // device 0-d int64 write position, in [0, size); advanced to (ptr + n_keys) % size
  std::uintptr_t keys;   // device [n_keys, dim] rows, unit stride along dim
  int64_t size;          // queue rows
  int64_t dim;
  int64_t n_keys;        // rows of keys (> 0); only the last min(n_keys, size) are written
  int64_t queue_stride;  // elements between queue rows
  int64_t keys_stride;   // elements between key rows
  int queue_dtype;       // DType codes (dtypes.h)
  int keys_dtype;
  bool normalize;        // divide each row by max(||row||, 1e-12) (F.normalize) before the cast
  bool cut;              // lightly's memory bank instead of the ring: the first rows from ptr on, none past
                         // the end; ptr becomes 0 when ptr + n_keys >= size, else ptr + n_keys
  std::uintptr_t stream; // cudaStream_t of the caller
};

// Enqueues one kernel launch on `stream`; throws std::invalid_argument / std::runtime_error.
void queue_enqueue(const EnqueueLaunch& args);

}  // namespace sslkernels
