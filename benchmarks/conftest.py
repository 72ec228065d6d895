"""pytest-benchmark over the CLI's case definitions (sslkernels/bench/cases.py).

    pytest benchmarks/ --benchmark-only                       # quick sizes, ours vs eager, default device
    pytest benchmarks/ --benchmark-only --bench-sizes small --bench-impl ours,eager,compile --bench-dtype bf16
    pytest benchmarks/ --benchmark-only -k "info_nce and fwd+bwd" --benchmark-json out.json

This folder is not part of the test run (CI runs tests/); results of the CLI go to benchmarks/results/.
"""
import torch

from sslkernels.bench.cases import DTYPES, SPECS
from sslkernels.bench.impls import GROUPS, discover
from sslkernels.bench.run import sizes_for


def pytest_addoption(parser):
    group = parser.getgroup("sslkernels benchmarks")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                    help="default: cuda when available")
    group.addoption("--bench-sizes", default="quick", help="comma list of presets / size labels (as the CLI)")
    group.addoption("--bench-dtype", default="fp32", choices=sorted(DTYPES))
    group.addoption("--bench-impl", default="ours,eager,baselines",
                    help=f"comma list of groups {GROUPS} and/or implementation names")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    dtype = DTYPES[config.getoption("--bench-dtype")]
    sizes = [s.strip() for s in config.getoption("--bench-sizes").split(",") if s.strip()]
    wanted = [s.strip() for s in config.getoption("--bench-impl").split(",") if s.strip()]
    params, ids = [], []
    for spec in SPECS.values():
        impls = discover(spec, device, wanted)
        for size in sizes_for(spec, sizes, device):
            for impl in impls:
                for mode in spec.modes:
                    params.append((spec, size, dtype, device, impl, mode))
                    ids.append(f"{spec.name}-{size.label}-{impl.name}-{mode}")
    metafunc.parametrize("bench_case", params, ids=ids)
