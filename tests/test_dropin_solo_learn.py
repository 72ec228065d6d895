"""sslkernels.integrations.solo_learn against solo-learn 1.0.2's own loss functions: loss and the gradient
of every input, fp32, on fresh random inputs; signatures; errors.

How solo-learn is loaded: ``import solo.losses`` fails in a plain environment, because ``solo/__init__.py``
imports solo's whole training stack (pytorch-lightning 1.4, lightning-bolts, ...). The loss files themselves
import only torch, so each one (solo/losses/<name>.py of the installed package, unmodified) is executed
by path with importlib under a private module name; no helper is stubbed and no loss code is copied.
(``pytest.importorskip("solo")`` would therefore always skip; the module is located with find_spec instead.)
"""
import importlib.util
import inspect
import os

import pytest

_spec = importlib.util.find_spec("solo")  # locates the package without running solo/__init__.py
if _spec is None or not _spec.submodule_search_locations:
    pytest.skip("solo-learn is not installed: these tests compare sslkernels' solo-learn drop-ins with its own "
                "loss functions", allow_module_level=True)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sslkernels.integrations import solo_learn as ours  # noqa: E402

from dropin_compare import assert_matches, assert_same_grads, twin_leaves  # noqa: E402

LOSSES_DIR = os.path.join(list(_spec.submodule_search_locations)[0], "losses")


