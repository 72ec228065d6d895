"""torch.library custom ops (namespace ``sslkernels``) over the losses, ema_update_ and update_center_, for
torch.compile.

Dynamo cannot trace the implementations (autograd.Functions with Python loops over chunks, Triton
launches, host-side caches), so under torch.compile the public functions call these ops instead: each is
one opaque node with a fake implementation (shapes and dtypes while tracing) and an autograd formula, and
``torch.compile(..., fullgraph=True)`` takes a training step whole. Outside torch.compile the public
functions call the implementations directly, as before: no dispatcher overhead, identical numerics.

Every op runs the implementation that ``backend`` picks (backends.dispatch, when the op runs), so the
compiled graph gets the fused kernels on CUDA tensors and the memory-efficient path on CPU.

For each loss X (info_nce, nt_xent, clip_loss, siglip_loss, moco_loss, supcon_loss, dino_loss,
barlow_twins_loss, vicreg_loss):

  sslkernels::X(args...) -> Tensor
      the loss. Its backward is X_backward.
  sslkernels::X_with_grads(args..., bool[] needs_grad) -> Tensor[]
      [loss, d loss / d input for each differentiable input flagged in needs_grad], for "mean" / "sum".
  sslkernels::X_backward(Tensor grad, args..., bool[] needs_grad) -> Tensor[]
      the flagged gradients for an upstream ``grad``, by recomputation.

What the backward costs. A scalar loss's upstream gradient is one number, so for "mean" and "sum" (what
training uses) the public functions call X_with_grads: the implementation runs forward and backward inside
the forward op with an upstream 1, and the backward only scales the saved gradients. That is eager's work
(the CPU path computes its gradients in the forward anyway), moved into the forward; the price is holding
one gradient per differentiable input until the backward, and doing that work even if no backward follows
(a loss evaluated with grad enabled but never differentiated). For reduction="none" the upstream gradient
is a vector known only in the backward: X's backward recomputes the forward with autograd on and
differentiates it (as activation checkpointing does), one extra forward.

A float-or-tensor argument (temperature, logit_scale, ...) travels as two, ``Tensor? name`` and
``float name_value``: a tensor gets its gradient, a Python float is a constant of the graph (a float that
changes every step recompiles; pass a 0-d tensor for scheduled values).

Tensor values the public functions check on the host (temperature > 0, targets in range) cannot be read
while Dynamo traces; the ops check them when they run, with the same messages.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import _checks as check
from .backends import dispatch
from .reference import compute_dtype

NAMESPACE = "sslkernels"


class _autograd_back_on:
    """Autograd inside an op's implementation, which the custom-op runtime calls below autograd.

    The runtime runs implementations with the autograd dispatch keys excluded and grad mode off, so a
    recomputed forward would record nothing. Re-enabling both for this block (restored on exit) lets the
    implementation build its graph and be differentiated with torch.autograd.grad.
    """

    _KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
             torch._C.DispatchKey.AutogradNestedTensor)

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for key in self._KEYS:
            exclude = exclude.remove(key)
        self._keys = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._grad = torch.enable_grad()
        self._keys.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._keys.__exit__(*exc)


def _owned(outputs: Sequence[torch.Tensor], inputs: Sequence) -> List[torch.Tensor]:
    """``outputs`` as a custom op must return them: contiguous (the fakes promise it, and the traced graph
    trusts the fakes' strides) and sharing memory with no input and no other output (the gradients of
    z1 and z2 in nt_xent, for instance, are two halves of the gradient of their concatenation)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    owned = []
    for t in outputs:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in taken:
            t = t.clone(memory_format=torch.contiguous_format)
        taken.add(t.untyped_storage().data_ptr())
        owned.append(t)
    return owned


def _positive(args: dict, *names: str) -> None:
    for name in names:
        if isinstance(args[name], torch.Tensor):
            check.positive_values(args[name], name)


def _siglip_values(args: dict) -> None:
    _positive(args, "logit_scale")
    if isinstance(args["logit_bias"], torch.Tensor):
        check.finite_values(args["logit_bias"], "logit_bias")


