"""sslkernels.nn.ClipLoss / SigLipLoss against OpenCLIP's own classes (open_clip_torch 3.3.0, imported as
installed): loss and the gradient of every input, fp32, on fresh random inputs; signatures; errors;
sslkernels.integrations.open_clip.patch() / unpatch(); and a two-process gloo run of the gathered losses."""
import inspect
import os
import subprocess
import sys
import textwrap
import types

import pytest

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch is not installed: these tests "
                                     "compare sslkernels' OpenCLIP drop-ins with the real package")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sslkernels.integrations.open_clip as oc_patch  # noqa: E402
from sslkernels import nn as snn  # noqa: E402

from dropin_compare import assert_matches, assert_same_grads, twin_leaves  # noqa: E402

SIZES = [(13, 7), (29, 33), (6, 65)]  # odd sizes, one per input set
BACKENDS = ["auto", "triton"]  # auto: the CPU path here; triton: the GPU kernels through the interpreter


def _inputs(seed, n, d, *, bias: bool, scale_shape=()):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1)  # OpenCLIP passes L2-normalized features
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1)
    scale = torch.empty(scale_shape).uniform_(3.0, 30.0, generator=g)  # logit_scale.exp() of a trained model
    out = [img, txt, scale]
    if bias:
        out.append(torch.empty(scale_shape).uniform_(-12.0, 2.0, generator=g))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (False, True), (True, False), (True, True)])
