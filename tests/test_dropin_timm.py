"""sslkernels.nn.ModelEmaV3 against timm's own ModelEmaV3 (timm 1.0.31, imported as installed): EMA weights
and buffers after several update() calls (decay schedules, buffers, tied weights, bf16 stochastic
rounding), get_decay, set, state-dict compatibility both ways, signature, errors, and
sslkernels.integrations.timm.patch() / unpatch()."""
import inspect
import sys

import pytest

timm_ema = pytest.importorskip("timm.utils.model_ema", reason="timm is not installed: these tests compare "
                               "sslkernels.nn.ModelEmaV3 with the real timm.utils.ModelEmaV3")
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sslkernels.integrations.timm as timm_patch  # noqa: E402
from sslkernels import functional as Fn  # noqa: E402
from sslkernels import nn as snn  # noqa: E402

from dropin_compare import assert_matches  # noqa: E402

TimmEma = timm_ema.ModelEmaV3


class Net(nn.Module):
    """Parameters, BatchNorm statistics (float buffers + an int64 counter), a non-persistent buffer and a tied
    weight (listed twice in the state dict): every case timm's update treats differently."""

    def __init__(self, d=7, h=13, tied=True):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.bn = nn.BatchNorm1d(h)
        self.mid = nn.Linear(h, h, bias=False)
        self.tied = nn.Linear(h, h)
        if tied:
            self.tied.weight = self.mid.weight
        self.out = nn.Linear(h, 5)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.out(self.tied(torch.relu(self.mid(self.bn(self.inp(x))))))


def _train_step(model, g):
    """What a training step does to the state the EMA reads: new weights, new BatchNorm statistics."""
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.scratch.add_(1.0)
        model(torch.randn(11, 7, generator=g).to(next(model.parameters()).dtype))


def _assert_same_state(ours, ref, *, exact=False):
    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr)
    for k in sr:
        if exact or not sr[k].is_floating_point():
            assert torch.equal(so[k], sr[k]), k
        else:
            assert_matches(so[k], sr[k], k)
    assert torch.equal(ours.module.scratch, ref.module.scratch)  # non-persistent: not in the state dict


CONFIGS = [  # (constructor keywords, steps passed to update(): None = no step)
    (dict(decay=0.9), [None] * 5),
    (dict(decay=0.99, update_after_step=2), [0, 1, 2, 3, 4, 5, 6]),
    (dict(decay=0.999, use_warmup=True, warmup_gamma=1.5, warmup_power=0.75, min_decay=0.2), list(range(1, 8))),
    (dict(decay=0.95, exclude_buffers=True, update_after_step=1, use_warmup=True), [3, 4, 5, 6]),
    (dict(decay=0.97, foreach=False, device="cpu"), [10, 11, 12]),
]


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_timm_ModelEmaV3_matches(case, backend):
    kwargs, steps = CONFIGS[case]
    for seed in (case, 10 + case, 20 + case):  # 3 input sets: fresh model and training run each
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = Net(d=7, h=13 + 2 * (seed % 3))
        ours, ref = snn.ModelEmaV3(model, **kwargs, backend=backend), TimmEma(model, **kwargs)
        assert {k: getattr(ours, k) for k in vars(ref) if not k.startswith("_")} == \
               {k: v for k, v in vars(ref).items() if not k.startswith("_")}  # timm's attributes, same values
        for step in steps:
            _train_step(model, g)
            assert ours.get_decay(step) == ref.get_decay(step)
            ours.update(model, step=step)
            ref.update(model, step=step)
            _assert_same_state(ours, ref)
        assert not ours.module.training and not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("foreach", [True, False])
def test_timm_ModelEmaV3_bf16_stochastic_rounding_matches(foreach):
    """bf16 EMA tensors with timm's default stochastic rounding: the same private RNG draws, so the
    same bits; with dtype=torch.float32 the EMA stays in fp32 over a bf16 model (the fused mixed-dtype path;
    without tied weights: see test_timm_ModelEmaV3_tied_weights). On CPU one randint of n + m draws the
    same bits as two of n and m, so this cannot tell timm's grouping of the draws (foreach on: one group,
    off: per tensor) apart; on CUDA (Philox offsets) it can."""
    g = torch.Generator().manual_seed(5)
    model = Net(tied=False).to(torch.bfloat16)
    ours = snn.ModelEmaV3(model, decay=0.999, foreach=foreach, stochastic_rounding_seed=3)
    ref = TimmEma(model, decay=0.999, foreach=foreach, stochastic_rounding_seed=3)
    ours32, ref32 = snn.ModelEmaV3(model, decay=0.99, dtype=torch.float32), TimmEma(model, decay=0.99,
                                                                                      dtype=torch.float32)
    for step in range(4):
        _train_step(model, g)
        for e in (ours, ref, ours32, ref32):
            e.update(model, step=step + 5)
        _assert_same_state(ours, ref, exact=True)
        _assert_same_state(ours32, ref32)
    assert ours32.module.inp.weight.dtype == torch.float32


