"""`earlycrop prune`: score a local model on calibration text, prune it, save model + plan + scores.

Under `torchrun` / `accelerate launch` the calibration batches are sharded over the ranks and
the scores all-reduced, so the outputs equal those of one process.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import earlycrop

from . import data as data_lib
from . import scoring
from .config import PruneCommandConfig
from .distributed import check_same_on_all_ranks, describe_peak_memory, init_process_group, peak_memory_per_rank, world
from .modeling import check_model_folder, check_seq_len, load_model_tokenizer
from .outputs import check_prune_out, disk_errors, staged_folder


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


def load(cmd: PruneCommandConfig):
    """The model in the scoring dtype, its saved dtype, and its tokenizer (which must fit the embedding)."""
    model = earlycrop.from_pretrained(cmd.model, attn_implementation="eager")
    saved_dtype = next(model.parameters()).dtype
    model.to(getattr(torch, cmd.score_dtype))
    tokenizer = load_model_tokenizer(cmd.model)
    if tokenizer is None:
        raise FileNotFoundError(f"{cmd.model} has no tokenizer files: save the tokenizer into the model folder")
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {cmd.model} has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
                         "save the model's own tokenizer into the model folder")
    return model, saved_dtype, tokenizer


def prune_model(cmd: PruneCommandConfig) -> None:
    """Score (sharded over the ranks, exact), select, cut, and save model + plan + scores from rank 0."""
    check_paths(cmd)
    init_process_group()
    rank, size = world()
    try:
        if size > cmd.batches:  # before loading anything: every rank needs at least one batch
            raise ValueError(f"{size} ranks but only {cmd.batches} calibration batches: raise --batches to at least {size}")
        if rank == 0:
            print(f"earlycrop prune: {size} rank{'s' if size > 1 else ''}, calibration sharded over them")
        model, saved_dtype, tokenizer = load(cmd)
        selection = cmd.selection()
        scoring.placeholder_plan(model, selection)  # impossible ratios fail before scoring
        objective = resolve_objective(cmd, model)
        batches = calibration(cmd, model, tokenizer, objective)
        recipe = scoring.resolve(cmd.criterion, "task", name_or_path=None, task="", hvp=cmd.hvp, fd_step=cmd.fd_step, seed=cmd.seed)
        if rank == 0 and objective == "self":
            print("scoring on the model's own predictions (--objective self): no labels needed")
        scores = scoring.score(model, recipe, batches, progress=rank == 0)
        peaks = peak_memory_per_rank()  # scoring's peak on every rank (a collective: every rank gathers)
        if rank == 0:
            print(describe_peak_memory(peaks))
        meta = {"criterion": recipe.criterion, "objective": objective, "batches": cmd.batches}
        plan = earlycrop.make_plan(model, scores, selection, meta=meta)
        check_same_on_all_ranks(plan.to_json(), "pruning plan")
        result = earlycrop.prune(model.to(saved_dtype), plan)
        if rank == 0:
            out = Path(cmd.out)
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