def test_open_clip_ClipLoss_matches(local_loss, gather_with_grad, backend):
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=0, world_size=1)
    ours, ref = snn.ClipLoss(**kw, backend=backend), open_clip_loss.ClipLoss(**kw)
    for k, (seed, (n, d)) in enumerate(zip((11, 12, 13), SIZES)):
        # Set 1 passes a logit_bias (3.3.0's 4th argument), set 2 a [1]-shaped logit_scale
        # (nonscalar_logit_scale models), set 0 the plain CLIP call.
        x = _inputs(seed, n, d, bias=k == 1, scale_shape=(1,) if k == 2 else ())
        mine, theirs = twin_leaves(*x)
        names = ["image_features", "text_features", "logit_scale", "logit_bias"][:len(x)]
        a, b = ours(*mine), ref(*theirs)
        if k == 1:
            # CE is shift-invariant: the bias's true gradient is 0; ours is exactly 0, OpenCLIP's rounding noise.
            g_ours, g_ref = torch.autograd.grad(a, mine[3], retain_graph=True), torch.autograd.grad(
                b, theirs[3], retain_graph=True)
            assert g_ours[0].item() == 0.0 and abs(g_ref[0].item()) < 1e-5
            mine, theirs, names = mine[:3], theirs[:3], names[:3]
        assert_same_grads(a, b, mine, theirs, names)
        d_ours = ours(*x, output_dict=True)
        d_ref = ref(*x, output_dict=True)
        assert d_ours.keys() == d_ref.keys() == {"contrastive_loss"}
        assert_matches(d_ours["contrastive_loss"], d_ref["contrastive_loss"], "output_dict loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_SigLipLoss_matches(backend):
    ours, ref = snn.SigLipLoss(backend=backend), open_clip_loss.SigLipLoss()
    for k, (seed, (n, d)) in enumerate(zip((21, 22, 23), SIZES)):
        x = _inputs(seed, n, d, bias=True, scale_shape=(1,) if k == 2 else ())
        mine, theirs = twin_leaves(*x)
        assert_same_grads(ours(*mine), ref(*theirs), mine, theirs,
                          ["image_features", "text_features", "logit_scale", "logit_bias"])
        d_ours, d_ref = ours(*x, output_dict=True), ref(*x, output_dict=True)
        assert d_ours.keys() == d_ref.keys() == {"contrastive_loss"}
        assert_matches(d_ours["contrastive_loss"], d_ref["contrastive_loss"], "output_dict loss")
    # Python-float scalars and logit_bias=None (OpenCLIP then adds no bias).
    img, txt, _ = _inputs(24, 9, 5, bias=False)
    for scale, bias in ((10.0, -3.5), (7.0, None)):
        assert_matches(ours(img, txt, scale, bias), ref(img, txt, scale, bias), f"scale={scale}, bias={bias}")


def test_open_clip_helpers_match():
    """get_ground_truth / get_logits (used by OpenCLIP subclasses) and the attributes OpenCLIP sets."""
    img, txt, scale, bias = _inputs(31, 11, 6, bias=True)
    for cls in ("ClipLoss", "SigLipLoss"):
        ours, ref = getattr(snn, cls)(cache_labels=True), getattr(open_clip_loss, cls)(cache_labels=True)
        want = {k: v for k, v in vars(ref).items() if not k.startswith("_")}
        assert {k: getattr(ours, k) for k in want} == want
        for logits_o, logits_r in zip(ours.get_logits(img, txt, scale, bias), ref.get_logits(img, txt, scale, bias)):
            assert_matches(logits_o, logits_r, f"{cls}.get_logits")
    ours, ref = snn.ClipLoss(cache_labels=True), open_clip_loss.ClipLoss(cache_labels=True)
    assert torch.equal(ours.get_ground_truth(img.device, 11), ref.get_ground_truth(img.device, 11))
    assert ours.labels.keys() == ref.labels.keys() and ours.prev_num_logits == ref.prev_num_logits == 11
    ours, ref = snn.SigLipLoss(), open_clip_loss.SigLipLoss()
    for neg in (False, True):
        assert torch.equal(ours.get_ground_truth(img.device, img.dtype, 5, neg),
                           ref.get_ground_truth(img.device, img.dtype, 5, neg))


@pytest.mark.parametrize("cls,hook", [("ClipLoss", "get_logits"), ("ClipLoss", "get_ground_truth"),
                                      ("SigLipLoss", "get_logits"), ("SigLipLoss", "get_ground_truth"),
                                      ("SigLipLoss", "_loss")])
def test_open_clip_subclass_hooks_are_honoured(cls, hook):
    """A subclass that overrides one of OpenCLIP's hooks gets it called, as OpenCLIP's forward does."""
    img, txt, scale, bias = _inputs(37, 9, 5, bias=True)

    def subclass(base):
        def override(self, *args, **kwargs):
            out = getattr(base, hook)(self, *args, **kwargs)
            if hook == "get_ground_truth":  # ClipLoss: every row's positive one over; SigLipLoss: labels halved
                return out.roll(1) if out.dtype == torch.long else out * 0.5
            return tuple(x * 0.5 for x in out) if isinstance(out, tuple) else out * 0.5
        return type(f"Custom{cls}", (base,), {hook: override})

    theirs, ours = subclass(getattr(open_clip_loss, cls))(), subclass(getattr(snn, cls))()
    want = theirs(img, txt, scale, bias)
    assert_matches(ours(img, txt, scale, bias), want, f"{cls} with {hook} overridden")
    assert abs(float(want) - float(getattr(open_clip_loss, cls)()(img, txt, scale, bias))) > 1e-3  # it mattered


@pytest.mark.parametrize("cls", ["ClipLoss", "SigLipLoss"])
def test_open_clip_signatures(cls):
    """OpenCLIP's parameters, in order and with its defaults; ours adds keyword-only extras only."""
    for method in ("__init__", "forward"):
        theirs = list(inspect.signature(getattr(getattr(open_clip_loss, cls), method)).parameters.values())
        ours = list(inspect.signature(getattr(getattr(snn, cls), method)).parameters.values())
        assert [(p.name, p.default, p.kind) for p in ours[:len(theirs)]] == \
               [(p.name, p.default, p.kind) for p in theirs]
        assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs):])


