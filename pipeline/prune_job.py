"""`earlycrop prune`: score a local model on calibration text, prune it, save model + plan + scores.

Under `torchrun` / `accelerate launch` the calibration batches are sharded over the ranks and
the scores all-reduced, so the outputs equal those of one process. Under an `accelerate launch` whose
DeepSpeed config is ZeRO stage 3 the dense model is also partitioned over the ranks, never whole on one
(pipeline/sharded.py): scoring, selection and surgery run on the partitions, and rank 0 saves the pruned model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import earlycrop
from earlycrop.families import architecture_class

from . import data as data_lib
from . import scoring
from .config import PruneCommandConfig, check_seq_len
from .distributed import (
    check_same_on_all_ranks,
    describe_peak_memory,
    init_process_group,
    launch_zero_stage,
    peak_memory_per_rank,
    world,
)
from .modeling import check_model_folder, load_model_tokenizer
from .outputs import check_prune_out, disk_errors, staged_folder
from .sharded import consolidate_pruned, full_shapes, load_partitioned, pruned_skeleton, score_partitioned, zero3_config


def check_paths(cmd: PruneCommandConfig) -> None:
    """Every path, before the model or data is loaded (the values were checked by the typed config):
    a mistake costs seconds, not a scoring pass."""
    check_model_folder(cmd.model)
    check_prune_out(Path(cmd.out), Path(cmd.model), cmd.overwrite)
    if not cmd.data.startswith("gensim:") and not Path(cmd.data).exists():
        raise FileNotFoundError(f"--data {cmd.data} does not exist")
    check_seq_len(cmd.model, cmd.seq_len, "--seq-len")


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("SequenceClassification")


def resolve_objective(cmd: PruneCommandConfig, model) -> str:
    """`auto`: a classifier without --label-field scores on its own predictions (self), everything else on the
    task's targets (the labels; a language model's own text)."""
    classifier = is_classifier(model)
    if cmd.objective == "auto":
        return "self" if classifier and not cmd.label_field else "task"
    if cmd.objective == "self" and not classifier:
        raise ValueError("--objective self needs a sequence-classification model (its predicted class per text); "
                         "a language model scores on its own text with --objective task")
    if cmd.objective == "task" and classifier and not cmd.label_field:
        raise ValueError("--objective task on a sequence-classification model needs --label-field with the label column; "
                         "without labels use --objective self (the model's own predictions as labels)")
    return cmd.objective


def calibration(cmd: PruneCommandConfig, model, tokenizer, objective: str) -> list[dict[str, torch.Tensor]]:
    """Calibration batches with the targets `objective` scores on; for `self` the dense model's predictions."""
    classification = is_classifier(model)
    labelled = classification and objective == "task"
    docs = data_lib.load_documents(cmd.data, text_field=cmd.text_field, label_field=cmd.label_field if labelled else None)
    if classification:
        if not labelled:
            docs = docs.add_column("label", [0] * len(docs))  # placeholder: self_labelled replaces it
        blocks = data_lib.tokenize_classification(docs, tokenizer, cmd.seq_len)
    else:
        blocks = data_lib.pack_causal_lm(docs, tokenizer, cmd.seq_len)
    batches = data_lib.calibration_batches(blocks, num_batches=cmd.batches, batch_size=cmd.batch_size, seed=cmd.seed)
    return self_labelled(model, batches) if objective == "self" else batches


