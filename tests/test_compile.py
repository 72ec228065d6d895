"""torch.compile(fullgraph=True) over training steps that use sslkernels' ops (sslkernels/library.py).

Each test compiles a step's forward (a tiny linear model -> features -> loss) with fullgraph=True, which
raises on any graph break, runs the backward through the compiled graph (a backward() call inside the
compiled function would itself be a graph break), and compares the loss and every gradient with the same
step run eagerly. A recording backend (aot_eager that keeps the graphs' ops) checks that the loss entered
the graph as its sslkernels custom op: a step that silently fell back to eager, or traced into an
implementation, fails. One test uses the default inductor backend (C++ codegen) end to end.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import sslkernels
from sslkernels import nn as snn
from sslkernels.backends import triton_interpreted
from sslkernels.state import MemoryQueue

D_IN, D = 12, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Test functions share code objects across parameters: without a reset their cache entries pile up
    # until the recompile limit, past which Dynamo runs the function eagerly without complaint.
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Recorder:
    """An aot_eager backend that records each Dynamo graph and the ops of its forward and backward graphs."""

    def __init__(self):
        self.graphs, self.ops = 0, []

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def keep(graph, _inputs):
            for n in graph.graph.nodes:
                if n.op == "call_function":
                    # A mutating op appears wrapped: auto_functionalized(op, ...).
                    functionalized = str(n.target).startswith("auto_functionalized")
                    self.ops.append(str(n.args[0] if functionalized else n.target))
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def expect(self, *ops):
        # fullgraph=True already guarantees one graph per compiled frame (Dynamo may restart a trace, so
        # backend calls are not counted); here: the op is in it.
        assert self.graphs >= 1, "nothing was compiled"
        for op in ops:
            assert f"sslkernels.{op}.default" in self.ops, f"{op} is not in the graphs: {sorted(set(self.ops))}"


def close(actual, expected, name):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def train_step(forward, params, args):
    """Loss and the gradients of ``params`` after backward of loss·w (a random upstream gradient)."""
    for p in params:
        p.grad = None
    loss = forward(*args)
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    (loss * weight).sum().backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


def compare_compiled(forward, params, args, *ops, backend=None):
    """Compile ``forward`` with fullgraph=True and check loss and gradients against eager, and the graph's ops."""
    recorder = Recorder() if backend is None else None
    compiled = torch.compile(forward, fullgraph=True, backend=recorder or backend)
    loss_c, grads_c = train_step(compiled, params, args)
    loss_e, grads_e = train_step(forward, params, args)
    close(loss_c, loss_e, "loss")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        assert ge is not None and gc is not None, f"param {i} got no gradient"
        close(gc, ge, f"grad of param {i} {tuple(ge.shape)}")
    if recorder is not None:
        recorder.expect(*ops)
    return loss_c


def encoder():
    return nn.Linear(D_IN, D)


def embed(model, x):
    return F.normalize(model(x), dim=1)


def loss_ops(name, reduction):
    """The custom ops a compiled step with a loss that needs gradients must contain."""
    if reduction == "none":
        return (name, f"{name}_backward")  # the backward recomputes
    return (f"{name}_with_grads",)


# ----------------------------------------------------------------------------------------- losses


INFO_NCE_CASES = {
    "float tau, mean": dict(temperature=0.2),
    "learnable tau, sum, symmetric": dict(temperature="scalar", symmetric=True, reduction="sum"),
    "per-anchor tau, targets, decoupled": dict(temperature="per-anchor", targets=True, decoupled=True),
    "learnable tau, none": dict(temperature="scalar", reduction="none"),
}


@pytest.mark.parametrize("case", list(INFO_NCE_CASES))
def test_info_nce_step_compiles(case):
    opts = dict(INFO_NCE_CASES[case])
    n, m = 6, 6
    model = encoder()
    params = list(model.parameters())
    temperature = opts.pop("temperature")
    if temperature == "scalar":
        temperature = torch.tensor(0.3, requires_grad=True)
        params.append(temperature)
    elif temperature == "per-anchor":
        temperature = (torch.rand(n) * 0.3 + 0.1).requires_grad_()
        params.append(temperature)
    targets = torch.randint(0, m, (n,)) if opts.pop("targets", False) else None

    def forward(x1, x2):
        return sslkernels.info_nce(embed(model, x1), embed(model, x2), temperature, targets=targets, **opts)

    compare_compiled(forward, params, (torch.randn(n, D_IN), torch.randn(m, D_IN)),
                     *loss_ops("info_nce", opts.get("reduction", "mean")))