def test_open_clip_errors():
    img, txt, scale, bias = _inputs(41, 8, 4, bias=True)
    for loss in (snn.ClipLoss(rank=1, world_size=2), snn.SigLipLoss(rank=1, world_size=2)):
        with pytest.raises(ValueError, match="world_size=2.*torch.distributed"):
            loss(img, txt, scale, bias)
    with pytest.raises(ValueError, match="dist_impl"):
        snn.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        snn.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="use_horovod"):
        snn.ClipLoss(world_size=2, use_horovod=True)
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        snn.ClipLoss()(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        snn.SigLipLoss()(img, txt, -scale, bias)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        snn.SigLipLoss()(img, txt, scale, float("nan"))
    with pytest.raises(TypeError, match="logit_bias"):
        snn.ClipLoss()(img, txt, scale, "bias")
    # A NaN in a tensor scalar never passes silently: the loss is NaN, as OpenCLIP's.
    assert torch.isnan(snn.ClipLoss()(img, txt, scale, torch.tensor(float("nan"))))
    # use_horovod on one process is accepted, as OpenCLIP (which never gathers there).
    assert_matches(snn.ClipLoss(use_horovod=True)(img, txt, scale), open_clip_loss.ClipLoss()(img, txt, scale), "hvd")


def test_open_clip_patch_unpatch():
    import open_clip
    import open_clip.factory as factory

    names = ("open_clip.loss", "open_clip.factory", "open_clip")
    before = {m: dict(vars(sys.modules[m])) for m in names}
    args = types.SimpleNamespace(distill=False, model="ViT-B-32", siglip=False, horovod=False, local_loss=True,
                                 gather_with_grad=True, rank=0, world_size=1, loss_dist_impl=None,
                                 coca_caption_loss_weight=1.0, coca_contrastive_loss_weight=1.0)
    try:
        oc_patch.patch()
        oc_patch.patch()  # idempotent: the saved originals stay OpenCLIP's
        assert open_clip.ClipLoss is factory.ClipLoss is open_clip_loss.ClipLoss is snn.ClipLoss
        assert factory.SigLipLoss is open_clip_loss.SigLipLoss is snn.SigLipLoss
        assert not hasattr(open_clip, "SigLipLoss")  # not exported there by OpenCLIP: not added either
        clip = open_clip.create_loss(args)
        assert type(clip) is snn.ClipLoss and clip.local_loss and clip.gather_with_grad and clip.cache_labels
        siglip = open_clip.create_loss(types.SimpleNamespace(**{**vars(args), "siglip": True}))
        assert type(siglip) is snn.SigLipLoss and siglip.dist_impl == "bidir"
        coca = open_clip.create_loss(types.SimpleNamespace(**{**vars(args), "model": "coca_ViT-B-32"}))
        assert type(coca) is before["open_clip.loss"]["CoCaLoss"]  # subclasses OpenCLIP's own ClipLoss
    finally:
        oc_patch.unpatch()
    oc_patch.unpatch()  # a second unpatch is a no-op
    for m in names:
        assert dict(vars(sys.modules[m])) == before[m], f"{m} differs after unpatch()"
    assert type(open_clip.create_loss(args)) is before["open_clip.loss"]["ClipLoss"]


def test_import_sslkernels_imports_no_peer_package():
    code = ("import sys, sslkernels, sslkernels.nn, sslkernels.integrations.open_clip, sslkernels.integrations.timm, "
            "sslkernels.integrations.solo_learn; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm', 'solo')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy(), timeout=120)


_DIST_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import torch.nn.functional as F
    import open_clip.loss as ol
    from sslkernels import nn as snn
    sys.path.insert(0, sys.argv[3])
    from dropin_compare import assert_same_grads, twin_leaves

    rank, world = int(sys.argv[1]), 2
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=world)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own rows
    img, txt = (F.normalize(torch.randn(7, 5, generator=g), dim=1) for _ in range(2))
    scale, bias = torch.tensor(9.0), torch.tensor(-4.0)
    names = ["image_features", "text_features", "logit_scale", "logit_bias"]
    for local_loss in (False, True):
        for with_grad in (False, True):
            kw = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
            mine, theirs = twin_leaves(img, txt, scale)
            assert_same_grads(snn.ClipLoss(**kw)(*mine), ol.ClipLoss(**kw)(*theirs), mine, theirs, names)
    for impl in ("bidir", "shift", "reduce", "gather"):
        kw = dict(rank=rank, world_size=world, dist_impl=impl)
        mine, theirs = twin_leaves(img, txt, scale, bias)
        assert_same_grads(snn.SigLipLoss(**kw)(*mine), ol.SigLipLoss(**kw)(*theirs), mine, theirs, names)
    dist.destroy_process_group()
    print("rank", rank, "ok")
""")


def test_open_clip_losses_match_across_two_processes(tmp_path):
    """Gathered ClipLoss (all four flag combinations) and SigLipLoss (every dist_impl) on 2 gloo ranks:
    ours and OpenCLIP's side by side in each process, loss and gradients on that rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, here], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=os.environ.copy()) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, f"rank {r} failed:\n{out[-3000:]}"


def test_open_clip_patch_takes_bool_switches():
    # A truthy string or None silently chose what to patch; lightly's patch() refuses non-bools too.
    for kwargs in ({"clip_loss": "no"}, {"siglip_loss": None}):
        with pytest.raises(TypeError, match="must be a bool"):
            oc_patch.patch(**kwargs)
    assert not oc_patch.is_patched()
