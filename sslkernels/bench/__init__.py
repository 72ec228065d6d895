"""Kernel benchmarks: ``python -m sslkernels.bench`` (see ``--help``) and benchmarks/test_bench_ops.py.

  cases.py    one definition per op: inputs, size presets from the papers, FLOP / byte formulas
  models.py   parameter shapes of ResNet-50 / ViT-B / ViT-L for the EMA cases
  impls.py    implementations discovered at run time (ours, eager, torch.compile, baselines, peers) and their callables
  baselines.py  what users write without a library (EMA: torch._foreach_lerp_, a per-parameter Python loop)
  peers.py    adapters for Inf-CL, OpenCLIP, lightly, timm, cut-cross-entropy
  timing.py   median and p20/p80 of repeated calls (do_bench / CUDA events on GPU, perf_counter on CPU)
  memory.py   peak extra memory (CUDA allocator stats; on CPU the CPU allocator's peak from the profiler,
              and RSS growth in a worker process)
  roofline.py the device's matmul rate and copy bandwidth, measured in the same run
  targets.py  the issues' benchmark targets (``--sizes targets``) and their pass/fail from a run's records
  progress.py the progress bar (tqdm on a terminal) and log lines
  run.py      runs the cases; report.py writes results.json / results.csv / table.txt / results.md / plots
  distributed.py  ``--distributed``: per-rank memory and time of the losses across 1, 2, 3 ... real ranks
              (gloo processes on CPU, one per GPU with NCCL), its own tables and plot
"""
from .cases import SPECS, OpSpec, Size

__all__ = ["SPECS", "OpSpec", "Size"]
