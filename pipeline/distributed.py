"""Everything distributed in one place: the accelerator, whole-parameter building under ZeRO-3,
DeepSpeed optimizer-state transfer, and exact data-parallel scoring (docs/DESIGN.md §4).

Scoring: each rank scores its shard of the calibration batches; the criteria call `all_reduce_sum`
on their signed sums (the weight gradient g first, then H_cθ·g or ∂L/∂c) before any absolute value,
so N ranks give the scores one process gives over all the batches, and every rank then makes
the same plan.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import resource
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn

import earlycrop
from earlycrop.criteria import Batch, Scores

from .data import shard_batches

COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a collective that gave up waiting for a peer (NCCL's DistBackendError, gloo's timeout)."""
    return isinstance(exc, dist.DistBackendError) or (isinstance(exc, RuntimeError) and "Timed out waiting" in str(exc))


def init_process_group(timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
    """Join the launcher's process group (torchrun / accelerate launch) outside an Accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str | None, micro_batch_size: int,
                     max_grad_norm: float | None, timeout: timedelta = COLLECTIVE_TIMEOUT) -> Accelerator:
    """Accelerator for this launch; gloo on CPU-only machines (DeepSpeed on CPU needs it said explicitly)."""
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if multi_process and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout))
    accelerator = Accelerator(
        # without cpu=True a CPU-only torchrun launch silently degrades to N independent processes
        cpu=not torch.cuda.is_available() and not deepspeed,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        kwargs_handlers=handlers,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = gradient_accumulation_steps
        ds["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * accelerator.num_processes
        ds["gradient_clipping"] = max_grad_norm or 0.0
    return accelerator


def launch_zero_stage() -> int | None:
    """The ZeRO stage an `accelerate launch` with a DeepSpeed config asks for (read from the environment it sets),
    for commands that do not build an Accelerator; None without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file != "None":
        with open(config_file) as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    return int(stage) if stage.isdigit() else 0


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, or None when DeepSpeed is not in use."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


@contextmanager
def whole_parameters(accelerator: Accelerator):
    """Under ZeRO-3 transformers partitions parameters while building the model; scoring and
    surgery need them whole, so the model is built whole and partitioned later by `prepare`."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def build_whole_from_now_on(accelerator: Accelerator) -> None:
    """After training under ZeRO-3: transformers' global DeepSpeed config would build any model loaded from here on
    (MLflow's model flavour loads the saved folder back on rank 0 alone) partitioned, a collective that the other
    ranks never join; the run hung there. Unset it: nothing is partitioned after the final save."""
    if zero_stage(accelerator) == 3:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def training_state(accelerator: Accelerator, optimizer, module: nn.Module, step: int, lr: float,
                   weight_decay: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model to cut and a plain torch optimizer whose state surgery can slice: the prepared ones under DDP;
    under DeepSpeed an AdamW holding the engine's gathered fp32 weights and moments, and under ZeRO-3 also a
    whole copy of the partitioned model (its weights the fp32 masters cast to the model's dtype, gathered one
    parameter at a time; the masters themselves are in the AdamW state, which surgery slices)."""
    stage = zero_stage(accelerator)
    if stage is None:
        return module, optimizer.optimizer
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    whole = empty_copy(module) if stage == 3 else module
    adam = torch.optim.AdamW(whole.parameters(), lr=lr, weight_decay=weight_decay)
    for (name, p), q in zip(module.named_parameters(), whole.parameters()):
        master = safe_get_full_fp32_param(p)  # a collective under ZeRO-3: every rank gathers every parameter
        if master is None:  # frozen: no master weights, no moments
            if stage == 3:
                _copy_gathered(p, q)
            continue
        state = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
        with torch.no_grad():
            q.copy_(master.reshape(q.shape).to(q.dtype))
        adam.state[q] = {"step": torch.tensor(float(step)), "master": master.reshape(q.shape).clone(),
                         **{k: v.reshape(q.shape).clone() for k, v in state.items() if v is not None}}
    return whole, adam


def empty_copy(module: nn.Module, plan: earlycrop.Plan | None = None, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """A model of `module`'s class, config and layout (cut to `plan` when given) with uninitialised parameters:
    built on the meta device, so a dense shape is never allocated, and usable for ZeRO-3-partitioned modules, which
    cannot be deep-copied whole. Buffers (never partitioned) are copied with their own dtype (the float32 RoPE
    frequencies of a bfloat16 model stay float32), and each parameter keeps `requires_grad`."""
    from earlycrop.surgery import LAYOUT_KEY, shape_plan

    with torch.device("meta"):
        empty = type(module)(copy.deepcopy(module.config))
    if not earlycrop.plain_loadable(module.config):  # a per-layer layout: rebuilt as earlycrop.from_pretrained does
        earlycrop.prune(empty, shape_plan(empty, getattr(module.config, LAYOUT_KEY)))
    if plan is not None:
        earlycrop.prune(empty, plan)
    empty = empty.to(dtype or next(module.parameters()).dtype).to_empty(device=device or next(module.parameters()).device)
    empty.tie_weights()  # leaving the meta device makes new Parameters, so tied ones are tied again
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(empty.get_submodule(owner), leaf, buffer.detach().clone().to(empty.device))
    for source, param in zip(module.parameters(), empty.parameters()):
        param.requires_grad_(source.requires_grad)
    return empty.train(module.training)


def release_zero3(engine) -> None:
    """Free a ZeRO-3 engine that is done with (the training engine a cut replaced, a dense model only scored).
    DeepSpeed keeps every ZeRO-3 engine's root module in a global list (`parameter_offload.FWD_MODULE_STACK`)
    and each parameter points back at its optimizer, so dropping the engine alone frees neither its partitions
    nor its fp32 weights and moments."""
    from deepspeed.runtime.zero import parameter_offload

    engine.destroy()
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not engine.module]
    for p in engine.module.parameters():
        if hasattr(p, "_z3_optimizer"):
            del p._z3_optimizer


def _copy_gathered(partitioned: nn.Parameter, target: torch.Tensor) -> None:
    import deepspeed

    with deepspeed.zero.GatheredParameters([partitioned]), torch.no_grad():
        target.copy_(partitioned)


def prepare_pruned(accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer):
    """Wrap a model pruned mid-training and its sliced optimizer again (DDP or a new ZeRO engine
    that receives the sliced moments, so training continues without a restart)."""
    if zero_stage(accelerator) is None:
        return accelerator.prepare(module, optimizer)
    sliced = {p: optimizer.state.pop(p) for p in list(optimizer.state)}
    engine, prepared_optimizer = accelerator.prepare(module, optimizer)
    _moments_into_deepspeed(engine, module, sliced)
    return engine, prepared_optimizer


def _moments_into_deepspeed(engine, module: nn.Module, sliced: dict) -> None:
    """Fresh Adam state for the new engine's fp32 partitions, then each parameter's sliced master weights and
    moments written in (whole under ZeRO-1/2; under ZeRO-3 each rank writes its own partition)."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    zero = engine.optimizer
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    step = next(iter(sliced.values()))["step"].clone() if sliced else torch.tensor(0.0)
    for flat in zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat] = {"step": step.clone(), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
    if not stage3:
        zero._lazy_init_hp_params_optimizer_state()
    for p in module.parameters():
        for key, value in sliced.get(p, {}).items():
            if key == "step":
                continue
            value = value.to(engine.device, torch.float32)
            if stage3:
                value = partition_of(p, value.reshape(-1))
                safe_set_local_fp32_param(p, value) if key == "master" else safe_set_local_optimizer_state(p, value, key)
            else:
                safe_set_full_fp32_param(p, value) if key == "master" else safe_set_full_optimizer_state(p, value, key)


def partition_of(p: nn.Parameter, flat: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of the flattened whole tensor `flat` of `p`, in float32, padded with zeros to
    the partition size (DeepSpeed's own padding of the last partition is uninitialised memory)."""
    part, valid = p.ds_tensor.numel(), valid_numel(p)
    out = torch.zeros(part, dtype=torch.float32, device=flat.device)
    start = world()[0] * part
    out[:valid] = flat[start:start + valid]
    return out


def valid_numel(p: nn.Parameter) -> int:
    """How many entries of this rank's ZeRO-3 partition of `p` are real (the last rank's is padded)."""
    part = p.ds_tensor.numel()
    return max(0, min(part, p.ds_numel - world()[0] * part))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks (in place); a no-op in a single process."""
    if world()[1] > 1:
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def score_sharded(
    model: nn.Module,
    criterion: earlycrop.Criterion,
    batches: list[Batch],
    *,
    progress: bool = False,
) -> Scores:
    """Scores of `model` over ALL `batches`, each rank computing only its strided shard."""
    rank, size = world()
    shard = shard_batches(batches, rank, size)
    return earlycrop.score_units(
        model, criterion, shard, reduce=all_reduce_sum if size > 1 else None, progress=progress and rank == 0
    )


def check_same_on_all_ranks(text: str, what: str) -> None:
    """Fail loudly if ranks disagree (e.g. on the pruning plan), instead of hanging later in DDP."""
    rank, size = world()
    if size == 1:
        return
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()[:8]), dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(digest) for _ in range(size)]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"ranks disagree on the {what}: check that every rank sees the same model and data")


def describe_launch(accelerator: Accelerator, dtype: torch.dtype) -> str:
    """One line on how this run executes: ranks, device, engine, precision."""
    stage = zero_stage(accelerator)
    if stage is not None:
        engine = f"DeepSpeed ZeRO-{stage}"
    elif accelerator.num_processes > 1:
        engine = "DDP"
    else:
        engine = "a single process (no data parallelism)"
    ranks = f"{accelerator.num_processes} rank{'s' if accelerator.num_processes > 1 else ''}"
    return (f"{ranks} on {accelerator.device.type}, {engine}, weights {str(dtype).removeprefix('torch.')}, "
            f"mixed precision {accelerator.mixed_precision}")


class TiedWeightsNote(logging.Filter):
    """Accelerate warns at every save that it removed a tensor shared with another one; for a model whose
    config ties its input and output embeddings that is expected, so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def quiet_expected_tied_weights(model: nn.Module) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        target = logging.getLogger("accelerate.utils.other")
        if not any(isinstance(f, TiedWeightsNote) for f in target.filters):
            target.addFilter(TiedWeightsNote())


def peak_memory_bytes() -> int:
    """This process's peak memory so far: the CUDA allocator's most allocated bytes on a GPU, peak RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def peak_memory_per_rank() -> list[int]:
    """Every rank's `peak_memory_bytes`, in rank order, on every rank (an all_gather of one int64 per rank):
    a collective, so every rank must call it."""
    size = world()[1]
    if size == 1:
        return [peak_memory_bytes()]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([peak_memory_bytes()], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine)
    return [int(t.item()) for t in gathered]


def describe_peak_memory(peaks: list[int]) -> str:
    """One line for the logs: `peak memory per rank: 0: 1.2 GB, 1: 1.1 GB` (decimal GB)."""
    return "peak memory per rank: " + ", ".join(f"{rank}: {peak / 1e9:.1f} GB" for rank, peak in enumerate(peaks))
