"""Run a test file as ``world`` real Gloo ranks (subprocesses, file rendezvous: no network port).

The file is executed as ``python FILE RANK WORLD INIT_FILE``; each rank prints ``rank R ok`` when its checks
pass. Used by the tests of the distributed paths (test_distributed_*.py)."""
import os
import subprocess
import sys
import traceback


def spawn_ranks(script: str, world: int, tmp_path, timeout: float = 120) -> None:
    init_file = str(tmp_path / f"pg{world}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), str(r), str(world), init_file],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:  # never leave a rank behind (one failed rank leaves the others in a collective)
            if p.poll() is None:
                p.kill()
                p.communicate()
    failed = [f"rank {r} of {world} (rc {p.returncode}):\n{out[-3000:]}"
              for r, (p, out) in enumerate(zip(procs, outs)) if p.returncode != 0 or f"rank {r} ok" not in out]
    # A rank that fails first takes the others down with "connection closed": show every rank's output.
    assert not failed, "\n\n".join(failed)


def run_rank(worker) -> None:
    """The ``__main__`` of such a file: ``worker(rank, world, init_file)``, then ``rank R ok``; on any error the
    traceback and an immediate exit (a process group's teardown would wait for the other ranks)."""
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    try:
        worker(rank, world, sys.argv[3])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    print(f"rank {rank} ok", flush=True)
    sys.stderr.flush()
    # Done: skip the interpreter's teardown. A process group's threads still being destroyed there can end the
    # process in "terminate called without an active exception" (SIGABRT) after every check passed (about 1
    # run in 10 of test_distributed_dropins.py on 2 cores).
    os._exit(0)


def skip_without_gloo() -> None:
    import pytest
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
