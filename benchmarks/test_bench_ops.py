"""One pytest-benchmark per (op, size, implementation, mode), built by the CLI's own setup; the peak
memory of the same call goes into the benchmark's extra_info (as in the CLI's results)."""
import pytest
import torch

from sslkernels.bench.cases import case_seed, element_size, generator
from sslkernels.bench import memory
from sslkernels.bench.impls import build_callables, describe_error, is_oom


def _synchronized(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)  # pytest-benchmark times on the host: wait for the kernels
        return out
    return run


def test_op(benchmark, bench_case):
    spec, size, dtype, device, impl, mode = bench_case
    if impl.skip:
        pytest.skip(impl.skip)
    inputs = spec.build(size, dtype, device, generator(device, case_seed(spec.name, size, dtype)))
    try:
        calls = build_callables(spec, inputs, size, impl, device)
    except Exception as err:  # noqa: BLE001 - peers that are absent or cannot run this case
        if is_oom(err) or impl.group in ("peers", "compile", "baselines"):
            pytest.skip(describe_error(err))
        raise
    flops, nbytes = spec.work(size.dims, element_size(dtype))[mode]
    benchmark.group = f"{spec.name} {size.label} {mode}"
    benchmark.extra_info.update(op=spec.name, size=size.label, dims=size.describe(), impl=impl.name,
                                kind=impl.kind, mode=mode, flops=flops, bytes=nbytes)
    benchmark(_synchronized(calls.for_mode(mode), device))
    # Peak extra memory of the same call, measured as the CLI does (--benchmark-json keeps extra_info).
    calls.reset()
    if device.type == "cuda":
        benchmark.extra_info.update(peak_mem_bytes=memory.peak_cuda(calls.for_mode(mode)),
                                    mem_method=memory.CUDA_METHOD)
    else:
        benchmark.extra_info.update(peak_mem_bytes=memory.peak_cpu_alloc(calls.for_mode(mode)),
                                    mem_method=memory.CPU_ALLOC_METHOD)