class _Loss:
    """One loss: its op schema, which arguments get gradients, and the shape of its result.

    ``args`` lists the op's arguments in the implementation's order (a float-or-tensor pair in place of
    the implementation's one argument); ``str? backend`` is appended. ``rows(a)`` is the length of the
    reduction="none" result, ``a`` the arguments by name (None for losses without a ``reduction``
    argument: always a scalar); ``values(a)`` checks tensor values on the host.
    """

    def __init__(self, name: str, args: str, grads: Sequence[str], rows: Optional[Callable[[dict], int]] = None,
                 values: Callable[[dict], None] = lambda a: None,
                 dtype: Optional[Callable[[dict], torch.dtype]] = None):
        self.name, self.schema = name, f"{args}, str? backend"
        self.names = [a.split()[-1] for a in self.schema.split(",")]
        self.grads = tuple(grads)
        self.grad_index = [self.names.index(g) for g in self.grads]
        self.rows, self.values = rows, values
        self.dtype = dtype or (lambda a: compute_dtype(a[self.names[0]].dtype))
        self.op = self.op_with_grads = self.op_backward = None  # OpOverloads, set by _register

    # Argument plumbing --------------------------------------------------------------------------------

    def _paired(self, name: str) -> bool:
        return name.endswith("_value") and name[:-len("_value")] in self.names

    def op_args(self, impl_args: Sequence, backend: Optional[str]) -> list:
        """The op's arguments from the implementation's (floats and tensors split into pairs)."""
        impl = iter(impl_args)
        out = []
        for name in self.names[:-1]:
            if self._paired(name):
                continue
            value = next(impl)
            if f"{name}_value" in self.names:
                is_tensor = isinstance(value, torch.Tensor)
                out += [value if is_tensor else None, 0.0 if is_tensor else float(value)]
            else:
                out.append(value)
        return out + [backend]

    def named(self, op_args: Sequence) -> Dict[str, object]:
        """The op's arguments by name, each pair joined back into its one float-or-tensor value."""
        a = dict(zip(self.names, op_args))
        for name in self.names:
            if self._paired(name):
                base = name[:-len("_value")]
                if a[base] is None:
                    a[base] = a[name]
                del a[name]
        return a

    def run(self, a: dict):
        first = a[self.names[0]]
        impl = dispatch(self.name, a["backend"], first.device)
        return impl(*[v for k, v in a.items() if k != "backend"])

    def fake_loss(self, a: dict) -> torch.Tensor:
        first = a[self.names[0]]
        shape = (self.rows(a),) if a.get("reduction") == "none" else ()
        return first.new_empty(shape, dtype=self.dtype(a))

    def flagged(self, a: dict, needs: Sequence[bool]) -> List[str]:
        if len(needs) != len(self.grads):
            raise ValueError(f"{self.name}: needs_grad has {len(needs)} flags, one per {self.grads} expected")
        return [g for g, n in zip(self.grads, needs) if n]

    # Kernels --------------------------------------------------------------------------------------------

    def value_and_grads(self, a: dict, needs: Sequence[bool], grad: Optional[torch.Tensor]):
        """(loss, [d(loss·grad)/d input for each flagged input]); ``grad`` None means an upstream 1."""
        wrt = self.flagged(a, needs)
        leaves = dict(a)
        for g in wrt:
            leaves[g] = a[g].detach().requires_grad_(True)
        with _autograd_back_on():
            out = self.run(leaves)
            grads = torch.autograd.grad(out, [leaves[g] for g in wrt], grad, materialize_grads=True) if wrt else ()
        inputs = list(a.values()) + [grad]
        return _owned([out.detach()], inputs)[0], _owned(grads, inputs + [out])

    def forward_kernel(self, *args):
        a = self.named(args)
        self.values(a)
        with torch.no_grad():
            return _owned([self.run(a)], args)[0]

    def with_grads_kernel(self, *args):
        *args, needs = args
        a = self.named(args)
        self._scalar_only(a)
        self.values(a)
        loss, grads = self.value_and_grads(a, needs, None)
        return [loss] + grads

    def backward_kernel(self, grad, *args):
        *args, needs = args
        return self.value_and_grads(self.named(args), needs, grad)[1]

    def _scalar_only(self, a: dict) -> None:
        if a.get("reduction") == "none":
            raise ValueError(f"{self.name}_with_grads needs a scalar reduction ('mean' or 'sum'): with 'none' the "
                             "upstream gradient is a vector; call the loss op, whose backward recomputes")

    # Fakes ----------------------------------------------------------------------------------------------

    def fake_grads(self, a: dict, needs: Sequence[bool]) -> List[torch.Tensor]:
        return [a[g].new_empty(a[g].shape) for g in self.flagged(a, needs)]

    def forward_fake(self, *args):
        return self.fake_loss(self.named(args))

    def with_grads_fake(self, *args):
        *args, needs = args
        a = self.named(args)
        self._scalar_only(a)
        return [self.fake_loss(a)] + self.fake_grads(a, needs)

    def backward_fake(self, grad, *args):
        *args, needs = args
        return self.fake_grads(self.named(args), needs)

    # Autograd -------------------------------------------------------------------------------------------

    def _gradient_slots(self, n_inputs: int, needs: Sequence[bool], grads: Sequence[torch.Tensor]) -> tuple:
        out: List[Optional[torch.Tensor]] = [None] * n_inputs
        it = iter(grads)
        for index, need in zip(self.grad_index, needs):
            if need:
                out[index] = next(it)
        return tuple(out)

    def forward_setup(self, ctx, inputs, output):
        ctx.tensor_at = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        ctx.others = [None if isinstance(v, torch.Tensor) else v for v in inputs]
        ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_at])

    def forward_backward(self, ctx, grad):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            args[i] = t
        needs = [bool(ctx.needs_input_grad[i]) for i in self.grad_index]
        if not any(needs):
            return (None,) * len(args)
        return self._gradient_slots(len(args), needs, self.op_backward(grad, *args, needs))

    def with_grads_setup(self, ctx, inputs, output):
        ctx.needs = list(inputs[-1])
        ctx.n_inputs = len(inputs)
        for index, need in zip(self.grad_index, ctx.needs):
            if ctx.needs_input_grad[index] and not need:
                raise RuntimeError(f"{self.name}_with_grads: input {self.names[index]!r} requires grad but "
                                   "needs_grad does not flag it; its gradient would be lost")
        # The gradients are results, not functions of the inputs to differentiate again.
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])

    def with_grads_backward(self, ctx, grads):
        g = grads[0]  # the loss's upstream gradient; the returned gradients are not differentiable
        scaled = [(s * g).to(s.dtype) for s in ctx.saved_tensors]
        return self._gradient_slots(ctx.n_inputs, ctx.needs, scaled)