def test_a_float_temperature_that_changes_recompiles_and_stays_correct():
    # Dynamo passes a float that changed as a symbolic value: validation must still trace (no graph break),
    # and the op specializes on it.
    x = torch.randn(5, D, requires_grad=True)
    y = torch.randn(5, D)
    step = torch.compile(lambda a, b, t: sslkernels.info_nce(a, b, t), fullgraph=True, backend="aot_eager")
    for t in (0.1, 0.2, 0.3):
        compiled, eager = step(x, y, t), sslkernels.info_nce(x, y, t)
        close(compiled, eager.detach(), f"loss at temperature {t}")
        close(torch.autograd.grad(compiled, x)[0], torch.autograd.grad(eager, x)[0], f"grad at temperature {t}")
    with pytest.raises(Exception, match="temperature must be positive and finite"):
        step(x, y, float("nan"))


def test_a_changing_batch_size_compiles_with_dynamic_shapes():
    # After one recompile Dynamo makes the batch size symbolic: the fakes must work on symbolic shapes.
    model = encoder()
    step = torch.compile(lambda x1, x2, tg: sslkernels.info_nce(embed(model, x1), embed(model, x2), targets=tg,
                                                                 reduction="none"), fullgraph=True, backend="aot_eager")
    for n in (4, 5, 6):
        x1, x2, targets = torch.randn(n, D_IN), torch.randn(9, D_IN), torch.randint(0, 9, (n,))
        close(step(x1, x2, targets).detach(), sslkernels.info_nce(embed(model, x1), embed(model, x2), targets=targets,
                                                                  reduction="none").detach(), f"loss at batch {n}")


def test_a_tensor_temperature_and_a_changing_batch_size_compile_once_more():
    # The argument checks must not guard on the symbolic batch size (formatting it in a message did: a
    # recompile for every batch size, then fullgraph's recompile limit).
    model, log_tau = encoder(), torch.nn.Parameter(torch.tensor(-2.0))
    rec = Recorder()
    step = torch.compile(lambda x1, x2: sslkernels.info_nce(embed(model, x1), embed(model, x2), log_tau.exp()),
                         fullgraph=True, backend=rec)
    for n in range(3, 12):
        step(torch.randn(n, D_IN), torch.randn(n, D_IN)).backward()
    assert rec.graphs <= 2, rec.graphs  # the first size, then one symbolic graph


def test_a_non_finite_logit_bias_tensor_is_refused_when_the_op_runs():
    step = torch.compile(lambda a, b, s, c: sslkernels.siglip_loss(a, b, s, c), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="logit_bias"):
        step(torch.randn(4, D_IN), torch.randn(4, D_IN), torch.tensor(10.0), torch.tensor(float("nan")))


def test_dino_module_with_an_epoch_compiles_without_a_graph_break():
    # The teacher-temperature schedule is read as a Python float (an array element would be data-dependent).
    for crit in (snn.DINOLoss(8, 4, 0.04, 0.07, 3, 10), snn.DINOLoss(8, 0.04, 0.07, 3)):
        s, t = torch.randn(12, 8, requires_grad=True), torch.randn(6, 8)
        if crit.ncrops is None:  # lightly's form: lists of crops, epoch inside the warm-up
            fn = lambda s, t: crit(list(t.chunk(2)), list(s.chunk(4)), epoch=1)  # noqa: E731
        else:
            fn = lambda s, t: crit(s, t, 1)  # noqa: E731
        assert torch._dynamo.explain(fn)(s, t).graph_break_count == 0


@pytest.mark.parametrize("learnable", [False, True])
def test_nt_xent_step_compiles(learnable):
    model = encoder()
    params = list(model.parameters())
    temperature = torch.tensor(0.5, requires_grad=True) if learnable else 0.5
    if learnable:
        params.append(temperature)

    def forward(x1, x2):
        return sslkernels.nt_xent(embed(model, x1), embed(model, x2), temperature, decoupled=learnable)

    compare_compiled(forward, params, (torch.randn(5, D_IN), torch.randn(5, D_IN)), "nt_xent_with_grads")


