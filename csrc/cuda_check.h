// Turn CUDA runtime errors into C++ exceptions (pybind11 raises them as RuntimeError in Python).
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace sslkernels {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sslkernels._C: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

}  // namespace sslkernels