def _register(loss: _Loss) -> None:
    qual = f"{NAMESPACE}::{loss.name}"
    op = torch.library.custom_op(qual, loss.forward_kernel, mutates_args=(),
                                 schema=f"({loss.schema}) -> Tensor")
    op.register_fake(loss.forward_fake)
    with_grads = torch.library.custom_op(f"{qual}_with_grads", loss.with_grads_kernel, mutates_args=(),
                                         schema=f"({loss.schema}, bool[] needs_grad) -> Tensor[]")
    with_grads.register_fake(loss.with_grads_fake)
    backward = torch.library.custom_op(f"{qual}_backward", loss.backward_kernel, mutates_args=(),
                                       schema=f"(Tensor grad, {loss.schema}, bool[] needs_grad) -> Tensor[]")
    backward.register_fake(loss.backward_fake)
    op.register_autograd(loss.forward_backward, setup_context=loss.forward_setup)
    with_grads.register_autograd(loss.with_grads_backward, setup_context=loss.with_grads_setup)
    ops = getattr(torch.ops, NAMESPACE)
    loss.op = getattr(ops, loss.name).default
    loss.op_with_grads = getattr(ops, f"{loss.name}_with_grads").default
    loss.op_backward = getattr(ops, f"{loss.name}_backward").default


def _info_nce_values(a: dict) -> None:
    _positive(a, "temperature")
    if a["targets"] is not None:
        check.index_range(a["targets"], "targets", a["key"].shape[0])