def test_ntxent_module_with_lightly_signature_compiles():
    model, loss_fn = encoder(), sslkernels.nn.NTXentLoss(temperature=0.5)

    def forward(x1, x2):
        return loss_fn(model(x1), model(x2))

    compare_compiled(forward, list(model.parameters()), (torch.randn(5, D_IN), torch.randn(5, D_IN)),
                     "nt_xent_with_grads")


def test_ntxent_module_with_a_memory_bank_compiles_and_writes_the_bank():
    # lightly's MoCo mode: the bank write (rows past the end dropped, ptr back to 0) is decided on the device,
    # so the step is one graph; steps 3 and 6 reach the end of the 7-row bank.
    model = encoder()
    eager_loss = sslkernels.nn.NTXentLoss(temperature=0.5, memory_bank_size=(7, D))
    compiled_loss = copy.deepcopy(eager_loss)
    recorder = Recorder()
    compiled = torch.compile(lambda x1, x2: compiled_loss(model(x1), model(x2)), fullgraph=True, backend=recorder)
    for step in range(7):
        x1, x2 = torch.randn(3, D_IN), torch.randn(3, D_IN)
        loss_c, grads_c = train_step(compiled, list(model.parameters()), (x1, x2))
        loss_e, grads_e = train_step(lambda a, b: eager_loss(model(a), model(b)), list(model.parameters()), (x1, x2))
        close(loss_c, loss_e, f"loss, step {step}")
        for gc, ge in zip(grads_c, grads_e):
            close(gc, ge, f"grad, step {step}")
        want_ptr = [3, 6, 0, 3, 6, 0, 3][step]
        assert int(compiled_loss.memory_bank.bank_ptr) == int(eager_loss.memory_bank.bank_ptr) == want_ptr, step
        assert torch.equal(compiled_loss.memory_bank.bank, eager_loss.memory_bank.bank), f"bank, step {step}"
    recorder.expect("moco_loss_with_grads")


def clip_setup():
    image, text = encoder(), nn.Linear(D_IN + 2, D)
    log_scale = nn.Parameter(torch.tensor(2.0))
    params = list(image.parameters()) + list(text.parameters()) + [log_scale]

    def forward(xi, xt):
        return sslkernels.clip_loss(embed(image, xi), embed(text, xt), log_scale.exp())

    return forward, params, (torch.randn(6, D_IN), torch.randn(6, D_IN + 2))


def test_clip_loss_step_compiles():
    forward, params, args = clip_setup()
    compare_compiled(forward, params, args, "clip_loss_with_grads")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_siglip_loss_step_compiles(reduction):
    model = encoder()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)

    def forward(x1, x2):
        return sslkernels.siglip_loss(embed(model, x1), embed(model, x2), scale, bias, reduction=reduction)

    compare_compiled(forward, list(model.parameters()) + [scale, bias], (torch.randn(5, D_IN), torch.randn(5, D_IN)),
                     *loss_ops("siglip_loss", reduction))


def test_supcon_loss_step_compiles():
    model = encoder()
    temperature = torch.tensor(0.2, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])  # class 2 and 3: anchors without a positive

    def forward(x):
        return sslkernels.supcon_loss(embed(model, x), labels, temperature)

    compare_compiled(forward, list(model.parameters()) + [temperature], (torch.randn(6, D_IN),),
                     "supcon_loss_with_grads")


@pytest.mark.parametrize("queue_kind", ["MemoryQueue", "tensor"])
@pytest.mark.parametrize("key_grad", [False, True])
def test_moco_loss_step_compiles(queue_kind, key_grad):
    query_encoder = encoder()
    key_encoder = query_encoder if key_grad else encoder().requires_grad_(False)
    queue = MemoryQueue(16, D)
    negatives = queue if queue_kind == "MemoryQueue" else queue.queue

    def forward(xq, xk):
        return sslkernels.moco_loss(embed(query_encoder, xq), embed(key_encoder, xk), negatives, 0.2)

    params = list(query_encoder.parameters())
    recorder = Recorder()
    forward_c = torch.compile(forward, fullgraph=True, backend=recorder)
    for _ in range(2):  # the second step reads the queue as enqueued after the first
        xq, xk = torch.randn(4, D_IN), torch.randn(4, D_IN)
        loss_c, grads_c = train_step(forward_c, params, (xq, xk))
        loss_e, grads_e = train_step(forward, params, (xq, xk))
        close(loss_c, loss_e, "loss")
        for gc, ge in zip(grads_c, grads_e):
            close(gc, ge, "grad")
        queue.enqueue_(embed(key_encoder, xk).detach())
    recorder.expect("moco_loss_with_grads")
    assert counters["stats"]["unique_graphs"] == 1, "the enqueue made the step recompile"


