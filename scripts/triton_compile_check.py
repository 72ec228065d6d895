"""Compile every Triton kernel of sslkernels for sm_80 and sm_90 offline (no GPU needed) and report resources.

    python scripts/triton_compile_check.py                 # everything: all families, both archs
    python scripts/triton_compile_check.py --arch 90 --family contrastive --jobs 16
    python scripts/triton_compile_check.py --quick         # one D per family, sm_90 only (a pre-commit check)

How the variants are found: the script runs each op's registered "triton" implementation (forward and
backward) on small CPU tensors with ``JITFunction.run`` replaced by a recorder, for every dtype, every
contrastive engine setting (launch_config.Engine) and one feature dimension per launch-config table row.
What the launchers would have launched (kernel, argument types, constexprs, num_warps, num_stages) is
therefore exactly the set the package uses, deduplicated, then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a process pool; ptxas' own
report gives registers and spills, the compiled metadata the shared memory.

Exit status: 1 if any variant fails to compile, if a driver fails to record its family, or (``--no-spills``)
if any variant spills. Works with triton 3.6 and 3.8.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Dict, List, NamedTuple, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # record real JITFunctions, not interpreted ones


class Variant(NamedTuple):
    family: str
    module: str
    kernel: str
    signature: Tuple[Tuple[str, str], ...]  # (argument, type or "constexpr")
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    num_stages: int
    label: str  # what launched it (op, dtype, D, engine)


_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(value):
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "constexpr"
    raise TypeError(f"cannot type kernel argument {value!r}")


# ------------------------------------------------------------------------------------------ recording


class Recorder:
    def __init__(self):
        self.variants: Dict[tuple, Variant] = {}
        self.family = "?"
        self.label = "?"

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime.jit import JITFunction

        original = JITFunction.run
        rec = self

        def run(self, *args, grid=None, warmup=False, **kwargs):
            rec.record(self, args, kwargs)
            return None

        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original

    def record(self, fn, args, kwargs):
        names = list(fn.arg_names)
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        values = dict(zip(names, args))
        values.update(kwargs)
        const_names = {p.name for p in fn.params if p.is_constexpr}
        sig, consts = [], []
        for name in names:
            v = values.get(name)
            if name in const_names:
                sig.append((name, "constexpr"))
                consts.append((name, v))
            else:
                sig.append((name, _arg_type(v)))
        var = Variant(self.family, fn.fn.__module__, fn.fn.__name__, tuple(sig), tuple(consts),
                      int(options.get("num_warps", 4)), int(options.get("num_stages", 3)), self.label)
        key = var[:7]
        self.variants.setdefault(key, var)


# -------------------------------------------------------------------------------------------- drivers
# Each driver calls registered implementations on small CPU tensors; outputs are garbage (nothing runs).


def _dtypes():
    import torch

    return [torch.float16, torch.bfloat16, torch.float32]


_DIMS = "main"
_FULL = False  # every engine setting (v2-online, v2-fixed-plain too)
_TF32 = False  # fp32 contrastive kernels with allow_tf32 (DOT_PREC="tf32") too


def _feature_dims(quick: bool, dtype=None) -> List[int]:
    """D values to drive: "main" = the largest resident D of the dtype (the tuned-for case: 256 half, 128
    fp32) and 512 (chunked); "all" = one D per launch-config table row of either engine."""
    from sslkernels.ops import launch_config as lc

    if quick:
        return [256]
    if _DIMS == "all":
        bounds = set()
        for tables in lc.TABLES.values():
            for table in tables.values():
                for rows in table.values():
                    bounds.update(b for b, _ in rows)
        return sorted({b for b in bounds if b is not None} | {512})
    if _DIMS == "main":
        cls = "fp32" if dtype is not None and str(dtype) == "torch.float32" else "half"
        return [lc.RESIDENT_MAX_D[cls], 512]
    return [int(v) for v in _DIMS.split(",")]


def drive_contrastive(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available
    from sslkernels.ops import launch_config as lc

    engines = {"v1": dict(version="v1"), "v2-online": dict(version="v2", shift="online"),
               "v2-fixed": dict(version="v2", shift="fixed"),
               "v2-fixed-plain": dict(version="v2", shift="fixed", self_reuse=False, one_exp_bwd=False)}
    if quick:
        engines = {"v2-fixed": engines["v2-fixed"]}
    elif not _FULL:
        engines = {k: engines[k] for k in ("v1", "v2-fixed")}
    impl = {op: available(op)["triton"] for op in ("info_nce", "clip_loss", "nt_xent", "moco_loss",
                                                    "supcon_loss", "siglip_loss")}
    n = 40

    def x(d, dtype, grad=True):
        return torch.randn(n, d).to(dtype).requires_grad_(grad)

    def tau(kind):
        return torch.full((n,), 0.2, requires_grad=True) if kind == "1d" else torch.tensor(0.2, requires_grad=True)

    for tf32 in ((False, True) if _TF32 else (False,)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for dtype in ([torch.bfloat16] if quick else _dtypes()):
            if tf32 and dtype != torch.float32:
                continue
            for d in _feature_dims(quick, dtype):
                for ename, eng in engines.items():
                    rec.label = f"{dtype} D={d} {ename}" + (" tf32" if tf32 else "")
                    with lc.use_engine(**eng):
                        calls = [
                            lambda: impl["info_nce"](x(d, dtype), x(d, dtype), tau("1d"), None, False, False, "sum"),
                            lambda: impl["info_nce"](x(d, dtype), x(d, dtype), tau("0d"),
                                                     torch.randint(0, n, (n,)), False, True, "sum"),
                            lambda: impl["info_nce"](x(d, dtype), x(d, dtype), tau("1d"), None, True, True, "sum"),
                            lambda: impl["clip_loss"](x(d, dtype), x(d, dtype), torch.tensor(10.0, requires_grad=True),
                                                      "sum"),
                            lambda: impl["nt_xent"](x(d, dtype), x(d, dtype), tau("0d"), False, "sum"),
                            lambda: impl["nt_xent"](x(d, dtype), x(d, dtype), tau("0d"), True, "sum"),
                            lambda: impl["moco_loss"](x(d, dtype), x(d, dtype), x(d, dtype, False), tau("0d"), "sum"),
                            lambda: impl["moco_loss"](x(d, dtype), x(d, dtype, False), x(d, dtype, False), tau("0d"),
                                                      "sum"),
                            lambda: impl["supcon_loss"](x(d, dtype), torch.randint(0, 4, (n,)), tau("0d"), "sum"),
                            lambda: impl["siglip_loss"](x(d, dtype), x(d, dtype), torch.tensor(10.0, requires_grad=True),
                                                        torch.tensor(-5.0, requires_grad=True), "sum"),
                        ]
                        for call in calls:
                            loss = call()
                            loss.backward()
    torch.backends.cuda.matmul.allow_tf32 = False


def drive_dino(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    ops = available("dino_loss")
    for dtype in _dtypes():
        for p in ((1000,) if quick else (1000, 65536)):
            rec.label = f"{dtype} P={p}"
            b, s_crops, g = 4, 4, 2
            student = torch.randn(s_crops * b, p).to(dtype).requires_grad_()
            teacher = torch.randn(g * b, p).to(dtype)
            center = torch.zeros(1, p)
            for fused in ("0", "1"):  # the two-pass kernels, and the gradient in the forward (ops/dino_fused.py)
                os.environ["SSLKERNELS_DINO_FUSED"] = fused
                for tt in (0.04, torch.tensor(0.04)):
                    ops["triton"](student, teacher, center, 0.1, tt, g, "mean").backward()
            os.environ.pop("SSLKERNELS_DINO_FUSED")
            for m in (0.9, torch.tensor(0.9)):
                available("update_center_")["triton"](center.clone(), teacher, m, False, None)
            if "swav_loss" in available("swav_loss") or True:
                swav = available("swav_loss").get("triton")
                if swav is not None:
                    with contextlib.suppress(TypeError):
                        swav([student[:b], student[b:2 * b]], [student[2 * b:]], 0.1, 0.05, 3, None, False, None)


def drive_sinkhorn(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    for dtype in _dtypes():
        rec.label = f"{dtype}"
        available("sinkhorn_knopp")["triton"](torch.randn(64, 300).to(dtype), torch.tensor(0.05), 3, False, None)


def drive_cosine(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    for dtype in _dtypes():
        for d in ((256,) if quick else (128, 2048, 8192)):
            rec.label = f"{dtype} D={d}"
            p = torch.randn(32, d).to(dtype).requires_grad_()
            z = torch.randn(32, d).to(dtype).requires_grad_()
            available("negative_cosine_similarity")["triton"](p, z, "mean").backward()


def drive_ema(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    impl = available("ema_update_")["triton"]
    for td, sd in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                   (torch.float16, torch.float16)):
        for m in (0.99, torch.tensor(0.99)):
            rec.label = f"{td}<-{sd} m={type(m).__name__}"
            t = [torch.randn(3000).to(td), torch.randn(17).to(td)]
            s = [torch.randn(3000).to(sd), torch.randn(17).to(sd)]
            impl(t, s, m)


def drive_queue(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    impl = available("queue_enqueue_")["triton"]
    for qd in _dtypes():
        for kd in _dtypes():
            # 8192: past the kernel's widest block, so the row loop takes more than one step
            for dim in ((128,) if quick else (128, 2048, 8192)):
                for normalize in (False, True):
                    for cut in (False, True):  # cut: lightly's memory bank
                        rec.label = f"queue {qd} keys {kd} dim={dim} normalize={normalize} cut={cut}"
                        impl(torch.zeros(64, dim, dtype=qd), torch.zeros((), dtype=torch.int64),
                             torch.randn(8, dim).to(kd), normalize, cut)


def drive_similarity(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    ops = available("similarity")
    if "triton" not in ops:
        raise LookupError("no triton similarity registered")
    for dtype in _dtypes():
        for d in ((256,) if quick else (64, 256, 1024)):
            rec.label = f"{dtype} D={d}"
            for normalize in (True, False):
                ops["triton"](torch.randn(40, d).to(dtype), torch.randn(50, d).to(dtype), normalize)
                knn = available("knn_topk").get("triton")
                if knn is not None:
                    for k in (1, 20, 200):
                        knn(torch.randn(40, d).to(dtype), torch.randn(300, d).to(dtype), k, normalize)


def drive_cross_correlation(rec: Recorder, quick: bool):
    import torch
    from sslkernels.backends import available

    bt, vic = available("barlow_twins_loss")["triton"], available("vicreg_loss")["triton"]
    for dtype in _dtypes():
        for d in ((256,) if quick else (64, 256, 2048)):
            rec.label = f"{dtype} D={d}"
            z1 = torch.randn(40, d).to(dtype).requires_grad_()
            z2 = torch.randn(40, d).to(dtype).requires_grad_()
            bt(z1, z2, 5e-3).backward()
            vic(z1, z2, 25.0, 25.0, 1.0).backward()


DRIVERS = {"contrastive": drive_contrastive, "dino": drive_dino, "sinkhorn": drive_sinkhorn,
           "cosine": drive_cosine, "ema": drive_ema, "queue": drive_queue, "similarity": drive_similarity,
           "cross_correlation": drive_cross_correlation}
OPTIONAL = {"similarity"}  # being written: skipped (not failed) while the module does not exist


def record(families, quick) -> Tuple[List[Variant], List[str]]:
    rec = Recorder()
    errors = []
    import torch

    torch.manual_seed(0)
    with rec.patched():
        for fam in families:
            if fam in OPTIONAL and not os.path.exists(os.path.join(ROOT, "sslkernels", "ops", f"{fam}.py")):
                print(f"[skip] {fam}: sslkernels/ops/{fam}.py does not exist")
                continue
            rec.family = fam
            before = len(rec.variants)
            try:
                DRIVERS[fam](rec, quick)
            except Exception:
                errors.append(f"{fam}: driver failed while recording ({rec.label}):\n{traceback.format_exc()}")
            if len(rec.variants) == before and not any(e.startswith(fam) for e in errors):
                errors.append(f"{fam}: the driver recorded no launch")
    return list(rec.variants.values()), errors


# ------------------------------------------------------------------------------------------ compiling

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(args):
    var, arch = args
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(var.module), var.kernel)
    sig = dict(var.signature)
    consts = dict(var.constexprs)
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except TypeError:  # older keyword sets
        src = ASTSource(fn=fn, signature=sig, constants=consts)
    buf = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=var.num_warps, num_stages=var.num_stages))
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return var, arch, None, msg[:400], time.time() - t0
    log = buf.getvalue()
    regs = _PTXAS.search(log)
    spill = _SPILL.search(log)
    shared = getattr(k.metadata, "shared", None)
    return var, arch, dict(regs=int(regs.group(1)) if regs else -1,
                           spill_st=int(spill.group(1)) if spill else -1,
                           spill_ld=int(spill.group(2)) if spill else -1, shared=shared), None, time.time() - t0


def _init_worker(cache_dir):
    # A fresh cache so ptxas always runs (its -v log is the register/spill report) and prints it.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)


def _short(var: Variant) -> str:
    skip = {"DOT_PREC"}
    flags = []
    for k, v in var.constexprs:
        if k in skip:
            continue
        if isinstance(v, bool):
            if v:
                flags.append(k)
        else:
            flags.append(f"{k}={v}")
    dt = next((t[1:] for _, t in var.signature if t in ("*fp16", "*bf16")), "fp32")
    prec = dict(var.constexprs).get("DOT_PREC")
    return f"{var.kernel} {dt}{'/' + prec if prec else ''} w{var.num_warps}s{var.num_stages} " + " ".join(flags)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable); default 80 and 90")
    ap.add_argument("--family", action="append", choices=sorted(DRIVERS), help="default: all")
    ap.add_argument("--quick", action="store_true", help="one D per family, fewer engines, sm_90 unless --arch")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-spills", action="store_true", help="also fail when a variant spills registers")
    ap.add_argument("--list", action="store_true", help="only print the recorded variants")
    ap.add_argument("--dims", default="main", help='contrastive D values: "main" (256 half / 128 fp32, and 512), '
                    '"all" (one per launch-config table row) or a list such as 64,256')
    ap.add_argument("--tf32", action="store_true", help="also the fp32 contrastive kernels under allow_tf32")
    ap.add_argument("--match", action="append", help="compile only variants whose description contains this")
    ap.add_argument("--full", action="store_true", help="every engine setting, every table row's D, tf32 too")
    args = ap.parse_args(argv)
    global _DIMS, _TF32, _FULL
    _DIMS, _TF32, _FULL = ("all", True, True) if args.full else (args.dims, args.tf32, False)
    archs = args.arch or ([90] if args.quick else [80, 90])
    families = args.family or list(DRIVERS)

    import triton

    t0 = time.time()
    variants, errors = record(families, args.quick)
    print(f"triton {triton.__version__}: {len(variants)} kernel variants recorded from {len(families)} families "
          f"in {time.time() - t0:.1f}s; compiling for sm_{', sm_'.join(map(str, archs))} with {args.jobs} jobs")
    for e in errors:
        print("[driver error]", e)
    if args.list:
        for v in sorted(variants, key=lambda v: (v.family, v.kernel)):
            print(v.family, _short(v), "|", v.label)
        return 1 if errors else 0

    if args.match:
        variants = [v for v in variants if any(m in _short(v) for m in args.match)]
    jobs = [(v, a) for a in archs for v in variants]
    results = []
    with tempfile.TemporaryDirectory(prefix="sslk-compile-") as cache:
        with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_init_worker,
                                    initargs=(cache,)) as pool:
            for r in pool.map(_compile, jobs, chunksize=1):
                results.append(r)
    failed = spilled = 0
    results.sort(key=lambda r: (r[0].family, r[1], r[0].kernel, _short(r[0])))
    print(f"{'family':<12}{'sm':>3}  {'regs':>4} {'spill':>6} {'smem':>7} {'sec':>5}  variant")
    for var, arch, res, err, secs in results:
        if err:
            failed += 1
            print(f"{var.family:<12}{arch:>3}  FAIL {err}  :: {_short(var)} | {var.label}")
            continue
        sp = res["spill_st"] + res["spill_ld"] if res["spill_st"] >= 0 else -1
        spilled += sp > 0
        mark = "  <-- SPILLS" if sp > 0 else ""
        print(f"{var.family:<12}{arch:>3}  {res['regs']:>4} {sp:>6} {res['shared']:>7} {secs:>5.1f}  {_short(var)}{mark}")
    print(f"\n{len(results)} compiles ({len(variants)} variants x {len(archs)} archs) in {time.time() - t0:.0f}s: "
          f"{failed} failed, {spilled} spill, {len(errors)} driver errors")
    return 1 if failed or errors or (args.no_spills and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
