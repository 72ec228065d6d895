// Python module sslkernels._C: thin pybind11 bindings over raw device pointers and stream handles.
// The Python side (sslkernels/ops/*.py) owns tensors, checks and metadata; nothing here needs torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <sstream>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "dtypes.h"
#include "ema.h"
#include "queue.h"

namespace py = pybind11;

// Version of the bindings' arguments and meanings, checked by sslkernels/backends.py (CSRC_ABI_VERSION) at
// import: a _C built from older sources (a stale in-place build next to newer Python) is ignored, not called
// with arguments it reads differently. Bump both with any change to a binding or to what its kernel does.
constexpr int kAbiVersion = 2;

#ifndef SSLKERNELS_CUDA_ARCHS
#define SSLKERNELS_CUDA_ARCHS ""
#endif

namespace {

// "80,90" / "80-real,90-virtual" (CMake's CMAKE_CUDA_ARCHITECTURES, ';' turned into ',') -> [80, 90]
std::vector<int> arch_list() {
  std::vector<int> out;
  std::stringstream ss(SSLKERNELS_CUDA_ARCHS);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      if (!item.empty()) out.push_back(std::stoi(item));
    } catch (const std::exception&) {
    }
  }
  return out;
}

// Never throws: 0 on a machine without a GPU or driver.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error so it does not surface from a later, unrelated call
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslkernels CUDA kernels (built from csrc/)";

  py::dict codes;
  for (int c = 0; c <= 3; ++c) codes[sslkernels::dtype_name(static_cast<sslkernels::DType>(c))] = c;
  m.attr("dtypes") = codes;
  m.attr("abi_version") = kAbiVersion;

  m.def("cuda_arch_list", &arch_list, "GPU architectures compiled in, e.g. [80, 90] (SASS for each, PTX too).");
  m.def("device_count", &device_count, "Number of visible CUDA devices (0 without a GPU or driver).");
  m.def("runtime_version", []() { return CUDART_VERSION; }, "CUDA runtime version linked in (statically).");
  m.def("driver_version", []() {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return v;
  }, "CUDA version the installed driver supports (0 without a driver).");

  m.def(
      "ema_update",
      [](std::uintptr_t tensors, std::uintptr_t chunks, int64_t n_chunks, int64_t chunk_size, int target_dtype,
         int source_dtype, std::uintptr_t momentum, int momentum_dtype, double momentum_value, std::uintptr_t stream) {
        sslkernels::EmaLaunch args{tensors,      chunks,   n_chunks,       chunk_size,     target_dtype,
                                   source_dtype, momentum, momentum_dtype, momentum_value, stream};
        py::gil_scoped_release release;
        sslkernels::ema_update(args);
      },
      py::arg("tensors"), py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk_size"), py::arg("target_dtype"),
      py::arg("source_dtype"), py::arg("momentum"), py::arg("momentum_dtype"), py::arg("momentum_value"),
      py::arg("stream"),
      "Multi-tensor EMA t <- m*t + (1-m)*s over device metadata tables (see csrc/multi_tensor.h).\n"
      "momentum: device address of a 0-d tensor or 0 (then momentum_value is used). Enqueued on `stream`.");

  m.def(
      "queue_enqueue",
      [](std::uintptr_t queue, std::uintptr_t ptr, std::uintptr_t keys, int64_t size, int64_t dim, int64_t n_keys,
         int64_t queue_stride, int64_t keys_stride, int queue_dtype, int keys_dtype, bool normalize, bool cut,
         std::uintptr_t stream) {
        sslkernels::EnqueueLaunch args{queue,       ptr,        keys,      size,   dim,
                                       n_keys,      queue_stride, keys_stride, queue_dtype, keys_dtype,
                                       normalize,   cut,        stream};
        py::gil_scoped_release release;
        sslkernels::queue_enqueue(args);
      },
      py::arg("queue"), py::arg("ptr"), py::arg("keys"), py::arg("size"), py::arg("dim"), py::arg("n_keys"),
      py::arg("queue_stride"), py::arg("keys_stride"), py::arg("queue_dtype"), py::arg("keys_dtype"),
      py::arg("normalize"), py::arg("cut"), py::arg("stream"),
      "Ring-buffer enqueue of the last min(n_keys, size) key rows at the device int64 *ptr (optionally\n"
      "L2-normalized, cast to the queue dtype); advances *ptr by n_keys mod size on the device. One launch on `stream`.\n"
      "cut=True: lightly's memory bank instead: rows from *ptr up to the end, the rest dropped; *ptr becomes 0\n"
      "when *ptr + n_keys >= size, else *ptr + n_keys.");
}
