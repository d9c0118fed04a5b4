"""Scoring a model that DeepSpeed ZeRO-3 keeps partitioned: no rank ever holds it whole (docs/DESIGN.md §8).

The model is created partitioned (built under `deepspeed.zero.Init`, each rank reading only its partitions from the
safetensors files) inside a DeepSpeed engine with no optimizer, which only gathers and releases the parameters
around each module's forward and backward (no fp32 master copy, no gradient buffers). First-order criteria then
score it with the parameters partitioned, exactly as one process scores the whole model over all the batches
(docs/DESIGN.md §4):

- gate criteria (`snip`, `fisher`, `activation`, and `random`): the gates are small replicated tensors outside
  the engine; forward/backward through the partitioned model gives this rank's gate gradients, all-reduced;
- `earlycrop` / `grasp` with `hvp: finite_difference`: g from a plain backward whose per-weight hooks sum each
  whole weight gradient over the ranks and keep this rank's partition of it (`_local_gradient`), ‖g‖² and ‖θ‖² from an all-reduce of partial sums, then each rank perturbs its own
  partition `param.ds_tensor` by ±ε·g_local in place (`earlycrop.criteria.perturbed`, restored bit-exactly)
  between first-order passes. `hvp: exact` (double backward) is refused: it does not compose with ZeRO-3's
  gather/release hooks;
- `magnitude`: per-unit sums of squares over each rank's partition, all-reduced, square-rooted.

Every rank must run the same number of forward/backward passes (each one gathers parameters collectively), so
the calibration batches must divide evenly over the ranks.

Surgery: rank 0 builds the pruned model on the meta device (`earlycrop.prune` sets its shapes and config) and
gives it storage; `consolidate_pruned` then gathers the dense model one block at a time, cuts the block's kept
slices as `earlycrop.prune` would, copies them in and releases the block. No rank ever holds the dense model:
rank 0 peaks at the pruned model plus one dense block.

Training under ZeRO-3 also uses this module: `PartitionedTeacher` (a distillation teacher partitioned like the
student) and `PartitionedRule` (the `auto` rule on each rank's partitions).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import earlycrop
from earlycrop.criteria import (
    Batch,
    Criterion,
    EarlyCroP,
    GraSP,
    Scores,
    ScoringContext,
    default_loss,
    finite_difference_product,
    finite_difference_step,
)
from earlycrop.distill import Teacher
from earlycrop.families import architecture_class
from earlycrop.schedule import WeightDistanceRule
from earlycrop.serialization import safetensors_files

from .data import shard_batches
from .distributed import all_reduce_sum, empty_copy, partition_of, valid_numel, world

GATE_CRITERIA = ("snip", "fisher", "activation", "random")


def zero3_config(micro_batch_size: int = 1, **zero_optimization) -> dict:
    """A DeepSpeed config for scoring under ZeRO-3. No parameter stays whole (persistence threshold 0) and none
    is kept gathered between passes (reuse distance 0, no prefetch): a finite-difference pass must gather the
    partitions just perturbed, never a cached copy."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0, **zero_optimization}
    return {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "steps_per_print": 2**31}