def _solo(name):
    path = os.path.join(LOSSES_DIR, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_solo_losses_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


solo = {name: _solo(name) for name in ("simclr", "moco", "byol", "simsiam", "barlow", "vicreg")}
SIZES = [(13, 7), (29, 33), (6, 65)]
BACKENDS = ["auto", "triton"]


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_solo_simclr_loss_func_matches(backend):
    for seed, (n, d) in zip((1, 2, 3), SIZES):
        g = torch.Generator().manual_seed(seed)
        z1, z2 = 2 * _randn(g, n, d), _randn(g, n, d)  # not normalized: both normalize inside
        labels = torch.randint(0, 3, (n,), generator=g)
        supervised = (torch.cat([labels, labels])[:, None] == torch.cat([labels, labels])[None, :])
        supervised.fill_diagonal_(False)  # solo's gen_extra_positives_gt
        irregular = torch.rand(2 * n, 2 * n, generator=g) < 0.2  # not a label structure, diagonal included
        for tau in (0.1, 0.37):
            for mask in (None, supervised, irregular):
                mine, theirs = twin_leaves(z1, z2)
                a = ours.simclr_loss_func(*mine, temperature=tau, extra_pos_mask=mask, backend=backend)
                b = solo["simclr"].simclr_loss_func(*theirs, temperature=tau, extra_pos_mask=mask)
                assert_same_grads(a, b, mine, theirs, ["z1", "z2"])


def test_solo_simclr_loss_func_takes_the_fused_paths(monkeypatch):
    """No mask: nt_xent; a label mask: supcon_loss with those labels; an irregular mask: the eager formula."""
    import sslkernels.functional as Fn

    seen = []
    for name in ("nt_xent", "supcon_loss"):
        real = getattr(Fn, name)
        monkeypatch.setattr(Fn, name, lambda *a, _n=name, _f=real, **k: seen.append(_n) or _f(*a, **k))
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 1, 0, 2, 1]).repeat(2)
    mask = labels[:, None] == labels[None, :]
    mask.fill_diagonal_(False)
    ours.simclr_loss_func(z1, z2)
    ours.simclr_loss_func(z1, z2, extra_pos_mask=mask)
    ours.simclr_loss_func(z1, z2, extra_pos_mask=mask.to(torch.uint8))
    assert seen == ["nt_xent", "supcon_loss", "supcon_loss"]
    mask[0, 1] = True  # breaks symmetry: no labels describe it
    ours.simclr_loss_func(z1, z2, extra_pos_mask=mask)
    assert seen == ["nt_xent", "supcon_loss", "supcon_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_solo_moco_loss_func_matches(backend):
    for seed, (n, d) in zip((4, 5, 6), SIZES):
        g = torch.Generator().manual_seed(seed)
        q, k = F.normalize(_randn(g, n, d), dim=1), F.normalize(_randn(g, n, d), dim=1)
        queue = F.normalize(_randn(g, d, 3 * n + 4), dim=0)  # solo's D×K queue, columns normalized
        for tau in (0.1, 0.2):
            mine, theirs = twin_leaves(q, k)  # key with a gradient too: both give it one
            a = ours.moco_loss_func(*mine, queue, tau, backend=backend)
            b = solo["moco"].moco_loss_func(*theirs, queue, tau)
            assert_same_grads(a, b, mine, theirs, ["query", "key"])
            mine, theirs = twin_leaves(q)  # the usual call: key from the momentum encoder, no gradient
            assert_same_grads(ours.moco_loss_func(mine[0], k, queue, backend=backend),
                              solo["moco"].moco_loss_func(theirs[0], k, queue), mine, theirs, ["query"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_solo_byol_and_simsiam_loss_func_match(name, backend):
    fn = f"{name}_loss_func"
    for seed, (n, d) in zip((7, 8, 9), SIZES):
        g = torch.Generator().manual_seed(seed)
        p, z = 3 * _randn(g, n, d), _randn(g, n, d)
        for simplified in (True, False):
            mine, theirs = twin_leaves(p, z)  # z requires grad: both stop its gradient
            a = getattr(ours, fn)(*mine, simplified, backend=backend)
            b = getattr(solo[name], fn)(*theirs, simplified)
            assert_same_grads(a, b, mine, theirs, ["p", "z"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_solo_barlow_and_vicreg_loss_func_match(backend):
    for seed, (n, d) in zip((10, 11, 12), SIZES):
        g = torch.Generator().manual_seed(seed)
        z1, z2 = _randn(g, n, d) + 1, 2 * _randn(g, n, d)
        mine, theirs = twin_leaves(z1, z2)
        assert_same_grads(ours.barlow_loss_func(*mine, 0.01, 0.5, backend=backend),
                          solo["barlow"].barlow_loss_func(*theirs, 0.01, 0.5), mine, theirs, ["z1", "z2"])
        mine, theirs = twin_leaves(z1, z2)
        assert_same_grads(ours.vicreg_loss_func(*mine, 20.0, 30.0, 2.0, backend=backend),
                          solo["vicreg"].vicreg_loss_func(*theirs, 20.0, 30.0, 2.0), mine, theirs, ["z1", "z2"])


def test_solo_signatures():
    for name, fn in (("simclr", "simclr_loss_func"), ("moco", "moco_loss_func"), ("byol", "byol_loss_func"),
                     ("simsiam", "simsiam_loss_func"), ("barlow", "barlow_loss_func"),
                     ("vicreg", "vicreg_loss_func")):
        theirs = list(inspect.signature(getattr(solo[name], fn)).parameters.values())
        mine = list(inspect.signature(getattr(ours, fn)).parameters.values())
        assert [(p.name, p.default) for p in mine[:len(theirs)]] == [(p.name, p.default) for p in theirs], fn
        assert [p.name for p in mine[len(theirs):]] == ["backend"], fn


def test_solo_errors():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"extra_pos_mask must have shape \[8, 8\]"):
        ours.simclr_loss_func(z, z, extra_pos_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="extra_pos_mask must be a bool"):
        ours.simclr_loss_func(z, z, extra_pos_mask=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ours.simclr_loss_func(z, z, extra_pos_mask=torch.full((8, 8), 2))
    with pytest.raises(ValueError, match="z2 has shape"):
        ours.simclr_loss_func(z, z[:3])
    with pytest.raises(ValueError, match="temperature must be positive"):
        ours.simclr_loss_func(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="solo-learn's queue is D×K"):
        ours.moco_loss_func(z, z, torch.randn(10, 3))
    with pytest.raises(ValueError, match="queue requires grad"):
        ours.moco_loss_func(z, z, torch.randn(3, 10, requires_grad=True))
    with pytest.raises(TypeError, match="simplified must be a bool"):
        ours.byol_loss_func(z, z, simplified="yes")
    # NaN never passes silently.
    assert torch.isnan(ours.byol_loss_func(torch.full((4, 3), float("nan")), z))


def test_solo_barlow_and_vicreg_weights_are_checked_by_solos_names():
    # vicreg_loss_func passes 2 * var_loss_weight on: the error named var_weight and reported -2.0 for -1.0.
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    for kwargs, pattern in (({"sim_loss_weight": -1.0}, "^sim_loss_weight must be"),
                            ({"var_loss_weight": -1.0}, r"^var_loss_weight must be non-negative and finite, got -1.0"),
                            ({"cov_loss_weight": float("nan")}, "^cov_loss_weight must be")):
        with pytest.raises(ValueError, match=pattern):
            ours.vicreg_loss_func(z1, z2, **kwargs)
    with pytest.raises(ValueError, match="^lamb must be"):  # was lambda_offdiag
        ours.barlow_loss_func(z1, z2, lamb=-1.0)
    with pytest.raises(TypeError, match="^scale_loss must be a float"):  # was "only integer tensors ... to an index"
        ours.barlow_loss_func(z1, z2, scale_loss="a")
    with pytest.raises(ValueError, match="^scale_loss must be"):  # a negative scale turned the loss upside down
        ours.barlow_loss_func(z1, z2, scale_loss=-1.0)