def test_timm_ModelEmaV3_tied_weights():
    """A weight listed twice in the state dict is lerped twice by timm (same-dtype path, checked against timm
    above): t ← m²t + (1 − m²)s. Ours gives that on every path; timm's mixed-dtype path (foreach mul, then
    add) gives m²t + 2(1 − m)s there, which is not an average: not mirrored."""
    model = Net().to(torch.bfloat16)
    ema = snn.ModelEmaV3(model, decay=0.9, dtype=torch.float32)
    t0 = ema.module.mid.weight.clone()
    with torch.no_grad():
        model.mid.weight.add_(1.0)
    ema.update(model)
    want = 0.81 * t0.double() + 0.19 * model.mid.weight.double()
    assert_matches(ema.module.mid.weight, want, "tied weight")
    assert ema.module.tied.weight is ema.module.mid.weight


def test_timm_ModelEmaV3_get_decay_matches():
    for kwargs in ({}, dict(update_after_step=3), dict(use_warmup=True),
                   dict(use_warmup=True, warmup_gamma=2.0, warmup_power=0.5, min_decay=0.3, decay=0.99)):
        ours, ref = snn.ModelEmaV3(nn.Linear(2, 2), **kwargs), TimmEma(nn.Linear(2, 2), **kwargs)
        assert [ours.get_decay(s) for s in [None, *range(0, 60, 3), 10 ** 6]] == \
               [ref.get_decay(s) for s in [None, *range(0, 60, 3), 10 ** 6]]


def test_timm_ModelEmaV3_state_dict_round_trip_and_set():
    g = torch.Generator().manual_seed(7)
    model = Net()
    ours, ref = snn.ModelEmaV3(model, decay=0.8), TimmEma(model, decay=0.8)
    for step in range(3):
        _train_step(model, g)
        ours.update(model, step)
        ref.update(model, step)
    # Same keys; timm's checkpoint loads strictly into ours and ours into timm's, and the weights carry over.
    fresh_ours, fresh_ref = snn.ModelEmaV3(Net()), TimmEma(Net())
    fresh_ours.load_state_dict(ref.state_dict())
    fresh_ref.load_state_dict(ours.state_dict())
    _assert_same_state(fresh_ours, ref, exact=True)
    _assert_same_state(fresh_ref, ours, exact=True)
    # set(): the EMA copy becomes the model.
    _train_step(model, g)
    ours.set(model)
    ref.set(model)
    _assert_same_state(ours, ref, exact=True)
    assert torch.equal(ours.module.inp.weight, model.inp.weight)
    x = torch.randn(4, 7, generator=g)
    assert torch.equal(ours(x), ref(x))  # forward runs the (eval-mode) copy


def test_timm_ModelEmaV3_update_is_one_fused_call(monkeypatch):
    """Every lerped tensor goes to ema_update_ in one call (one kernel launch per dtype pair on a GPU);
    the tied weight, listed twice, goes to a second call with decay²."""
    calls = []
    real = Fn.ema_update_

    def spy(targets, sources, momentum, **kw):
        calls.append((len(targets), momentum))
        return real(targets, sources, momentum, **kw)

    monkeypatch.setattr(Fn, "ema_update_", spy)
    model = Net()
    ema = snn.ModelEmaV3(model, decay=0.9)
    ema.update(model)
    n_float = sum(v.is_floating_point() for v in model.state_dict().values())
    assert sorted(calls) == [(1, pytest.approx(0.81)), (n_float - 2, 0.9)]


def test_timm_ModelEmaV3_signature():
    theirs = list(inspect.signature(TimmEma.__init__).parameters.values())
    ours = list(inspect.signature(snn.ModelEmaV3.__init__).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[:len(theirs)]] == [(p.name, p.default, p.kind) for p in theirs]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs):])
    for method in ("update", "get_decay", "set", "apply_update_", "apply_update_no_buffers_"):
        assert list(inspect.signature(getattr(snn.ModelEmaV3, method)).parameters) == \
               list(inspect.signature(getattr(TimmEma, method)).parameters), method


def test_timm_ModelEmaV3_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        snn.ModelEmaV3(torch.zeros(3))
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay must be a float in"):
            snn.ModelEmaV3(nn.Linear(2, 2), decay=bad)
    with pytest.raises(ValueError, match="min_decay"):
        snn.ModelEmaV3(nn.Linear(2, 2), min_decay=2.0)
    ema = snn.ModelEmaV3(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="state dict has 1 entries"):
        ema.update(nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match="'weight'"):
        ema.update(nn.Linear(4, 2))


def test_timm_patch_unpatch():
    import timm.task.task
    import timm.utils

    mods = ("timm.utils.model_ema", "timm.utils", "timm.task.task")
    before = {m: dict(vars(sys.modules[m])) for m in mods}
    try:
        timm_patch.patch()
        timm_patch.patch()  # idempotent
        assert timm.utils.ModelEmaV3 is timm_ema.ModelEmaV3 is timm.task.task.ModelEmaV3 is snn.ModelEmaV3
        assert isinstance(timm.utils.ModelEmaV3(nn.Linear(2, 2)), snn.ModelEmaV3)
    finally:
        timm_patch.unpatch()
    timm_patch.unpatch()  # no-op
    for m in mods:
        assert dict(vars(sys.modules[m])) == before[m], f"{m} differs after unpatch()"
    assert timm.utils.ModelEmaV3 is TimmEma
