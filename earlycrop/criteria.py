"""Importance criteria for heads and MLP neurons: one class each, one small interface.

Every criterion returns `Scores` (larger = keep) computed on the same gates, so selection and
surgery never know which criterion ran. A criterion is a `Criterion` subclass with a `name`, a
`score(ctx: ScoringContext) -> Scores` method and its constructor's keyword arguments as
options, registered with `@register_criterion`; the built-ins below register themselves so.

Data-parallel exactness is the caller's business but is made possible here: each criterion
sums over its batches and calls `reduce` (an all-reduce sum, identity by default) on the
signed sums BEFORE any absolute value or square of a sum, so N ranks over N shards give the
scores of one process over all batches (docs/DESIGN.md §4).
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .families import FamilyAdapter, get_adapter
from .gates import Gates, gated
from .scores import Scores

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own training loss (causal LM or classification heads compute it from `labels`)."""
    return model(**batch).loss


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class ScoringContext:
    """What a criterion may use: the model with gates attached, its adapter, and the data.

    `gates.parameters()` are the per-unit gates c (all ones) to differentiate; `iter_batches` yields
    the calibration batches on the model's device; `reduce_all` sums over data-parallel ranks (call
    it on signed sums, before any abs / square); `as_scores` turns flat per-gate tensors into Scores.
    """

    model: nn.Module
    adapter: FamilyAdapter
    gates: Gates
    batches: list[Batch]
    loss_fn: LossFn
    reduce: Reduce
    progress: bool

    def iter_batches(self, desc: str) -> Iterable[Batch]:
        device = next(self.model.parameters()).device
        for batch in tqdm(self.batches, desc=desc, disable=not self.progress, leave=False):
            yield {k: v.to(device) for k, v in batch.items()}

    def reduce_all(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """All-reduce a list of tensors as one flat buffer (one collective, not one per tensor)."""
        if not tensors:
            return []
        flat = self.reduce(torch.cat([t.reshape(-1) for t in tensors]))
        return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def as_scores(self, flat: list[torch.Tensor]) -> Scores:
        heads, neurons = self.gates.split([t.detach() for t in flat])
        return Scores(heads=heads, neurons=neurons)


class Criterion(ABC):
    """Scores every head and MLP neuron of a gated model; larger = more important.

    `name` is what configs and `make_criterion` call it; `uses_data = False` for criteria that need
    no calibration batches; the constructor's keyword arguments are its options."""

    name: ClassVar[str]
    uses_data: ClassVar[bool] = True

    @abstractmethod
    def score(self, ctx: ScoringContext) -> Scores: ...


_REGISTRY: dict[str, type[Criterion]] = {}
# name → Criterion class, every registered criterion (read-only: register with `register_criterion`)
CRITERIA: Mapping[str, type[Criterion]] = MappingProxyType(_REGISTRY)

C = TypeVar("C", bound=type[Criterion])


def register_criterion(cls: C) -> C:
    """Class decorator: make a `Criterion` subclass available under its `name` (configs, `make_criterion`,
    `score_units`); registering a name again replaces that criterion."""
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register_criterion takes a Criterion subclass, not {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty criterion name")
    _REGISTRY[name] = cls
    return cls


def unregister_criterion(name: str) -> type[Criterion]:
    """Remove a criterion from the registry (e.g. one a test registered) and return its class."""
    _criterion_class(name)  # an unknown name raises, listing the registered ones
    return _REGISTRY.pop(name)


def _gate_grads(ctx: ScoringContext, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, ctx.gates.parameters()))


def _weight_gradient(ctx: ScoringContext, weights: list[nn.Parameter]) -> list[torch.Tensor]:
    """g = ∇θ L summed over all calibration batches of all ranks (detached), as views of one flat buffer
    of at least float32. Each weight's gradient is added as backward produces it and then dropped, so
    besides g at most one layer's gradient is alive, and the all-reduce needs no concatenated copy."""
    dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights), torch.float32)
    flat = torch.zeros(sum(w.numel() for w in weights), dtype=dtype, device=weights[0].device)
    g = [chunk.view_as(w) for chunk, w in zip(flat.split([w.numel() for w in weights]), weights)]
    stashed = [w.grad for w in weights]  # a training step's gradients, put back untouched

    def add_to(acc: torch.Tensor):
        def hook(w: torch.Tensor) -> None:
            acc.add_(w.grad)
            w.grad = None

        return hook

    handles = [w.register_post_accumulate_grad_hook(add_to(acc)) for w, acc in zip(weights, g)]
    try:
        for w in weights:
            w.grad = None
        for batch in ctx.iter_batches("gradient"):
            ctx.loss_fn(ctx.model, batch).backward(inputs=weights)
    finally:
        for h in handles:
            h.remove()
        for w, grad in zip(weights, stashed):
            w.grad = grad
    flat = ctx.reduce(flat)
    return [chunk.view_as(w) for chunk, w in zip(flat.split([w.numel() for w in weights]), weights)]