def load_partitioned(folder: str | Path, config: dict | None = None, *, dtype: torch.dtype | None = None,
                     model_class=None, attn_implementation: str = "eager"):
    """The DeepSpeed engine holding the model saved in `folder`, partitioned while it is built and loaded (call
    under a launcher, after `deepspeed.init_distributed`): each rank reads only its own partitions from the files."""
    import deepspeed
    from transformers import AutoConfig

    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"DeepSpeed ZeRO-3 partitions only float32, bfloat16 and float16 parameters (zero.Init asserts "
                         f"it), not {dtype}: compare rank counts in float32 here")
    config = config or zero3_config()
    if config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("load_partitioned needs a ZeRO stage 3 config (zero_optimization.stage = 3)")
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model_config._attn_implementation = attn_implementation  # eager for `earlycrop prune`: no fused kernels' approximations
    # zero.Init partitions every parameter as its module is created: no rank ever builds the model whole. The
    # dtype goes through the config's bf16/fp16 sections, never `dtype=`: DeepSpeed 0.19.8 reads an explicit
    # dtype as `dtype or fp16 if the accelerator has fp16 else bf16`, so a CPU without fp16 got bfloat16 for float32
    dtype = dtype or torch.float32
    config = {**config, "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = (model_class or architecture_class(model_config))(model_config)
    load_partitions(model, Path(folder))
    # no optimizer: DeepSpeed then only partitions and gathers the parameters (no fp32 master copy, no gradient
    # partitions or buckets); `_local_gradient` keeps the one gradient scoring needs
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def load_partitions(model: nn.Module, folder: Path) -> None:
    """Copy this rank's partition of every parameter from `folder`'s safetensors files, reading only the rows that
    hold it (`safe_open(...).get_slice`): a rank's peak is its partitions plus one partition's rows."""
    from safetensors import safe_open

    rank = world()[0]
    params = dict(model.named_parameters())
    prefix = f"{model.base_model_prefix}."
    loaded = set()
    for file in safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = key if key in params else prefix + key  # a base-model folder loaded into a model with a head
                if name not in params:
                    continue  # a buffer or a tied copy
                p, rows = params[name], f.get_slice(key)
                if tuple(rows.get_shape()) != tuple(p.ds_shape):
                    raise ValueError(f"{file}: {key} has shape {rows.get_shape()}, the model expects {tuple(p.ds_shape)}")
                part, width = p.ds_tensor.numel(), math.prod(p.ds_shape[1:])
                start = rank * part
                valid = max(0, min(part, p.ds_numel - start))
                first, last = start // width, -(-(start + valid) // width)
                flat = rows[first:last].reshape(-1)[start - first * width:][:valid]
                with torch.no_grad():
                    p.ds_tensor.zero_()
                    p.ds_tensor[:valid].copy_(flat)
                loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} of the model's weights ({', '.join(sorted(missing)[:3])}): "
                         "ZeRO-3 scoring loads a folder saved for the model's own class")


