// Device metadata of a multi-tensor launch (the layout sslkernels/ops/ema.py builds as one int64 tensor).
//
// A launch covers a list of (target, source) tensor pairs of one dtype pair. Each tensor is cut into
// chunks of `chunk_size` elements and every thread block (Triton program) handles one chunk, so a
// 1-element bias and a 100M-element embedding share one launch without either idling the GPU.
// The tables live in device memory rather than in kernel arguments: a launch then has no limit on
// the number of tensors, and one launch per dtype pair suffices.
#pragma once

#include <cstdint>

namespace sslkernels {

// One row per tensor pair: raw device addresses (data_ptr()) and the element count.
struct TensorEntry {
  int64_t target_addr;
  int64_t source_addr;
  int64_t numel;
};

// One row per chunk: which pair, and the first element of the chunk (a multiple of chunk_size).
struct ChunkEntry {
  int64_t tensor;
  int64_t start;
};

static_assert(sizeof(TensorEntry) == 3 * sizeof(int64_t), "TensorEntry must match the int64 table layout");
static_assert(sizeof(ChunkEntry) == 2 * sizeof(int64_t), "ChunkEntry must match the int64 table layout");

}  // namespace sslkernels
