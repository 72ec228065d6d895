"""The environment a benchmark ran in (recorded in results.json) and the default output folder."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..ops._common import tf32_matmul


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|@.*$", " ", text.lower())       # trademarks and the clock speed
    text = re.sub(r"\b(cpu|processor)\b", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-intel-xeon``."""
    if device.type == "cuda":
        return slug(device_name(device))
    return "cpu-" + slug(cpu_model())


def default_out_dir(device: torch.device, root: Optional[Path] = None) -> Path:
    """benchmarks/results/<device>/<timestamp>/ of this checkout (of the working directory when installed)."""
    if root is None:
        repo = Path(__file__).resolve().parents[2] / "benchmarks"
        root = (repo if repo.is_dir() else Path("benchmarks")) / "results"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / device_slug(device) / stamp


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment(device: torch.device) -> Dict[str, Any]:
    from .. import __version__, backends

    info: Dict[str, Any] = {
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sslkernels": __version__,
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "cuda_extension_built": backends.cuda_extension() is not None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "cuda_runtime": torch.version.cuda,
            "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
            "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "allow_tf32_matmul": tf32_matmul(),
        })
    return info
