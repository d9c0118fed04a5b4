"""Exact data-parallel scoring (DESIGN.md §4).

Each rank scores its shard of the calibration batches; the criteria call `all_reduce_sum` on
their signed sums (the weight gradient g first, then H_cθ·g or ∂L/∂c) before any absolute value,
so N ranks give the scores one process gives over all the batches, and every rank then makes
the same plan.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

import earlycrop
from earlycrop.criteria import Batch, Scores

from .data import shard_batches


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
