"""`earlycrop prune`: score a local model on calibration text, prune it, save model + plan + scores.

Under `torchrun` / `accelerate launch` the calibration batches are sharded over the ranks and
the scores all-reduced, so the outputs equal those of one process.
"""

from __future__ import annotations

import argparse
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import earlycrop
from earlycrop.criteria import CRITERIA

from . import data as data_lib
from .distributed import check_same_on_all_ranks, score_sharded, world
from .modeling import check_model_folder, check_seq_len, load_model_tokenizer
from .outputs import check_prune_out, disk_errors, staged_folder
from .scoring import placeholder_plan


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _validate(args: argparse.Namespace) -> earlycrop.SelectionConfig:
    """Every argument, before the model or data is loaded: a mistake costs seconds, not a scoring pass."""
    if args.criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {args.criterion!r}; choose one of: {', '.join(sorted(CRITERIA))}")
    for key in ("batches", "batch_size", "seq_len", "round_to"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1")
    if not 0 < args.fd_step < math.inf:
        raise ValueError(f"--fd-step must be a positive number (got {args.fd_step})")
    check_model_folder(args.model)
    check_prune_out(Path(args.out), Path(args.model), args.overwrite)
    if not args.data.startswith("gensim:") and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    check_seq_len(args.model, args.seq_len, "--seq-len")
    return earlycrop.SelectionConfig(args.heads, args.mlp, args.layout, args.round_to, args.gqa)


def _calibration(args, model, tokenizer) -> list[dict[str, torch.Tensor]]:
    classification = type(model).__name__.endswith("SequenceClassification")
    if classification and not args.label_field:
        raise ValueError("this is a sequence-classification model: pass --label-field with the label column")
    docs = data_lib.load_documents(args.data, text_field=args.text_field, label_field=args.label_field if classification else None)
    if classification:
        blocks = data_lib.tokenize_classification(docs, tokenizer, args.seq_len)
    else:
        blocks = data_lib.pack_causal_lm(docs, tokenizer, args.seq_len)
    return data_lib.calibration_batches(blocks, num_batches=args.batches, batch_size=args.batch_size, seed=args.seed)


def prune_model(args: argparse.Namespace) -> None:
    selection = _validate(args)
    _init_distributed()
    rank, size = world()
    try:
        if size > args.batches:  # before loading anything: every rank needs at least one batch
            raise ValueError(f"{size} ranks but only {args.batches} calibration batches: raise --batches to at least {size}")
        model = earlycrop.from_pretrained(args.model, attn_implementation="eager")
        saved_dtype = next(model.parameters()).dtype
        model.to(getattr(torch, args.score_dtype))
        tokenizer = load_model_tokenizer(args.model)
        if tokenizer is None:
            raise FileNotFoundError(f"{args.model} has no tokenizer files: save the tokenizer into the model folder")
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer in {args.model} has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
                             "save the model's own tokenizer into the model folder")
        placeholder_plan(model, selection)  # impossible ratios fail before scoring
        batches = _calibration(args, model, tokenizer)
        criterion = earlycrop.make_criterion(args.criterion, **earlycrop.criterion_options(args.criterion, hvp=args.hvp, fd_step=args.fd_step, seed=args.seed))
        scores = score_sharded(model, criterion, batches, progress=rank == 0)
        plan = earlycrop.make_plan(model, scores, selection, meta={"criterion": args.criterion, "batches": args.batches})
        check_same_on_all_ranks(plan.to_json(), "pruning plan")
        result = earlycrop.prune(model.to(saved_dtype), plan)
        if rank == 0:
            out = Path(args.out)
            _save(out, model, tokenizer, plan, scores)
            print(summary(plan, result, out))
        if dist.is_initialized():
            dist.barrier()  # only on success: a rank that failed must not leave the others waiting here
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _save(out: Path, model, tokenizer, plan: earlycrop.Plan, scores) -> None:
    """All outputs into a staging folder that replaces `out` only once every file is written."""
    tensors = scores.to_tensors()
    needed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *tensors.values()))
    with disk_errors(out, needed), staged_folder(out) as staging:
        earlycrop.save_pretrained(model, staging, tokenizer)
        plan.save(staging / "plan.json")
        save_file(tensors, staging / "scores.safetensors")


def summary(plan: earlycrop.Plan, result: earlycrop.PruneResult, out: Path) -> str:
    counts = plan.counts()
    lines = [f"{'layer':>5}  {'heads':>9}  {'kv heads':>9}  {'neurons':>13}"]
    for i, (h, kv, n) in enumerate(zip(counts["heads"], counts["kv_heads"], counts["neurons"])):
        lines.append(f"{i:>5}  {h:>4}/{plan.dense_heads[i]:<4}  {kv:>4}/{plan.dense_kv_heads[i]:<4}  {n:>6}/{plan.dense_neurons[i]:<6}")
    ties = plan.meta.get("ties") or {}
    if any(ties.values()):
        lines.append(f"ties: {ties['heads']} head units and {ties['neurons']} neurons scored equal across the cut; "
                     "the lowest indices were kept (the criterion did not tell them apart)")
    ratio = result.params_after / result.params_before
    lines.append(f"parameters: {result.params_before:,} → {result.params_after:,} ({ratio:.1%})")
    if result.plain_loadable:
        lines.append(f"{out} loads with plain transformers AutoModel….from_pretrained and with earlycrop.from_pretrained")
    else:
        lines.append(f"{out} needs earlycrop.from_pretrained (this family's config cannot describe the pruned heads/layout)")
    return "\n".join(lines)
