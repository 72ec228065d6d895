"""Contrastive engine variants side by side (issue 10's tuning table): fwd+bwd time, TFLOP/s against the
cuBLAS matmul rate measured in the same run, and extra memory, for info_nce / clip_loss / nt_xent / supcon_loss.

    PYTHONPATH=. OUT=DIR python benchmarks/contrastive_engines.py     (env: N, D, DTYPE, OPS, ENGINES, REPS, SCALE100)
"""
import json, os, sys, time
import torch, triton
sys.path.insert(0, ".")
import sslkernels
from sslkernels.ops import launch_config as lc
ENGINES = {"v1": dict(version="v1"), "v2-online": dict(version="v2", shift="online"),
           "v2-fixed-plain": dict(version="v2", shift="fixed", self_reuse=False, one_exp_bwd=False),
           "v2-fixed": dict(version="v2", shift="fixed")}
OPS = ("info_nce", "clip_loss", "nt_xent", "supcon_loss")


def settings(env=os.environ):
    """The run's settings from the environment; a name it does not know exits before anything runs (an unknown
    engine used to be dropped silently, an unknown op to fail after the earlier ops had run)."""
    engines = [e for e in env.get("ENGINES", "").split(",") if e] or list(ENGINES)
    ops = [o for o in env.get("OPS", ",".join(OPS)).split(",") if o]
    dtype = getattr(torch, env.get("DTYPE", "bfloat16"), None)
    bad = ([f"engine {e!r}" for e in engines if e not in ENGINES] + [f"op {o!r}" for o in ops if o not in OPS]
           + ([] if isinstance(dtype, torch.dtype) else [f"DTYPE {env['DTYPE']!r}"]))
    if bad:
        raise SystemExit(f"contrastive_engines: unknown {', '.join(bad)} (engines {', '.join(ENGINES)}; ops "
                         f"{', '.join(OPS)})")
    return dict(N=int(env.get("N", 32768)), D=int(env.get("D", 256)), dtype=dtype, ops=ops,
                engines={k: v for k, v in ENGINES.items() if k in engines}, reps=int(env.get("REPS", 10)),
                scale100=bool(env.get("SCALE100")), out=env.get("OUT", "."))


def main():
    cfg = settings()
    N, D, DT = cfg["N"], cfg["D"], cfg["dtype"]
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, D, device=DEV), dim=1).to(DT).requires_grad_()
    def bench(fn, reps=cfg["reps"]):
        if DEV == "cpu":
            t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
        return triton.testing.do_bench(fn, warmup=3, rep=reps * 50, return_mode="median")
    def case(op):
        if op == "info_nce":
            q, k = unit(N), unit(N); return lambda: sslkernels.info_nce(q, k, 0.07, backend="triton").backward(), (q, k)
        if op == "clip_loss":
            a, b = unit(N), unit(N); s = torch.tensor(100.0 if cfg["scale100"] else 14.3, device=DEV, requires_grad=True)
            return lambda: sslkernels.clip_loss(a, b, s, backend="triton").backward(), (a, b)
        if op == "nt_xent":
            z1, z2 = unit(N // 2), unit(N // 2); return lambda: sslkernels.nt_xent(z1, z2, 0.5, backend="triton").backward(), (z1, z2)
        if op == "supcon_loss":
            f = unit(N); lab = torch.randint(0, N // 4, (N,), device=DEV)
            return lambda: sslkernels.supcon_loss(f, lab, 0.1, backend="triton").backward(), (f,)
    rows = []
    if DEV == "cuda":
        x = torch.randn(N, D, device=DEV, dtype=DT); y = torch.randn(N, D, device=DEV, dtype=DT)
        mm = bench(lambda: x @ y.T); rows.append(dict(op="matmul NxD@DxN", engine="cublas", ms=mm, tflops=2 * N * N * D / mm / 1e9))
        del x, y; torch.cuda.empty_cache()
    for op in cfg["ops"]:
        fn, inputs = case(op)
        for name, eng in cfg["engines"].items():
            with lc.use_engine(**eng):
                fn()  # compile
                for t in inputs: t.grad = None
                if DEV == "cuda":
                    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
                ms = bench(fn)
                grads = sum(t.numel() * t.element_size() for t in inputs)  # the gradients are not "extra"
                extra = (torch.cuda.max_memory_allocated() - base - grads) / 2**20 if DEV == "cuda" else float("nan")
                for t in inputs: t.grad = None
            flops = 8 * N * N * D  # the count (nt_xent: 2N = N rows here)
            r = dict(op=op, engine=name, N=N, D=D, dtype=str(DT), ms=ms, tflops=flops / ms / 1e9, extra_MiB=extra)
            if DEV == "cuda":
                r["frac_of_matmul"] = r["tflops"] / rows[0]["tflops"]
            rows.append(r); print(json.dumps(r), flush=True)
    out = cfg["out"]; os.makedirs(out, exist_ok=True)
    json.dump(rows, open(os.path.join(out, f"engines_N{N}_D{D}.json"), "w"), indent=1)
    print(f"{'op':<14}{'engine':<16}{'ms':>9}{'TFLOP/s':>9}{'xMM':>6}{'MiB':>8}")
    for r in rows:
        print(f"{r['op']:<14}{r['engine']:<16}{r['ms']:>9.3f}{r['tflops']:>9.1f}{r.get('frac_of_matmul', 1.0):>6.2f}{r.get('extra_MiB', 0):>8.1f}")


if __name__ == "__main__":
    main()