@contextmanager
def full_shapes(model: nn.Module):
    """Partitioned parameters report their full shape for the duration (zero-stride stand-ins, no memory), so
    the family adapter can read the units (gates, slices, plans) of a model no rank holds whole."""
    saved = []
    for p in model.parameters():
        if hasattr(p, "ds_shape") and p.shape != p.ds_shape:
            saved.append((p, p.data))
            p.data = torch.empty(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def score_partitioned(engine, criterion: Criterion | str, batches: list[Batch], *, progress: bool = False) -> Scores:
    """Scores of the engine's ZeRO-3-partitioned model over ALL `batches`, each rank scoring its strided shard:
    the scores one process gives for the whole model (see the module docstring for what each criterion does)."""
    criterion = earlycrop.make_criterion(criterion) if isinstance(criterion, str) else criterion
    _check_supported(criterion)
    rank, size = world()
    if criterion.uses_data and (not batches or len(batches) % size):
        raise ValueError(f"scoring under ZeRO-3 needs the calibration batches to divide evenly over the {size} ranks "
                         f"(every rank runs the same passes); got {len(batches)}")
    model = engine.module
    adapter = earlycrop.get_adapter(model)

    def partitioned_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        # a backward for the gates alone never reaches the modules before the first gate (layer 0's q/k/v), so
        # their post-backward hooks never release them: partition everything again, or the next forward (on
        # perturbed partitions) would use the stale gathered copy
        engine.empty_partition_cache()
        return default_loss(model, batch)

    was_training = model.training
    model.eval()
    try:
        with full_shapes(model):
            gates = earlycrop.attach_gates(model, adapter)
        try:
            ctx = ScoringContext(model, adapter, gates, shard_batches(batches, rank, size), partitioned_loss,
                                 all_reduce_sum, progress and rank == 0)
            scores = _score(ctx, criterion)
        finally:
            gates.remove()
            engine.empty_partition_cache()
    finally:
        model.train(was_training)
    scores.check_finite(criterion.name)
    return scores


def partitioned_refusal(criterion: Criterion) -> str | None:
    """Why `criterion` cannot score a ZeRO-3-partitioned model; None when it can."""
    if isinstance(criterion, (EarlyCroP, GraSP)):
        if criterion.hvp != "finite_difference":
            return (f"criterion {criterion.name!r} with hvp: {criterion.hvp} needs a double backward, which "
                    "does not compose with ZeRO-3's parameter gather/release hooks: use hvp: finite_difference")
    elif criterion.name not in (*GATE_CRITERIA, "magnitude"):
        return (f"criterion {criterion.name!r} cannot score a ZeRO-3-partitioned model; these can: "
                f"earlycrop and grasp (hvp: finite_difference), magnitude, {', '.join(GATE_CRITERIA)}")
    return None


def _check_supported(criterion: Criterion) -> None:
    if (refusal := partitioned_refusal(criterion)) is not None:
        raise ValueError(refusal)


def _score(ctx: ScoringContext, criterion: Criterion) -> Scores:
    if isinstance(criterion, (EarlyCroP, GraSP)):
        hg = _hessian_gradient_product(ctx, criterion.fd_step)
        return ctx.as_scores([t.abs() for t in hg] if isinstance(criterion, EarlyCroP) else hg)
    if criterion.name == "magnitude":
        return _magnitude(ctx)
    return criterion.score(ctx)


def _local_gradient(ctx: ScoringContext, weights: list[nn.Parameter]) -> list[torch.Tensor]:
    """This rank's partition of g = Σ over all ranks' batches of ∇θ L, with no optimizer buffers: as each weight's
    gradient is accumulated (whole, while ZeRO-3 holds the weight gathered for backward), a hook sums it over the
    ranks, keeps this rank's partition in float32 and frees it. Other parameters are frozen for the pass, so at
    most one weight's whole gradient exists at a time."""
    g = [torch.zeros(w.ds_tensor.numel(), dtype=torch.float32, device=w.ds_tensor.device) for w in weights]
    index = {id(w): i for i, w in enumerate(weights)}

    def keep_partition(p: nn.Parameter) -> None:
        g[index[id(p)]].add_(partition_of(p, all_reduce_sum(p.grad.reshape(-1).float())))
        p.grad = None

    frozen = [p for p in ctx.model.parameters() if p.requires_grad and id(p) not in index]
    hooks = [w.register_post_accumulate_grad_hook(keep_partition) for w in weights]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for batch in ctx.iter_batches("gradient"):
            ctx.loss_fn(ctx.model, batch).backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(True)
    return g


def _hessian_gradient_product(ctx: ScoringContext, fd_step: float) -> list[torch.Tensor]:
    """Σ_b H_cθ·g by central differences, each rank perturbing only its own partitions (ε from global norms)."""
    weights = ctx.adapter.prunable_weights(ctx.model)
    if any(getattr(w, "ds_persist", False) for w in weights):
        raise ValueError("a prunable weight is kept whole on every rank (stage3_param_persistence_threshold > 0), so "
                         "perturbing its partition would not reach the forward: score with pipeline.sharded.zero3_config()")
    g = _local_gradient(ctx, weights)
    parts = [w.ds_tensor for w in weights]
    sums = torch.tensor([sum(float(t.double().square().sum()) for t in tensors) for tensors in (g, parts)],
                        dtype=torch.float64)
    g_sq, theta_sq = (float(x) for x in all_reduce_sum(sums))
    if g_sq == 0.0:
        raise FloatingPointError("the weight gradient is zero on the calibration batches: nothing to score")
    eps = finite_difference_step(parts, fd_step, theta_sq=theta_sq) / math.sqrt(g_sq)
    return ctx.reduce_all(finite_difference_product(ctx, parts, g, eps))


def _unit_squares(slices, units: int, width: int) -> torch.Tensor:
    """Per unit, the sum of squares of this rank's partition entries in the unit's own rows/columns (the slices
    `Magnitude` sums; GQA-shared key/value rows, which belong to no single unit, are left out likewise)."""
    rank = world()[0]
    total = torch.zeros(units, dtype=torch.float64)
    for s in slices:
        p = s.parameter
        shape, part = p.ds_shape, p.ds_tensor.reshape(-1)
        blocks, rest = divmod(shape[s.dim], units * width)
        start = rank * part.numel()
        valid = max(0, min(part.numel(), p.ds_numel - start))  # the last partition is padded
        if not blocks or rest or not valid:
            continue
        index = torch.arange(start, start + valid, device=part.device)
        along = index // math.prod(shape[s.dim + 1:]) % shape[s.dim]
        total.index_add_(0, (along // width % units).cpu(), part[:valid].detach().double().square().cpu())
    return total


def _magnitude(ctx: ScoringContext) -> Scores:
    """`magnitude` from partition-local sums of squares, all-reduced before the square root."""
    squares = []
    with full_shapes(ctx.model), torch.no_grad():
        for layer in ctx.gates.layers:
            heads = ctx.adapter.attention_slices(layer, list(range(layer.num_heads)), list(range(layer.num_kv_heads)))
            squares.append(_unit_squares(heads, layer.num_heads, layer.head_dim))
            squares.append(_unit_squares(ctx.adapter.mlp_slices(layer, list(range(layer.intermediate_size))),
                                         layer.intermediate_size, 1))
    squares = ctx.reduce_all(squares)
    return Scores(heads=[t.sqrt() for t in squares[0::2]], neurons=[t.sqrt() for t in squares[1::2]])



def pruned_skeleton(model: nn.Module, plan: earlycrop.Plan, dtype: torch.dtype) -> nn.Module:
    """The model `plan` leaves, with uninitialised parameters on the CPU (its buffers copied): built on the meta
    device and cut there, so the dense shape is never allocated; `consolidate_pruned` fills it."""
    return empty_copy(model, plan, dtype=dtype, device="cpu")


def _gathered_block(adapter, block: nn.Module, layer, kept: tuple[list[int], list[int], list[int]]) -> dict[int, torch.Tensor]:
    """Inside a gather: every parameter of `block` (by id) cut like `earlycrop.prune` cuts it, slices applied in
    the same order (a parameter sliced twice is sliced again on the result)."""
    heads, kv_heads, neurons = kept
    current: dict[tuple[int, str], torch.Tensor] = {}
    for s in adapter.attention_slices(layer, heads, kv_heads) + adapter.mlp_slices(layer, neurons):
        key = (id(s.module), s.name)
        value = current.get(key, s.parameter.detach())
        current[key] = value.index_select(s.dim, s.index.to(value.device))
    return {id(p): current.get((id(m), n), p.detach()) for m in block.modules() for n, p in m.named_parameters(recurse=False)}


def consolidate_pruned(model: nn.Module, plan: earlycrop.Plan, target: nn.Module | None) -> None:
    """Copy the kept part of the ZeRO-3-partitioned `model` into `target` (rank 0's `pruned_skeleton`; None on
    the other ranks, which only take part in the gathers), one block at a time, then the parameters outside the
    blocks (embeddings, final norm, head) one at a time."""
    import deepspeed

    adapter = earlycrop.get_adapter(model)
    with full_shapes(model):
        layers = adapter.layers(model)
    owners = {id(p): name for name, p in model.named_parameters()}
    written: set[str] = set()

    def copy_into(values: dict[int, torch.Tensor]) -> None:
        if target is None:
            return
        with torch.no_grad():
            for pid, value in values.items():
                target.get_parameter(owners[pid]).copy_(value)
                written.add(owners[pid])

    for block, layer, *kept in zip(adapter.blocks(model), layers, plan.heads, plan.kv_heads, plan.neurons):
        params = list(block.parameters())
        with deepspeed.zero.GatheredParameters(params):
            if target is not None:
                copy_into(_gathered_block(adapter, block, layer, tuple(kept)))
    inside = {id(p) for block in adapter.blocks(model) for p in block.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            with deepspeed.zero.GatheredParameters([p]):
                copy_into({id(p): p.detach()})
    if target is None:
        return
    missing = {name for name, _ in target.named_parameters()} - written
    if missing:
        raise RuntimeError(f"consolidation left {sorted(missing)[:3]} of the pruned model unwritten")


class PartitionedTeacher(Teacher):
    """A teacher that DeepSpeed ZeRO-3 partitions over the ranks like the student: each forward gathers a
    module's parameters and releases them after, so no rank holds the dense teacher whole while training."""

    def __init__(self, engine) -> None:
        super().__init__(engine.module)
        self.engine = engine  # the engine owns the gather/release hooks

    def to(self, device: torch.device | str) -> Teacher:
        return self  # DeepSpeed placed the partitions

    def base_forward(self, batch):
        # a forward of the trunk alone skips the root module's hook that restarts DeepSpeed's trace of the
        # module order, which would otherwise grow with every call
        self.engine.optimizer.get_param_coordinator().reset_step()
        return super().base_forward(batch)


def partition_teacher(teacher: Teacher, micro_batch_size: int) -> PartitionedTeacher:
    """`teacher` in a DeepSpeed engine with no optimizer (the way TRL holds a reference model under ZeRO-3): its
    parameters are partitioned now and only gathered, one module at a time, for its forwards. Every rank must
    run the same teacher forwards (each one is a collective), as every rank runs the same training steps."""
    import deepspeed

    dtype = next(teacher.model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"DeepSpeed ZeRO-3 partitions only float32, bfloat16 and float16 parameters, not a {dtype} "
                         "teacher: set train.distill.teacher_dtype")
    config = {**zero3_config(micro_batch_size), "bf16": {"enabled": dtype == torch.bfloat16},
              "fp16": {"enabled": dtype == torch.float16}}
    engine, *_ = deepspeed.initialize(model=teacher.model, config=config)
    return PartitionedTeacher(engine)


class PartitionedRule(WeightDistanceRule):
    """The `auto` rule over a ZeRO-3 model: each rank keeps w_1 of its own partitions and the distances are summed
    over the ranks. A checkpoint holds w_1 whole (gathered when Accelerate asks every rank for the state; rank 0
    writes it), and a resumed rank takes its own partition back at its next observation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.params: list[nn.Parameter] | None = None
        self.whole_w1: list[torch.Tensor] | None = None  # loaded from a checkpoint, not yet partitioned

    def observe_partitioned(self, step: int, params: list[nn.Parameter]) -> bool:
        if self.whole_w1 is not None:
            self.w1 = [partition_of(p, w.reshape(-1).float())[:valid_numel(p)] for p, w in zip(params, self.whole_w1)]
            self.whole_w1 = None
        self.params = params
        return self.observe(step, [p.ds_tensor[:valid_numel(p)] for p in params], reduce=all_reduce_sum)

    def finish(self) -> None:
        """After the cut: the dense partitions are no longer needed (nor held alive by this rule)."""
        self.params, self.w1, self.whole_w1 = None, None, None

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.w1 is None or self.params is None:
            return {**state, "w1": list(self.whole_w1 or [])}
        whole = [_gather_whole(p, w) for p, w in zip(self.params, self.w1)]
        return {**state, "w1": whole if world()[0] == 0 else []}  # Accelerate writes rank 0's state only

    def load_state_dict(self, state: dict) -> None:
        self.trace = [(int(s), float(d)) for s, d in state["trace"]]
        self.w1, self.whole_w1 = None, list(state["w1"]) or None


def _gather_whole(p: nn.Parameter, part: torch.Tensor) -> torch.Tensor | None:
    """On rank 0 the whole tensor of `p`'s shape from every rank's (unpadded) partition `part`; None elsewhere
    (a collective: every rank calls it)."""
    import torch.distributed as dist

    rank, size = world()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL gathers on the GPU; w_1 stays on the CPU
    padded = torch.zeros(p.ds_tensor.numel(), dtype=part.dtype, device=device)
    padded[:part.numel()] = part
    parts = [torch.zeros_like(padded) for _ in range(size)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    return torch.cat(parts)[:p.ds_numel].reshape(p.ds_shape).cpu() if rank == 0 else None