@pytest.mark.parametrize("teacher_temp, reduction", [("float", "mean"), ("tensor", "none")])
def test_dino_loss_step_compiles(teacher_temp, reduction):
    student, teacher = encoder(), encoder().requires_grad_(False)
    center = torch.randn(1, D) * 0.1
    tt = 0.04 if teacher_temp == "float" else torch.tensor(0.05)
    b, global_crops, local_crops = 3, 2, 2

    def forward(x_global, x_local):
        s = torch.cat([student(x_global), student(x_local)])
        with torch.no_grad():
            t = teacher(x_global)
        return sslkernels.dino_loss(s, t, center, teacher_temp=tt, n_global_crops=global_crops, reduction=reduction)

    compare_compiled(forward, list(student.parameters()),
                     (torch.randn(global_crops * b, D_IN), torch.randn(local_crops * b, D_IN)),
                     *loss_ops("dino_loss", reduction))


@pytest.mark.parametrize("name", ["barlow_twins_loss", "vicreg_loss"])
def test_cross_correlation_losses_step_compiles(name):
    model = encoder()

    def forward(x1, x2):
        return getattr(sslkernels, name)(model(x1), model(x2))

    compare_compiled(forward, list(model.parameters()), (torch.randn(6, D_IN), torch.randn(6, D_IN)),
                     f"{name}_with_grads")


def test_evaluation_under_no_grad_compiles_to_the_loss_op():
    model = encoder()

    @torch.no_grad()
    def evaluate(x1, x2):
        return sslkernels.info_nce(embed(model, x1), embed(model, x2), 0.1, reduction="none")

    recorder = Recorder()
    x1, x2 = torch.randn(5, D_IN), torch.randn(5, D_IN)
    close(torch.compile(evaluate, fullgraph=True, backend=recorder)(x1, x2), evaluate(x1, x2), "loss")
    recorder.expect("info_nce")
    assert "sslkernels.info_nce_with_grads.default" not in recorder.ops


