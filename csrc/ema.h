// Multi-tensor exponential moving average: target <- m * target + (1 - m) * source, in place.
#pragma once

#include <cstdint>

namespace sslkernels {

struct EmaLaunch {
  std::uintptr_t tensors;   // device TensorEntry[n_tensors]
  std::uintptr_t chunks;    // device ChunkEntry[n_chunks]
  int64_t n_chunks;
  int64_t chunk_size;       // elements per chunk; a multiple of the vector width (4)
  int target_dtype;         // DType codes
  int source_dtype;
  std::uintptr_t momentum;  // device address of a 0-d momentum tensor, or 0 to use momentum_value
  int momentum_dtype;
  double momentum_value;
  std::uintptr_t stream;    // cudaStream_t of the caller (torch.cuda.current_stream().cuda_stream)
};

// Enqueues one kernel launch on `stream`; throws std::invalid_argument / std::runtime_error.
void ema_update(const EmaLaunch& args);

}  // namespace sslkernels