# bf16 / fp16 weights round a perturbation much below their resolution away: their finite-difference
# step is at least LOW_PRECISION_STEP · eps(dtype) · ‖θ‖ (rank agreement with float32: tests/test_criteria.py)
LOW_PRECISION_STEP = 2.0


def finite_difference_step(weights: list[torch.Tensor], fd_step: float, theta_sq: float | None = None) -> float:
    """‖ε·g‖, the length of the finite-difference perturbation: `fd_step`, or for bf16/fp16 weights at least
    LOW_PRECISION_STEP · eps · ‖θ‖. `theta_sq` is ‖θ‖² when the caller holds only part of θ (a shard)."""
    low = [torch.finfo(w.dtype).eps for w in weights if w.dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return fd_step
    if theta_sq is None:
        theta_sq = sum(float(w.detach().double().square().sum()) for w in weights)
    return max(fd_step, LOW_PRECISION_STEP * max(low) * math.sqrt(theta_sq))


@contextmanager
def perturbed(weights: list[torch.Tensor], directions: list[torch.Tensor], step: float):
    """θ += step · g in place for the duration, then θ restored bit-exactly without a copy of θ.

    Each tensor is shifted in g's precision (float32 for bf16/fp16 weights, one tensor at a time, in two
    scratch buffers the size of the largest) and rounded to its own dtype. Subtracting the same shift undoes
    it except where rounding differs (a binade crossed, a tie): those few entries are found while shifting,
    kept, and written back."""
    kept: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []
    scratch = torch.empty(2, max(gi.numel() for gi in directions), dtype=directions[0].dtype, device=directions[0].device)

    def buffers(gi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scratch[0, : gi.numel()].view_as(gi), scratch[1, : gi.numel()].view_as(gi)

    try:
        with torch.no_grad():
            for w, gi in zip(weights, directions):
                shift, moved = buffers(gi)
                moved = torch.add(w, torch.mul(gi, step, out=shift), out=moved).to(w.dtype)
                where = (torch.sub(moved, shift, out=shift).to(w.dtype) != w).nonzero(as_tuple=True)
                kept.append((where, w[where]))
                w.copy_(moved)
        yield
    finally:
        with torch.no_grad():
            for w, gi, (where, values) in zip(weights, directions, kept):
                shift, moved = buffers(gi)
                w.copy_(torch.sub(w, torch.mul(gi, step, out=shift), out=moved))
                w[where] = values


def finite_difference_product(ctx: ScoringContext, weights: list[torch.Tensor], g: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """Σ_b [∇_c L_b(θ + εg) − ∇_c L_b(θ − εg)] / 2ε over this rank's batches, before the reduce: H_cθ·g in
    gate space. θ is perturbed in place (`perturbed`); `weights` are the tensors the forward reads θ from
    (a ZeRO-3 rank's own partitions, for instance) and `g` the matching pieces of the gradient."""
    acc = ctx.gates.zeros_like()
    for batch in ctx.iter_batches("H·g (finite difference)"):
        sides = []
        for sign in (1.0, -1.0):
            with perturbed(weights, g, sign * eps):
                sides.append(_gate_grads(ctx, ctx.loss_fn(ctx.model, batch)))
        for a, plus, minus in zip(acc, *sides):
            a.add_((plus.to(a.dtype) - minus.to(a.dtype)) / (2 * eps))
    return acc


def _finite_difference(ctx: ScoringContext, weights: list[nn.Parameter], g: list[torch.Tensor], fd_step: float) -> list[torch.Tensor]:
    """`finite_difference_product` with ε = step / ‖g‖ (the step raised for low-precision weights)."""
    g_norm = math.sqrt(sum(float((gi.double() ** 2).sum()) for gi in g))
    if g_norm == 0.0:
        raise FloatingPointError("the weight gradient is zero on the calibration batches: nothing to score")
    return finite_difference_product(ctx, weights, g, finite_difference_step(weights, fd_step) / g_norm)


def hessian_gradient_product(ctx: ScoringContext, hvp: Literal["exact", "finite_difference"], fd_step: float) -> list[torch.Tensor]:
    """Σ_batches H_cθ · g, the mixed (gates × weights) Hessian times the global weight gradient."""
    if hvp not in ("exact", "finite_difference"):
        raise ValueError(f"hvp must be 'exact' or 'finite_difference', got {hvp!r}")
    weights = ctx.adapter.prunable_weights(ctx.model)
    g = _weight_gradient(ctx, weights)
    if hvp == "finite_difference":
        return ctx.reduce_all(_finite_difference(ctx, weights, g, fd_step))
    acc = ctx.gates.zeros_like()
    # fused SDPA kernels (flash / memory-efficient) have no double backward; the math path has
    with sdpa_kernel(SDPBackend.MATH):
        for batch in ctx.iter_batches("H·g (exact)"):
            grads = torch.autograd.grad(ctx.loss_fn(ctx.model, batch), weights, create_graph=True)
            z = sum((gi * dw).sum() for gi, dw in zip(g, grads))
            for a, d in zip(acc, torch.autograd.grad(z, ctx.gates.parameters())):
                a.add_(d)
    return ctx.reduce_all(acc)


@register_criterion
class EarlyCroP(Criterion):
    """|H_cθ · g|: how much removing a unit would change gradient flow (Rachwan et al., 2022)."""

    name = "earlycrop"

    def __init__(self, hvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-4):
        self.hvp, self.fd_step = hvp, fd_step

    def score(self, ctx):
        return ctx.as_scores([t.abs() for t in hessian_gradient_product(ctx, self.hvp, self.fd_step)])


@register_criterion
class GraSP(Criterion):
    """GraSP keeps the units whose removal would reduce gradient flow most: signed H_cθ · g."""

    name = "grasp"

    def __init__(self, hvp: Literal["exact", "finite_difference"] = "exact", fd_step: float = 1e-4):
        self.hvp, self.fd_step = hvp, fd_step

    def score(self, ctx):
        return ctx.as_scores(hessian_gradient_product(ctx, self.hvp, self.fd_step))


@register_criterion
class SNIP(Criterion):
    """First-order Taylor / SNIP: |Σ_b ∂L_b/∂c|."""

    name = "snip"

    def score(self, ctx):
        acc = ctx.gates.zeros_like()
        for batch in ctx.iter_batches("snip"):
            for a, d in zip(acc, _gate_grads(ctx, ctx.loss_fn(ctx.model, batch))):
                a.add_(d)
        return ctx.as_scores([t.abs() for t in ctx.reduce_all(acc)])


@register_criterion
class Fisher(Criterion):
    """Σ_b (∂L_b/∂c)²: the head importance of Michel et al. (2019), per batch then summed."""

    name = "fisher"

    def score(self, ctx):
        acc = ctx.gates.zeros_like()
        for batch in ctx.iter_batches("fisher"):
            for a, d in zip(acc, _gate_grads(ctx, ctx.loss_fn(ctx.model, batch))):
                a.add_(d.square())
        return ctx.as_scores(ctx.reduce_all(acc))


@register_criterion
class Activation(Criterion):
    """Mean output norm of each unit over all calibration tokens (the Minitron importance).
    Padding (`attention_mask == 0`) is neither summed nor counted."""

    name = "activation"

    def score(self, ctx):
        sums = ctx.gates.zeros_like()
        tokens = torch.zeros(1, dtype=sums[0].dtype, device=sums[0].device)
        head_sums, neuron_sums = ctx.gates.split(sums)
        handles = []
        token_weight: list[torch.Tensor] = []  # the current batch's flattened attention mask

        def add(acc: torch.Tensor, per_token: torch.Tensor) -> None:
            per_token = per_token.reshape(-1, acc.numel()).to(acc.dtype)
            acc.add_((per_token * token_weight[0][:, None]).sum(0))

        def head_hook(acc: torch.Tensor, head_dim: int):
            def hook(module, args):
                add(acc, args[0].detach().unflatten(-1, (-1, head_dim)).norm(dim=-1))

            return hook

        def neuron_hook(acc: torch.Tensor):
            def hook(module, args):
                add(acc, args[0].detach().abs())

            return hook

        for layer, hs, ns in zip(ctx.gates.layers, head_sums, neuron_sums):
            handles.append(layer.head_out.register_forward_pre_hook(head_hook(hs, layer.head_dim)))
            handles.append(layer.mlp_out.register_forward_pre_hook(neuron_hook(ns)))
        try:
            with torch.no_grad():
                for batch in ctx.iter_batches("activation"):
                    mask = batch.get("attention_mask")
                    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
                    token_weight[:] = [mask.reshape(-1).to(tokens.dtype)]
                    tokens += token_weight[0].sum()
                    ctx.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for h in handles:
                h.remove()
        *sums, tokens = ctx.reduce_all([*sums, tokens])
        return ctx.as_scores([s / tokens.clamp_min(1) for s in sums])


@register_criterion
class Magnitude(Criterion):
    """L2 norm of all weights that belong to the unit (no data needed)."""

    name = "magnitude"
    uses_data = False

    def score(self, ctx):
        heads, neurons = [], []
        with torch.no_grad():
            for layer in ctx.gates.layers:
                heads.append(self._unit_norms(ctx.adapter.attention_slices(
                    layer, list(range(layer.num_heads)), list(range(layer.num_kv_heads))), layer, "q"))
                neurons.append(self._unit_norms(ctx.adapter.mlp_slices(layer, list(range(layer.intermediate_size))), layer, "n"))
        return Scores(heads=heads, neurons=neurons)

    @staticmethod
    def _unit_norms(slices, layer, kind: str) -> torch.Tensor:
        """Sum of squares per unit over every slice indexed by that unit's own rows/columns;
        key/value heads shared by a GQA group belong to no single query head and are left out."""
        units = layer.num_heads if kind == "q" else layer.intermediate_size
        width = layer.head_dim if kind == "q" else 1
        total = torch.zeros(units, dtype=torch.float64)
        for s in slices:
            p = s.parameter.detach().double()
            blocks, rest = divmod(p.shape[s.dim], units * width)
            if blocks and not rest:  # q/o (and k/v without GQA, or fused q|k|v): one slab per unit
                moved = p.movedim(s.dim, 0).reshape(blocks, units, -1)
                total += moved.square().sum((0, 2)).cpu()
        return total.sqrt()


@register_criterion
class Random(Criterion):
    """Seeded uniform noise: the baseline every criterion must beat. Same on every rank."""

    name = "random"
    uses_data = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, ctx):
        gen = torch.Generator().manual_seed(self.seed)
        flat = [torch.rand(g.shape, generator=gen, dtype=torch.float64) for g in ctx.gates.parameters()]
        return ctx.as_scores(flat)


def _criterion_class(name: str) -> type[Criterion]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown criterion {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _accepted_options(cls: type[Criterion]) -> list[str] | None:
    """The constructor's keyword options, sorted; None when it takes **kwargs (anything goes)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(p.name for p in params if p.kind in kinds)


def criterion_options(name: str, **candidates: Any) -> dict[str, Any]:
    """The subset of `candidates` that criterion `name` accepts, for callers holding every criterion's
    settings (a run config's hvp / fd_step / seed): `make_criterion(name, **criterion_options(name, ...))`."""
    accepted = _accepted_options(_criterion_class(name))
    return dict(candidates) if accepted is None else {k: v for k, v in candidates.items() if k in accepted}


def make_criterion(name: str, **options: Any) -> Criterion:
    """Build a criterion by name with its constructor options (e.g. `hvp`, `fd_step`, `seed`); an option the
    criterion does not take is an error, so a typo never silently falls back to a default."""
    cls = _criterion_class(name)
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"criterion {name!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**options)


def score_units(
    model: nn.Module,
    criterion: Criterion | str,
    batches: Iterable[Batch] = (),
    *,
    loss_fn: LossFn = default_loss,
    reduce: Reduce | None = None,
    progress: bool = False,
) -> Scores:
    """Score every head and MLP neuron of `model` with `criterion` on `batches`.

    The model is scored in eval mode (no dropout, as the paper's authors did) and restored after.
    `reduce` sums a tensor over data-parallel ranks; pass it when each rank holds a shard.
    """
    criterion = make_criterion(criterion) if isinstance(criterion, str) else criterion
    batches = list(batches)
    if criterion.uses_data and reduce is None and not batches:
        raise ValueError(f"criterion {criterion.name!r} needs calibration batches; none were given")
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()

    def finite_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"scoring with {criterion.name!r}: the loss on a calibration batch is {loss.detach().sum().item()}; "
                "the model's weights or the calibration data hold NaN/Inf (check the model folder, or train.lr before prune_at)"
            )
        return loss

    try:
        with gated(model, adapter) as gates:
            ctx = ScoringContext(model, adapter, gates, batches, finite_loss, reduce or _identity, progress)
            scores = criterion.score(ctx)
    finally:
        model.train(was_training)
    scores.check_finite(criterion.name)
    return scores