LOSSES: Dict[str, _Loss] = {loss.name: loss for loss in (
    _Loss("info_nce", "Tensor query, Tensor key, Tensor? temperature, float temperature_value, Tensor? targets, "
                      "bool symmetric, bool decoupled, str reduction",
          grads=("query", "key", "temperature"), rows=lambda a: a["query"].shape[0], values=_info_nce_values),
    _Loss("nt_xent", "Tensor z1, Tensor z2, Tensor? temperature, float temperature_value, bool decoupled, "
                     "str reduction",
          grads=("z1", "z2", "temperature"), rows=lambda a: 2 * a["z1"].shape[0],
          values=lambda a: _positive(a, "temperature")),
    _Loss("clip_loss", "Tensor image_features, Tensor text_features, Tensor? logit_scale, float logit_scale_value, "
                       "str reduction",
          grads=("image_features", "text_features", "logit_scale"), rows=lambda a: a["image_features"].shape[0],
          values=lambda a: _positive(a, "logit_scale")),
    _Loss("siglip_loss", "Tensor image_features, Tensor text_features, Tensor? logit_scale, float logit_scale_value, "
                         "Tensor? logit_bias, float logit_bias_value, str reduction",
          grads=("image_features", "text_features", "logit_scale", "logit_bias"),
          rows=lambda a: a["image_features"].shape[0], values=_siglip_values),
    # The queue gets no gradient (shared/API.md).
    _Loss("moco_loss", "Tensor query, Tensor key, Tensor queue, Tensor? temperature, float temperature_value, "
                       "str reduction",
          grads=("query", "key", "temperature"), rows=lambda a: a["query"].shape[0],
          values=lambda a: _positive(a, "temperature")),
    _Loss("supcon_loss", "Tensor features, Tensor labels, Tensor? temperature, float temperature_value, "
                         "str reduction",
          grads=("features", "temperature"), rows=lambda a: a["features"].shape[0],
          values=lambda a: _positive(a, "temperature")),
    # Teacher, centre and teacher temperature get no gradient (shared/API.md); the loss is in the wider of
    # the two outputs' compute dtypes.
    _Loss("dino_loss", "Tensor student_output, Tensor teacher_output, Tensor center, float student_temp, "
                       "Tensor? teacher_temp, float teacher_temp_value, int n_global_crops, str reduction",
          grads=("student_output",), rows=lambda a: a["teacher_output"].shape[0] // a["n_global_crops"],
          values=lambda a: _positive(a, "teacher_temp"),
          dtype=lambda a: torch.promote_types(compute_dtype(a["student_output"].dtype),
                                              compute_dtype(a["teacher_output"].dtype))),
    _Loss("barlow_twins_loss", "Tensor z1, Tensor z2, float lambda_offdiag", grads=("z1", "z2")),
    _Loss("vicreg_loss", "Tensor z1, Tensor z2, float sim_weight, float var_weight, float cov_weight",
          grads=("z1", "z2")),
)}

for _loss in LOSSES.values():
    _register(_loss)


def loss(name: str, backend: Optional[str], *impl_args) -> torch.Tensor:
    """The loss ``name`` through its custom ops; ``impl_args`` as the implementations take them (validated).

    Scalar reductions with an input that needs a gradient go through X_with_grads (no recomputation),
    everything else through X.
    """
    spec = LOSSES[name]
    args = spec.op_args(impl_args, backend)
    a = spec.named(args)
    needs = [torch.is_grad_enabled() and isinstance(a[g], torch.Tensor) and a[g].requires_grad for g in spec.grads]
    if any(needs) and a.get("reduction") != "none":
        return spec.op_with_grads(*args, needs)[0]
    return spec.op(*args)


# ------------------------------------------------------------------------------------------ ema_update_


@torch.library.custom_op(f"{NAMESPACE}::ema_update_", mutates_args=("targets",))
def _ema_update_op(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: Optional[torch.Tensor],
                   momentum_value: float, backend: Optional[str]) -> None:
    """In place t ← m·t + (1 − m)·s for every pair (momentum: the tensor, else momentum_value)."""
    if not targets:
        return
    m = momentum if momentum is not None else momentum_value
    dispatch("ema_update_", backend, targets[0].device)(list(targets), list(sources), m)


@_ema_update_op.register_fake
def _(targets, sources, momentum, momentum_value, backend) -> None:
    return None


def ema_update_(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum, backend: Optional[str]) -> None:
    """ema_update_ on validated tensor lists through the custom op."""
    is_tensor = isinstance(momentum, torch.Tensor)
    torch.ops.sslkernels.ema_update_.default(targets, sources, momentum if is_tensor else None,
                                             0.0 if is_tensor else float(momentum), backend)


# ---------------------------------------------------------------------------------------- update_center_


@torch.library.custom_op(f"{NAMESPACE}::update_center_", mutates_args=("center",))
def _update_center_op(center: torch.Tensor, teacher_output: torch.Tensor, momentum: Optional[torch.Tensor],
                      momentum_value: float, backend: Optional[str]) -> None:
    """In place center ← m·center + (1 − m)·mean_rows(teacher_output), one process, synchronous."""
    m = momentum if momentum is not None else momentum_value
    dispatch("update_center_", backend, center.device)(center, teacher_output, m, False, None)


@_update_center_op.register_fake
def _(center, teacher_output, momentum, momentum_value, backend) -> None:
    return None


def update_center_(center: torch.Tensor, teacher_output: torch.Tensor, momentum, backend: Optional[str]) -> None:
    """update_center_ on validated arguments through the custom op (the synchronous, one-process form)."""
    is_tensor = isinstance(momentum, torch.Tensor)
    torch.ops.sslkernels.update_center_.default(center, teacher_output, momentum if is_tensor else None,
                                                0.0 if is_tensor else float(momentum), backend)