@torch.no_grad()
def self_labelled(model, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each text labelled with the dense classifier's own prediction (argmax of its logits), once, before scoring:
    the criterion then asks which units that decision depends on, with no labelled data at hand."""
    training = model.training
    model.eval()
    try:
        return [{**b, "labels": model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)} for b in batches]
    finally:
        model.train(training)


def checked_tokenizer(cmd: PruneCommandConfig, vocab: int):
    """The folder's tokenizer, which must fit the model's `vocab` embedding rows."""
    tokenizer = load_model_tokenizer(cmd.model)
    if tokenizer is None:
        raise FileNotFoundError(f"{cmd.model} has no tokenizer files: save the tokenizer into the model folder")
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {cmd.model} has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
                         "save the model's own tokenizer into the model folder")
    return tokenizer


def load(cmd: PruneCommandConfig):
    """The model in the scoring dtype, its saved dtype, and its tokenizer (which must fit the embedding)."""
    model = earlycrop.from_pretrained(cmd.model, attn_implementation="eager")
    saved_dtype = next(model.parameters()).dtype
    model.to(getattr(torch, cmd.score_dtype))
    return model, saved_dtype, checked_tokenizer(cmd, model.get_input_embeddings().weight.shape[0])


def load_partitioned_model(cmd: PruneCommandConfig):
    """The DeepSpeed engine holding the model partitioned over the ranks, its saved dtype, and its tokenizer."""
    import deepspeed
    from transformers import AutoConfig

    if cmd.score_dtype != "float32":
        raise ValueError(f"--score-dtype {cmd.score_dtype} cannot be partitioned (DeepSpeed ZeRO-3 partitions float32, "
                         "bfloat16 and float16 parameters only): score in float32, or launch without ZeRO-3")
    config = AutoConfig.from_pretrained(cmd.model, trust_remote_code=False)
    if not earlycrop.plain_loadable(config):
        raise ValueError(f"{cmd.model} was pruned with a layout only earlycrop.from_pretrained rebuilds, which ZeRO-3 cannot "
                         "load partitioned: prune it again without ZeRO-3 (torchrun or one process)")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    saved_dtype = getattr(config, "dtype", None) or torch.float32
    saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    engine = load_partitioned(cmd.model, zero3_config(cmd.batch_size), dtype=torch.float32,
                              model_class=architecture_class(config))
    return engine, saved_dtype, checked_tokenizer(cmd, config.vocab_size)


def prune_model(cmd: PruneCommandConfig) -> None:
    """Score (sharded over the ranks, exact), select, cut, and save model + plan + scores from rank 0."""
    check_paths(cmd)
    init_process_group()
    rank, size = world()
    try:
        if size > cmd.batches:  # before loading anything: every rank needs at least one batch
            raise ValueError(f"{size} ranks but only {cmd.batches} calibration batches: raise --batches to at least {size}")
        if launch_zero_stage() == 3:
            if cmd.batches % size:
                raise ValueError(f"under ZeRO-3 every rank runs the same passes: --batches {cmd.batches} must divide evenly "
                                 f"over the {size} ranks")
            _prune_partitioned(cmd, rank, size)
        else:
            _prune_whole(cmd, rank, size)
        if dist.is_initialized():
            dist.barrier()  # only on success: a rank that failed must not leave the others waiting here
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _scoring_recipe(cmd: PruneCommandConfig, objective: str, rank: int) -> scoring.Scoring:
    if rank == 0 and objective == "self":
        print("scoring on the model's own predictions (--objective self): no labels needed")
    return scoring.resolve(cmd.criterion, "task", name_or_path=None, task="", hvp=cmd.hvp, fd_step=cmd.fd_step, seed=cmd.seed)


def _report_peaks(rank: int) -> None:
    peaks = peak_memory_per_rank()  # scoring's peak on every rank (a collective: every rank gathers)
    if rank == 0:
        print(describe_peak_memory(peaks))


def _prune_whole(cmd: PruneCommandConfig, rank: int, size: int) -> None:
    """Every rank holds the whole model; the calibration batches are sharded over the ranks."""
    if rank == 0:
        print(f"earlycrop prune: {size} rank{'s' if size > 1 else ''}, calibration sharded over them")
    model, saved_dtype, tokenizer = load(cmd)
    selection = cmd.selection()
    scoring.placeholder_plan(model, selection)  # impossible ratios fail before scoring
    objective = resolve_objective(cmd, model)
    batches = calibration(cmd, model, tokenizer, objective)
    recipe = _scoring_recipe(cmd, objective, rank)
    scores = scoring.score(model, recipe, batches, progress=rank == 0)
    _report_peaks(rank)
    meta = {"criterion": recipe.criterion, "objective": objective, "batches": cmd.batches}
    plan = earlycrop.make_plan(model, scores, selection, meta=meta)
    check_same_on_all_ranks(plan.to_json(), "pruning plan")
    result = earlycrop.prune(model.to(saved_dtype), plan)
    if rank == 0:
        out = Path(cmd.out)
        _save(out, model, tokenizer, plan, scores)
        print(summary(plan, result, out))


def _prune_partitioned(cmd: PruneCommandConfig, rank: int, size: int) -> None:
    """ZeRO-3: the model is partitioned while it loads and stays so; rank 0 receives the pruned model only."""
    if rank == 0:
        print(f"earlycrop prune: {size} ranks, DeepSpeed ZeRO-3: parameters partitioned over them, calibration sharded")
    engine, saved_dtype, tokenizer = load_partitioned_model(cmd)
    model = engine.module
    selection = cmd.selection()
    with full_shapes(model):
        scoring.placeholder_plan(model, selection)
    objective = resolve_objective(cmd, model)
    batches = calibration(cmd, model, tokenizer, objective)
    recipe = _scoring_recipe(cmd, objective, rank)
    scores = score_partitioned(engine, scoring.make(recipe), batches, progress=rank == 0)
    _report_peaks(rank)
    meta = {"criterion": recipe.criterion, "objective": objective, "batches": cmd.batches}
    with full_shapes(model):
        plan = earlycrop.make_plan(model, scores, selection, meta=meta)
    check_same_on_all_ranks(plan.to_json(), "pruning plan")
    target = pruned_skeleton(model, plan, saved_dtype) if rank == 0 else None
    consolidate_pruned(model, plan, target)
    if rank == 0:
        before = sum(p.ds_numel for p in model.parameters())
        result = earlycrop.PruneResult(before, sum(p.numel() for p in target.parameters()), earlycrop.plain_loadable(target))
        out = Path(cmd.out)
        _save(out, target, tokenizer, plan, scores)
        print(summary(plan, result, out))


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
