"""The GPU scripts (scripts/gpu_tune.sh, gpu_check.sh, gpu_parts.sh) dry-run on the CPU machine: a GPU session
has ~15 device-minutes, so a wrong flag, op or size name, or a bash slip in a step must fail here, not there.

gpu_tune.sh runs every step its `case` names with `timeout` and `nvidia-smi` stubbed on PATH: the stub logs each
command line and runs none of it (gpu_check.sh excepted, whose own stages are logged the same way), and each
logged line goes through its program's own argument parser and planner (python -m sslkernels.bench,
benchmarks/*.py), which run no case. A few seconds in all."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark_script
from sslkernels.bench import __main__ as bench_cli
from sslkernels.bench import run as bench_run

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "scripts" / "gpu_tune.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash, tar")

# The stand-in for coreutils' timeout: logs LIMIT and the command; runs only gpu_check.sh (so its stages are
# logged too); a bench run with --out leaves a results.json with one pending record, as a cut-off part would.
FAKE_TIMEOUT = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args = args[2:] if args[0] in ("-k", "-s") else args[1:]
with open(os.environ["DRY_LOG"], "a") as f:
    f.write(json.dumps({{"limit": int(args[0]), "cmd": args[1:]}}) + "\\n")
cmd = args[1:]
if "scripts/gpu_check.sh" in cmd:
    sys.exit(subprocess.call(cmd))
if "sslkernels.bench" in cmd and "--out" in cmd:
    out = cmd[cmd.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({{"results": [{{"pending": True}}]}}, f)
"""
GPU_NAME = "NVIDIA H200"


def script_steps():
    """The step names of gpu_tune.sh's `case`, in its order: a step added there is dry-run here too."""
    text = TUNE.read_text()
    block = text[text.index('case "$step" in'):text.index("esac")]
    return [n for arm in re.findall(r"^\s*([a-z][a-z|-]*)\)", block, re.M) for n in arm.split("|")]