@pytest.mark.skipif(not triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_backend_step_compiles():
    model = encoder()
    temperature = torch.tensor(0.3, requires_grad=True)

    def forward(x1, x2):
        return sslkernels.info_nce(embed(model, x1), embed(model, x2), temperature, backend="triton")

    compare_compiled(forward, list(model.parameters()) + [temperature], (torch.randn(5, D_IN), torch.randn(5, D_IN)),
                     "info_nce_with_grads")


# ----------------------------------------------------------------------------------------- ema_update_


def ema_graph_check(fn, *args):
    recorder = Recorder()
    torch.compile(fn, fullgraph=True, backend=recorder)(*args)
    recorder.expect("ema_update_")


@pytest.mark.parametrize("momentum", ["float", "tensor"])
def test_ema_update_on_tensor_lists_compiles(momentum):
    shapes = [(5, 3), (7,), (2, 3, 4)]
    targets = [torch.randn(s) for s in shapes]
    sources = [torch.randn(s) for s in shapes]
    m = 0.9 if momentum == "float" else torch.tensor(0.9, dtype=torch.float64)
    expected = [t.clone() for t in targets]
    sslkernels.ema_update_(expected, sources, m)

    def step(ts, ss):
        sslkernels.ema_update_(ts, ss, m)

    before = [t.data_ptr() for t in targets]
    ema_graph_check(step, targets, sources)
    assert [t.data_ptr() for t in targets] == before
    for t, e in zip(targets, expected):
        assert torch.equal(t, e)


def test_ema_update_on_modules_compiles():
    def net():
        return nn.Sequential(nn.Linear(D_IN, D), nn.BatchNorm1d(D), nn.Linear(D, 3))

    student = net()
    student.train()(torch.randn(8, D_IN))  # non-trivial running statistics to copy
    teacher = net().requires_grad_(False)
    expected = net().requires_grad_(False)
    expected.load_state_dict(teacher.state_dict())
    momentum = torch.tensor(0.99)
    sslkernels.ema_update_(expected, student, momentum)

    def step(t, s):
        sslkernels.ema_update_(t, s, momentum)

    ema_graph_check(step, teacher, student)
    for (name, t), e in zip(teacher.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(t, e), name


def test_momentum_encoder_update_compiles():
    from sslkernels.state import MomentumEncoder

    student = encoder()
    compiled_teacher, eager_teacher = MomentumEncoder(student, total_steps=10), MomentumEncoder(student, total_steps=10)
    recorder = Recorder()
    update = torch.compile(lambda: compiled_teacher.update_(student), fullgraph=True, backend=recorder)
    for _ in range(3):  # the scheduled momentum is a device tensor: one graph serves every step
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        update()
        eager_teacher.update_(student)
    recorder.expect("ema_update_")
    assert counters["stats"]["unique_graphs"] == 1, "a new momentum made the update recompile"
    for (name, t), e in zip(compiled_teacher.state_dict().items(), eager_teacher.state_dict().values()):
        assert torch.equal(t, e), name


# ------------------------------------------------------------------------------------------ inductor


def test_inductor_compiles_a_clip_step_and_an_ema_update():
    """The default backend: inductor generates C++ for the model and calls the custom ops."""
    forward, params, args = clip_setup()
    compare_compiled(forward, params, args, backend="inductor")
    teacher = [torch.randn(4, 3), torch.randn(3)]
    sources = [torch.randn(4, 3), torch.randn(3)]
    expected = [t.clone() for t in teacher]
    sslkernels.ema_update_(expected, sources, 0.5)
    torch.compile(lambda t, s: sslkernels.ema_update_(t, s, 0.5), fullgraph=True)(teacher, sources)
    for t, e in zip(teacher, expected):
        assert torch.equal(t, e)


# ---------------------------------------------------------------------------------------- validation


def test_validation_errors_under_compile():
    x = torch.randn(4, D)
    # Argument checks run while Dynamo traces: without fullgraph the original error reaches the caller ...
    with pytest.raises(ValueError, match="reduction must be one of"):
        torch.compile(lambda a: sslkernels.info_nce(a, a, reduction="bogus"), backend="aot_eager")(x)
    # ... and with fullgraph=True Dynamo reports it, quoting the message.
    with pytest.raises(Exception, match="reduction must be one of"):
        torch.compile(lambda a: sslkernels.info_nce(a, a, reduction="bogus"), fullgraph=True, backend="aot_eager")(x)
    # Tensor values cannot be read while tracing; the op checks them when the compiled graph runs.
    step = torch.compile(lambda a, t: sslkernels.info_nce(a, a, t), fullgraph=True, backend="aot_eager")
    assert torch.isfinite(step(x, torch.tensor(0.1)))
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        step(x, torch.tensor(-0.1))
    targets_step = torch.compile(lambda a, t: sslkernels.info_nce(a, a, targets=t), fullgraph=True,
                                 backend="aot_eager")
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        targets_step(x, torch.tensor([0, 1, 2, 4]))


def test_eager_calls_do_not_go_through_the_custom_ops(monkeypatch):
    import sslkernels.library as library

    def fail(*args, **kwargs):
        raise AssertionError("eager call routed through the custom ops")

    monkeypatch.setattr(library, "loss", fail)
    monkeypatch.setattr(library, "ema_update_", fail)
    x = torch.randn(4, D, requires_grad=True)
    sslkernels.info_nce(x, x.detach(), 0.1).backward()
    sslkernels.ema_update_([torch.randn(3)], [torch.randn(3)], 0.9)


# ------------------------------------------------------------------------------------------- opcheck


def _leaf(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape) * scale).requires_grad_(grad)


def opcheck_cases():
    import sslkernels.library  # noqa: F401  (registers the ops)

    q, k = _leaf(5, D), _leaf(5, D)
    tau = torch.tensor(0.3, requires_grad=True)
    per_anchor = (torch.rand(5) * 0.3 + 0.1).requires_grad_()
    targets = torch.tensor([1, 0, 4, 4, 2])
    student, teacher, center = _leaf(8, D), torch.randn(4, D), torch.randn(1, D)
    q16, k16 = _leaf(5, D).to(torch.bfloat16), _leaf(5, D).to(torch.bfloat16)
    return {
        "info_nce": ("info_nce", (q, k, tau, 0.0, None, True, False, "mean", None)),
        "info_nce per-anchor targets none": ("info_nce", (q, k, per_anchor, 0.0, targets, False, True, "none", None)),
        "nt_xent float": ("nt_xent", (q, k, None, 0.5, False, "sum", None)),
        "clip_loss": ("clip_loss", (q, k, tau, 0.0, "none", None)),
        "siglip_loss": ("siglip_loss", (q, k, tau, 0.0, None, -1.0, "mean", None)),
        "moco_loss": ("moco_loss", (q, k, torch.randn(7, D), None, 0.2, "mean", None)),
        "supcon_loss": ("supcon_loss", (q, torch.tensor([0, 1, 0, 1, 2]), tau, 0.0, "mean", None)),
        "dino_loss": ("dino_loss", (student, teacher, center, 0.1, None, 0.04, 2, "none", None)),
        "dino_loss bf16 student": ("dino_loss", (student.to(torch.bfloat16), teacher, center, 0.1, torch.tensor(0.05),
                                                 0.0, 2, "mean", None)),
        "info_nce bf16": ("info_nce", (q16, k16, None, 0.1, None, False, False, "mean", None)),
        "barlow_twins_loss": ("barlow_twins_loss", (q, k, 5e-3, None)),
        "vicreg_loss bf16": ("vicreg_loss", (q16, k16, 25.0, 25.0, 1.0, None)),
    }


OPCHECK_CASES = ["info_nce", "info_nce per-anchor targets none", "nt_xent float", "clip_loss", "siglip_loss",
                 "moco_loss", "supcon_loss", "dino_loss", "dino_loss bf16 student", "info_nce bf16",
                 "barlow_twins_loss", "vicreg_loss bf16"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_loss_ops(case):
    from sslkernels.library import LOSSES

    name, args = opcheck_cases()[case]
    spec = LOSSES[name]
    torch.library.opcheck(spec.op, args)
    a = spec.named(args)
    needs = [isinstance(a[g], torch.Tensor) and a[g].requires_grad for g in spec.grads]
    grad = torch.rand(spec.op(*args).shape)
    # The backward op is not differentiable again (no double backward): checked on detached inputs.
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
    torch.library.opcheck(spec.op_backward, (grad, *detached, needs))
    if a.get("reduction") != "none":
        torch.library.opcheck(spec.op_with_grads, (*args, needs))


def test_opcheck_ema_update():
    import sslkernels.library  # noqa: F401

    targets, sources = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.sslkernels.ema_update_.default, (targets, sources, None, 0.9, None))
    torch.library.opcheck(torch.ops.sslkernels.ema_update_.default, (targets, sources, torch.tensor(0.5), 0.0, None))


def test_with_grads_refuses_an_unflagged_input_that_requires_grad():
    from sslkernels.library import LOSSES

    spec = LOSSES["info_nce"]
    q, k = _leaf(4, D), _leaf(4, D)
    with pytest.raises(RuntimeError, match="needs_grad does not flag it"):
        spec.op_with_grads(q, k, None, 0.1, None, False, False, "mean", None, [True, False, False])


@pytest.mark.parametrize("momentum", ["float", "tensor"])
def test_dino_step_with_update_center_compiles(momentum):
    # A whole DINO loss step: the loss and the centre's EMA in one graph (fullgraph: no break at update_center_).
    g = torch.Generator().manual_seed(5)
    student = torch.randn(4 * 3, 19, generator=g, requires_grad=True)
    teacher = torch.randn(2 * 3, 19, generator=g)
    m = 0.9 if momentum == "float" else torch.tensor(0.9)
    center = torch.randn(1, 19, generator=g)
    expected_center = center.clone()
    expected_loss = sslkernels.dino_loss(student, teacher, expected_center, n_global_crops=2)
    sslkernels.update_center_(expected_center, teacher, m)

    rec = Recorder()

    @torch.compile(backend=rec, fullgraph=True)
    def step(s, t, c):
        loss = sslkernels.dino_loss(s, t, c, n_global_crops=2)
        sslkernels.update_center_(c, t, m)
        return loss

    loss = step(student, teacher, center)
    rec.expect("dino_loss_with_grads", "update_center_")
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(center, expected_center, rtol=1e-6, atol=1e-7)


def test_opcheck_update_center():
    import sslkernels.library  # noqa: F401

    center, teacher = torch.randn(1, 9), torch.randn(6, 9)
    torch.library.opcheck(torch.ops.sslkernels.update_center_.default, (center, teacher, None, 0.9, None))
    torch.library.opcheck(torch.ops.sslkernels.update_center_.default, (center, teacher, torch.tensor(0.5), 0.0, None))