def dry_run(tmp_path, steps, call_s=100000, script=TUNE, parts=None):
    """(tune.log, [{"limit", "cmd"}] of every command a step ran, the output folder) of one stubbed run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "timeout").write_text(FAKE_TIMEOUT)
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{GPU_NAME}'\n")
    for f in ("timeout", "nvidia-smi"):
        (bin_dir / f).chmod(0o755)
    py = bin_dir / "python-stub"  # `$py -c 'import xdist'`, `$py -m pip install`: succeed, do nothing
    if not py.exists():
        py.symlink_to(shutil.which("true"))
    out, log = tmp_path / "out", tmp_path / "commands.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TUNE_", "GPU_CHECK_")) and k not in ("OUT", "PYTHON", "ENGINES")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(py), DRY_LOG=str(log), TMPDIR=str(tmp_path),
               TUNE_STEPS=steps, TUNE_CALL_S=str(call_s), TUNE_PARTS=str(parts or tmp_path / "parts"))
    done = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    cmds = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return (out / "tune.log").read_text(), cmds, out


def _split_env(cmd):
    env = {}
    if cmd and cmd[0] == "env":
        cmd = cmd[1:]
        while cmd and re.match(r"[A-Za-z_]\w*=", cmd[0]):
            k, _, v = cmd[0].partition("=")
            env[k], cmd = v, cmd[1:]
    return env, cmd


def check_command(cmd, monkeypatch):
    """Fail unless ``cmd`` (a logged command line) is one its program accepts on a CUDA device."""
    env, cmd = _split_env(cmd)
    cuda = torch.device("cuda")
    if cmd[0] == "bash":
        if cmd[1] == "-c":  # gpu_check's env stage: `nvidia-smi; $py -c '...'`
            words = shlex.split(cmd[2])
            for i, w in enumerate(words[:-2]):
                if w.endswith("python-stub") and words[i + 1] == "-c":
                    compile(words[i + 2], "<bash -c>", "exec")
            return "bash -c"
        assert (ROOT / cmd[1]).is_file(), cmd
        return cmd[1]
    assert cmd[0].endswith("python-stub"), f"not the PYTHON the script was given: {cmd}"
    args = cmd[1:]
    try:
        if args[:2] == ["-m", "sslkernels.bench"]:
            parsed = bench_cli._parser().parse_args(args[2:])
            assert not (parsed.merge or parsed.report or parsed.list or parsed.distributed), args
            assert parsed.out, f"{args}: without --out its results land outside what the call returns"
            monkeypatch.setattr(bench_cli, "device_name", lambda device: GPU_NAME)  # a --resume reads it
            cfg, _ = bench_cli.prepare(parsed, cuda)
            left_out = []
            planned = bench_run.plan(cfg, left_out.append)
            assert planned and not left_out, (args, left_out)
            assert {bench_cli.resolve_op(o).name for o in parsed.ops} <= {p.spec.name for p in planned}, args
            return "sslkernels.bench"
        if args[:2] == ["-m", "pytest"]:
            assert "tests" in args, args
            return "pytest"
        name = Path(args[0]).stem
        assert args[0] == f"benchmarks/{name}.py", args
        mod = load_benchmark_script(name)
        if name == "contrastive_engines":  # configured by its environment
            mod.settings({**os.environ, **env})
        elif name == "dino_variants":
            assert mod._parser().parse_args(args[1:]).budget > 0, f"{args}: no budget"
        elif name == "profile_step":
            mod.cases_of(mod._parser().parse_args(args[1:]), cuda)
        else:
            raise AssertionError(f"no check for {args[0]}: add one to check_command")
        return name
    except SystemExit as err:  # argparse and the scripts exit on what they refuse
        raise AssertionError(f"{cmd} is refused: exit {err.code}") from err
    except ValueError as err:  # sslkernels.bench's prepare
        raise AssertionError(f"{cmd} is refused: {err}") from err


def test_every_step_of_gpu_tune_runs_commands_their_programs_accept(tmp_path, monkeypatch):
    steps = script_steps()
    assert {"tests", "targets", "variants", "dino", "profile", "full-a", "sweep"} <= set(steps)
    parts = tmp_path / "parts"
    (parts / "targets").mkdir(parents=True)  # an earlier call's targets: this one resumes them
    (parts / "targets" / "results.json").write_text(json.dumps(
        {"results": [], "environment": {"device_name": GPU_NAME}, "config": {"device": "cuda:0"}}))
    log, cmds, out = dry_run(tmp_path, " ".join(steps + ["bogus"]), parts=parts)
    programs = {check_command(c["cmd"], monkeypatch) for c in cmds}
    assert {"sslkernels.bench", "pytest", "contrastive_engines", "dino_variants", "profile_step",
            "scripts/gpu_check.sh", "scripts/build_csrc.sh", "bash -c"} <= programs
    # Each step in the order given, the targets part resuming its earlier results; an unknown step is reported.
    started = re.findall(r"^### ([\w-]+): (?!exit|not started|no such)", log, re.M)
    assert started[:2] == ["tests", "autotune"] and started[-4:] == ["full-a", "full-b", "full-c", "sweep"], started
    targets = next(c["cmd"] for c in cmds if c["cmd"][-1].endswith("/targets"))
    assert targets[targets.index("--resume") + 1] == str(parts / "targets" / "results.json")
    assert "### bogus: no such step" in log
    summary = (out / "summary.md").read_text()
    assert summary.strip() in log and "| bogus | unknown | 0 |" in summary and "(h200," in summary
    assert len(re.findall(r"^\| [\w-]+ \| 0 \|", summary, re.M)) == len(started)
    with tarfile.open(out / "tune.tgz") as tgz:
        names = set(tgz.getnames())
        assert tgz.extractfile("./gpu").read().decode().strip() == "h200"
    assert {"./targets/results.json", "./sweep/results.json", "./tests/summary.md"} <= names
    assert sorted(p.name for p in out.iterdir()) == ["summary.md", "tune.log", "tune.tgz"]  # the tool returns 8


def test_gpu_check_default_stages_run_accepted_commands(tmp_path, monkeypatch):
    # gpu_check.sh on its own (all four stages, the quick bench preset included), under the same stubs.
    script = tmp_path / "tune.sh"  # a one-step "gpu_tune" whose step is gpu_check.sh with its defaults
    script.write_text(f'set -uo pipefail; cd {shlex.quote(str(ROOT))}; mkdir -p "$1"; '
                      f'timeout 600 bash scripts/gpu_check.sh "$1/check" | tee "$1/tune.log"\n')
    log, cmds, out = dry_run(tmp_path, "", script=script)
    assert {check_command(c["cmd"], monkeypatch) for c in cmds} == {
        "scripts/gpu_check.sh", "bash -c", "scripts/build_csrc.sh", "pytest", "sslkernels.bench"}
    assert re.search(r"^\| bench \| 0 \|", (out / "check" / "summary.md").read_text(), re.M)
    # As a device call of its own, $OUT comes back only up to 8 files: the bench's folder travels as a tarball.
    files = sorted(str(p.relative_to(out / "check")) for p in (out / "check").rglob("*") if p.is_file())
    assert "bench.tgz" in files and len(files) <= 8, files


@pytest.mark.parametrize("cmd, why", [
    ("-m sslkernels.bench dino_loss --sizes dinoo --out x", "'dinoo' is no preset"),
    ("-m sslkernels.bench dino_loss --sizes dino", "without --out"),
    ("-m sslkernels.bench info_nce --sizes B=1024:P=65536 --out x", "is no preset"),
    ("-m sslkernels.bench info_nce --time-budgt 60 --out x", "exit 2"),
    ("-m sslkernels.bench info_nce --impl ours,eagr --out x", "unknown"),
    ("-m sslkernels.bench info_nce --sweep P --out x", "no op of info_nce has a dim"),
    ("-m sslkernels.bench sinkhorn --sizes paper --out x", "unknown op"),
    ("benchmarks/dino_variants.py --budget -5", "no budget"),
    ("benchmarks/dino_variants.py --dtype bfloat16", "exit 2"),
    ("benchmarks/profile_step.py moco_loss clip_loss --sizes mocov2", "no size 'mocov2' for clip_loss"),
    ("env ENGINES=v2-fixd python-stub benchmarks/contrastive_engines.py", "unknown engine 'v2-fixd'"),
    ("benchmarks/host_ops.py", "no check for"),
])
def test_the_check_refuses_what_a_gpu_call_would_die_on(cmd, why, monkeypatch):
    argv = shlex.split(cmd)
    with pytest.raises(AssertionError, match=re.escape(why)):
        check_command(argv if argv[0] == "env" else ["python-stub", *argv], monkeypatch)


def test_a_size_that_names_nothing_stops_the_bench_before_it_measures(tmp_path, capsys):
    # It used to measure the roofline, leave every op out and exit 0: a typo cost a GPU call's step.
    assert bench_cli.main(["info_nce", "--sizes", "paperr", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "'paperr' is no preset" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_gpu_tune_shrinks_steps_to_what_is_left_of_the_call(tmp_path):
    # 100 s: 80 s left after the 20 s kept for packing up; a bench part needs 120 s to start. The script's clock
    # runs during the dry run too, so a loaded machine may see a second or two gone before a step starts.
    log, cmds, _ = dry_run(tmp_path, "tests targets variants full-a bogus", call_s=100)
    tests = re.search(r"^### tests: env GPU_CHECK_STAGES.* GPU_CHECK_S=(\d+) .*\(limit (\d+)s\)$", log, re.M)
    assert tests and 75 <= int(tests[2]) <= 80 and abs(int(tests[1]) + 10 - int(tests[2])) <= 2, log
    assert "### targets: not started" in log and "### full-a: not started" in log
    variants = next(c for c in cmds if "benchmarks/dino_variants.py" in c["cmd"])
    assert variants["limit"] <= 80 and 45 <= int(variants["cmd"][variants["cmd"].index("--budget") + 1]) <= 50
    assert all(c["limit"] <= 80 for c in cmds)
    log, cmds, out = dry_run(tmp_path / "short", "tests variants", call_s=45)
    assert not cmds and log.count("not started") == 2 and (out / "tune.tgz").is_file()


def _tarball(path, parts, gpu="h200"):
    """A tune.tgz as gpu_tune.sh packs it: ./gpu and ./<part>/results.json."""
    work = path.parent / (path.name + ".d")
    work.mkdir(parents=True)
    (work / "gpu").write_text(gpu + "\n")
    for name, text in parts.items():
        (work / name).mkdir()
        (work / name / "results.json").write_text(text)
    subprocess.run(["tar", "czf", str(path), "-C", str(work), "."], check=True)


def test_gpu_parts_puts_the_returned_parts_where_the_next_call_resumes_them(tmp_path):
    repo = tmp_path / "repo"  # a copy of the script: its default folder is benchmarks/results/<gpu>/parts
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_parts.sh", repo / "scripts")
    parts = repo / "benchmarks" / "results" / "h200" / "parts"
    (parts / "sweep").mkdir(parents=True)
    (parts / "sweep" / "results.json").write_text('{"results": []}')
    pending = json.dumps({"results": [{"pending": True}, {"pending": True}, {}]})
    _tarball(tmp_path / "call" / "tune.tgz", {"targets": pending, "full-a": '{"results": [{}]}', "sweep": '{"resu'})
    # A path relative to the caller's folder (the script changes to the repository's root).
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_parts.sh"), "call/tune.tgz"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "targets: 2 records pending (resumed by the next call)", "full-a: complete",
        "sweep: the returned results.json does not read; benchmarks/results/h200/parts/sweep kept as it was"]
    assert json.loads((parts / "targets" / "results.json").read_text()) == json.loads(pending)
    assert (parts / "sweep" / "results.json").read_text() == '{"results": []}'
    _tarball(tmp_path / "none" / "tune.tgz", {})
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_parts.sh"), str(tmp_path / "none" / "tune.tgz")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "nothing to resume" in done.stdout
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_parts.sh"), "missing/tune.tgz"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "missing/tune.tgz" in done.stderr
