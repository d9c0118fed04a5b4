"""The end-to-end job: data → model → score → select → prune → train → evaluate → save, tracked.

Launched under `accelerate launch` or `torchrun`; every rank runs this same code. Scoring is
exact across ranks (pipeline.distributed); MLflow is written by rank 0 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

import earlycrop
from earlycrop.budget import Budget, BudgetReport, BudgetResult, budget_report, fit_to_budget
from earlycrop.criteria import Scores
from earlycrop.memory import TrainingSetup
from earlycrop.schedule import WeightDistanceRule

from . import data as data_lib
from .config import RunConfig
from .distributed import check_same_on_all_ranks, score_sharded
from .modeling import (
    build_model,
    has_pretraining_head,
    saved_as_classifier,
    load_model_tokenizer,
    load_pretraining_model,
    new_parameter_names,
)
from .plots import plot_kept_units, plot_loss_curves, plot_scores
from .tracking import create_tracker, flatten_config
from .train import BlockSampler, Loop, TrainerState, evaluate, latest_checkpoint, load_trainer_state, train

SCORES_FILE = "scores.safetensors"
PLAN_FILE = "plan.json"


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """Accelerator for this launch; gloo on CPU-only machines (DeepSpeed on CPU needs it said explicitly)."""
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if multi_process and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    accelerator = Accelerator(
        # without cpu=True a CPU-only torchrun launch silently degrades to N independent processes
        cpu=not torch.cuda.is_available() and not deepspeed,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=handlers,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
        ds["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
        ds["gradient_clipping"] = cfg.train.max_grad_norm or 0.0
    return accelerator


def zero_stage(accelerator: Accelerator) -> int | None:
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


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Prepared:
    """Text turned into tensors, identical on every rank."""

    tokenizer: object
    train_blocks: dict[str, torch.Tensor]
    val_blocks: dict[str, torch.Tensor]
    calibration: list[dict[str, torch.Tensor]]


def _to_tensors(ds) -> dict[str, torch.Tensor]:
    cols = [c for c in ("input_ids", "attention_mask", "labels") if c in ds.column_names]
    return {c: torch.tensor(list(ds[c])) for c in cols}


def prepare_data(cfg: RunConfig, accelerator: Accelerator) -> Prepared:
    """Documents → split → tokenizer → blocks → calibration batches (drawn from the training split)."""
    d = cfg.data
    docs = data_lib.load_documents(d.source, text_field=d.text_field, label_field=d.label_field)
    train_docs, val_docs = data_lib.split_documents(docs, d.validation_fraction, cfg.seed)
    tokenizer = _tokenizer(cfg, accelerator, train_docs)
    if cfg.model.task == "causal_lm":
        train_ds = data_lib.pack_causal_lm(train_docs, tokenizer, d.seq_len)
        val_ds = data_lib.pack_causal_lm(val_docs, tokenizer, d.seq_len)
    elif cfg.model.task == "masked_lm":
        train_ds, val_ds = (
            datasets.Dataset.from_dict({k: v.tolist() for k, v in data_lib.mask_for_mlm(
                _to_tensors(data_lib.pack_causal_lm(docs_, tokenizer, d.seq_len)), tokenizer, d.mlm_probability, seed).items()})
            for docs_, seed in ((train_docs, cfg.seed), (val_docs, cfg.seed + 1))
        )
    else:
        train_ds = data_lib.tokenize_classification(train_docs, tokenizer, d.seq_len)
        val_ds = data_lib.tokenize_classification(val_docs, tokenizer, d.seq_len)
    calibration = data_lib.calibration_batches(
        train_ds, num_batches=cfg.prune.calibration_batches, batch_size=cfg.prune.calibration_batch_size, seed=cfg.seed
    )
    if accelerator.num_processes > len(calibration) and cfg.prune.prune_at != "never":
        raise ValueError(
            f"{accelerator.num_processes} ranks but only {len(calibration)} calibration batches: "
            f"set prune.calibration_batches >= {accelerator.num_processes}"
        )
    prepared = Prepared(tokenizer, _to_tensors(train_ds), _to_tensors(val_ds), calibration)
    global_batch = cfg.train.micro_batch_size * accelerator.num_processes
    for name, blocks in (("training", prepared.train_blocks), ("validation", prepared.val_blocks)):
        count = blocks["input_ids"].shape[0]
        if count < global_batch:
            raise ValueError(
                f"{count} {name} blocks are fewer than one batch on every rank ({cfg.train.micro_batch_size} × "
                f"{accelerator.num_processes}): use more text, a smaller train.micro_batch_size or data.seq_len"
                + (", or a larger data.validation_fraction" if name == "validation" else "")
            )
    return prepared


def _tokenizer(cfg: RunConfig, accelerator: Accelerator, train_docs):
    if cfg.data.tokenizer:
        tok = load_model_tokenizer(cfg.data.tokenizer)
        if tok is None:
            raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer} holds no tokenizer files")
        return tok
    if cfg.model.name_or_path:
        tok = load_model_tokenizer(cfg.model.name_or_path)
        if tok is None:
            raise FileNotFoundError(f"{cfg.model.name_or_path} has no tokenizer: set data.tokenizer to a tokenizer folder")
        return tok
    # from scratch: rank 0 trains a byte-level BPE on the training split, the others load it
    folder = Path(cfg.output_dir) / "tokenizer"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            tokenizer = data_lib.train_tokenizer(list(train_docs["text"]), cfg.data.vocab_size,
                                                 mask_token=cfg.model.task == "masked_lm")
            tokenizer.save_pretrained(folder)
        return load_model_tokenizer(str(folder))


def check_tokenizer(model, tokenizer) -> None:
    """A tokenizer whose ids run past the embedding table fails here, not as an index error mid-training."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
            "use the model's own tokenizer (data.tokenizer) or a larger vocab_size"
        )


def check_labels(model, prepared: Prepared) -> None:
    """Class ids beyond the classifier's outputs fail here, not as an index error mid-training."""
    if prepared.train_blocks["labels"].dim() != 1:
        return
    top = max(int(b["labels"].max()) for b in (prepared.train_blocks, prepared.val_blocks))
    if top >= model.config.num_labels:
        raise ValueError(f"the data has labels up to {top} but model.num_labels={model.config.num_labels}: set model.num_labels={top + 1}")


def selection_config(cfg: RunConfig) -> earlycrop.SelectionConfig:
    p = cfg.prune
    return earlycrop.SelectionConfig(p.heads, p.mlp, p.layout, p.round_to, p.gqa, p.target_params)


def training_setup(cfg: RunConfig, accelerator: Accelerator) -> TrainingSetup:
    """How this job trains, as far as the memory model is concerned."""
    precision = {"no": "fp32", "bf16": "bf16_mixed", "fp16": "fp16_mixed"}[accelerator.mixed_precision]
    return TrainingSetup(
        precision=precision, micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
        activation_checkpointing=cfg.target.activation_checkpointing if cfg.target else False,
        zero_stage=zero_stage(accelerator) or 0, num_gpus=accelerator.num_processes,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def fit_target(cfg: RunConfig, accelerator: Accelerator, model, scores: Scores | None) -> BudgetResult:
    """The least pruned plan that trains within `target.budget` (placeholder scores: a shape-only dry run)."""
    p = cfg.prune
    base = earlycrop.SelectionConfig(p.heads if cfg.target.search == "mlp" else 0.0,
                                     p.mlp if cfg.target.search == "heads" else 0.0, p.layout, p.round_to, p.gqa)
    return fit_to_budget(model, scores, base, training_setup(cfg, accelerator), cfg.target.budget,
                         search=cfg.target.search, headroom=cfg.target.headroom)


def target_report(cfg: RunConfig, accelerator: Accelerator, dense_model, plan: earlycrop.Plan) -> BudgetReport | None:
    """Dense vs pruned parameters, FLOPs, memory per GPU and fewest GPUs per ZeRO stage (printed and logged)."""
    if cfg.target is None:
        return None
    budget = Budget.parse(cfg.target.budget)
    report = budget_report(dense_model, plan, training_setup(cfg, accelerator), budget.gpu_bytes, headroom=cfg.target.headroom)
    accelerator.print(report.format())
    return report


def measured_tokens_per_s(model, batch: dict[str, torch.Tensor], repeats: int = 2) -> float | None:
    """Forward+backward throughput on one calibration batch; None when the model does not fit."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.train()
    try:
        model(**batch).loss.backward()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(**batch).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return repeats * batch["input_ids"].numel() / (time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_selection(model, selection: earlycrop.SelectionConfig) -> earlycrop.Plan:
    """Run selection on placeholder scores so impossible ratios fail before any scoring work."""
    layers = earlycrop.get_adapter(model).layers(model)
    placeholder = Scores(heads=[torch.zeros(l.num_heads) for l in layers], neurons=[torch.zeros(l.intermediate_size) for l in layers])
    return earlycrop.make_plan(model, placeholder, selection)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def attaches_new_head(cfg: RunConfig) -> bool:
    """Whether the run puts a NEW, randomly initialised task head on a pretrained model."""
    return (cfg.model.name_or_path is not None and cfg.model.task == "sequence_classification"
            and not saved_as_classifier(cfg.model.name_or_path))


def scoring_criterion(cfg: RunConfig) -> str:
    """`prune.criterion` resolved: `auto` is earlycrop, except for a pretrained model with a new head, where
    magnitude kept the most of the pretrained model in benchmarks/encoder_quality.py."""
    if cfg.prune.criterion != "auto":
        return cfg.prune.criterion
    return "magnitude" if attaches_new_head(cfg) else "earlycrop"


def scoring_objective(cfg: RunConfig) -> str:
    """`prune.objective` resolved: `auto` scores a pretrained model that got a new task head through the
    checkpoint's own pre-training head (benchmarks/encoder_quality.py measured why), anything else with its task loss."""
    if cfg.prune.objective != "auto":
        return cfg.prune.objective
    return "pretraining" if attaches_new_head(cfg) and has_pretraining_head(cfg.model.name_or_path) else "task"


def pretraining_scorer(cfg: RunConfig, model, calibration, tokenizer) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The checkpoint's pre-training model carrying `model`'s current encoder weights, and the calibration
    text as pre-training batches (statically masked for a masked LM, shifted-token labels for a causal LM)."""
    scorer = load_pretraining_model(cfg.model.name_or_path, cfg.model).to(next(model.parameters()).device)
    missing, _ = scorer.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"the task model's encoder does not match the checkpoint's pre-training model (missing {missing[:3]})")
    ours = [(l.num_heads, l.intermediate_size) for l in earlycrop.get_adapter(model).layers(model)]
    theirs = [(l.num_heads, l.intermediate_size) for l in earlycrop.get_adapter(scorer).layers(scorer)]
    if ours != theirs:
        raise ValueError(f"the checkpoint's pre-training model has other units ({theirs}) than the task model ({ours})")
    batches = []
    for i, batch in enumerate(calibration):
        text = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        if type(scorer).__name__.endswith("ForMaskedLM"):
            batches.append(data_lib.mask_for_mlm(text, tokenizer, cfg.data.mlm_probability, cfg.seed + 1000 + i))
        else:
            labels = text["input_ids"].masked_fill(text.get("attention_mask", torch.ones_like(text["input_ids"])) == 0, -100)
            batches.append({**text, "labels": labels})
    return scorer, batches


def score_and_plan(cfg: RunConfig, accelerator: Accelerator, model, prepared: Prepared, out: Path, reuse: bool) -> tuple[Scores, earlycrop.Plan]:
    """Scores over all ranks' shards (or the saved ones when resuming), then the plan every rank agrees on."""
    scores_path = out / SCORES_FILE
    objective = scoring_objective(cfg)
    criterion_name = scoring_criterion(cfg)
    provenance = {"criterion": criterion_name, "hvp": cfg.prune.hvp, "fd_step": str(cfg.prune.fd_step),
                  "seed": str(cfg.seed), "source": cfg.data.source, "calibration_batches": str(cfg.prune.calibration_batches),
                  "calibration_batch_size": str(cfg.prune.calibration_batch_size), "seq_len": str(cfg.data.seq_len),
                  "objective": objective, "head_warmup_steps": str(cfg.train.head_warmup_steps)}
    if reuse and scores_path.is_file() and _metadata(scores_path) == provenance:
        scores = Scores.from_tensors(load_file(scores_path))
        accelerator.print(f"reusing scores from {scores_path}")
    else:
        criterion = earlycrop.make_criterion(criterion_name, hvp=cfg.prune.hvp, fd_step=cfg.prune.fd_step, seed=cfg.seed)
        scorer, calibration = model, prepared.calibration
        if objective == "pretraining" and criterion.uses_data:
            scorer, calibration = pretraining_scorer(cfg, model, calibration, prepared.tokenizer)
            accelerator.print(f"scoring through the checkpoint's pre-training head ({type(scorer).__name__})")
        scores = score_sharded(scorer, criterion, calibration, progress=accelerator.is_main_process)
        del scorer
        if accelerator.is_main_process:
            tmp = scores_path.with_suffix(".tmp")
            save_file(scores.to_tensors(), tmp, metadata=provenance)
            os.replace(tmp, scores_path)
    if cfg.target is None:
        plan = earlycrop.make_plan(model, scores, selection_config(cfg), meta={"criterion": criterion_name, "objective": objective})
    else:
        fitted = fit_target(cfg, accelerator, model, scores)
        plan = fitted.plan
        plan.meta.update(criterion=criterion_name, objective=objective, target=cfg.target.budget)
        accelerator.print(fitted.summary())
    ties = plan.meta.get("ties") or {}
    if any(ties.values()):
        accelerator.print(f"note: {ties.get('heads', 0)} head units and {ties.get('neurons', 0)} neurons scored equal across "
                          "the cut; the lowest indices were kept (the criterion did not tell them apart)")
    check_same_on_all_ranks(plan.to_json(), "pruning plan")
    if accelerator.is_main_process:
        plan.save(out / PLAN_FILE)
    return scores, plan


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Run the whole job; returns the final metrics (on every rank)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    timer = StageTimer()
    stage = zero_stage(accelerator)
    if stage == 3 and cfg.prune.prune_at not in (0, "never"):
        raise ValueError("prune_at > 0 under DeepSpeed ZeRO-3 is not supported (parameters are partitioned): use prune_at: 0 or ZeRO-1/2")
    if stage == 0 and cfg.prune.prune_at not in (0, "never"):
        raise ValueError("prune_at > 0 under DeepSpeed needs ZeRO stage 1 or 2 (or plain DDP); stage 0 is not supported")

    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        accelerator.print(f"--resume: no complete checkpoint in {out}/checkpoints, starting from scratch")
    state = load_trainer_state(checkpoint) if checkpoint else TrainerState()
    run_info_path = out / "run_info.json"
    run_id = json.loads(run_info_path.read_text()).get("run_id") if checkpoint and run_info_path.is_file() else None

    with timer("data"):
        prepared = prepare_data(cfg, accelerator)
    with whole_parameters(accelerator):
        tok = prepared.tokenizer
        model = build_model(cfg.model, len(tok), tok.pad_token_id, cfg.seed, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    check_tokenizer(model, prepared.tokenizer)
    check_labels(model, prepared)
    sparsity = 0.0
    if cfg.prune.prune_at != "never":
        # a dry run on placeholder scores: impossible ratios or budgets fail before any scoring
        dry_plan = check_selection(model, selection_config(cfg)) if cfg.target is None else fit_target(cfg, accelerator, model, None).plan
        dense = sum(p.numel() for p in model.parameters())
        sparsity = 1.0 - earlycrop.params_after(model, dry_plan) / dense

    tracker = create_tracker(
        is_main_process=accelerator.is_main_process, output_dir=out, tracking_uri=cfg.tracking_uri,
        experiment=cfg.experiment, run_name=cfg.run_name, enabled=cfg.tracking,
        fallback_to_local=cfg.tracking_fallback_local, run_id=run_id,
        tags={**({"criterion": scoring_criterion(cfg), "heads": cfg.prune.heads, "mlp": cfg.prune.mlp, "layout": cfg.prune.layout}
                 if cfg.prune.prune_at != "never" else {}),  # a dense run is not tagged with a criterion it never used
              "prune_at": cfg.prune.prune_at, "git_revision": git_revision(),
              "family": earlycrop.get_adapter(model).name, "world_size": accelerator.num_processes},
    )
    try:
        if accelerator.is_main_process:
            run_info_path.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}))
        if run_id is None:
            tracker.log_params(flatten_config(cfg.model_dump()))
        dense_params = sum(p.numel() for p in model.parameters())
        tracker.log_metrics({"params_dense": float(dense_params)}, step=0)
        result = _run_stages(cfg, accelerator, model, prepared, tracker, timer, state, checkpoint, out, dense_params, resume, sparsity)
    except BaseException:
        tracker.close(status="FAILED")
        raise
    tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _log_plan(tracker, scores: Scores, plan: earlycrop.Plan, result: earlycrop.PruneResult, out: Path, step: int,
              report: BudgetReport | None = None) -> None:
    counts = plan.counts()
    if report is not None:
        tracker.log_metrics({f"budget.{k}": float(v) for k, v in report.to_dict().items()}, step=step)
        tracker.log_dict({"report": report.format()}, "budget_report.json")
    tracker.log_metrics({"params_pruned": float(result.params_after), "prune_step": float(step)}, step=step)
    tracker.log_dict(plan.to_dict(), "plan.json")
    tracker.log_artifact(out / SCORES_FILE, "scores")
    tracker.set_tags({"plain_loadable": result.plain_loadable})
    tracker.log_figure(plot_kept_units(counts["heads"], plan.dense_heads, counts["neurons"], plan.dense_neurons), "kept_units.png")
    tracker.log_figure(plot_scores([h.tolist() for h in scores.heads], [n.tolist() for n in scores.neurons]), "scores.png")


def _adam_from_deepspeed(cfg: RunConfig, module, step: int) -> torch.optim.AdamW:
    """A plain AdamW holding the engine's full fp32 weights and moments (ZeRO-1/2 partitions gathered),
    so surgery can slice them like any torch optimizer's state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    for p in module.parameters():
        master = safe_get_full_fp32_param(p)
        if master is None:
            continue
        state = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
        with torch.no_grad():
            p.copy_(master.to(p.dtype))
        optimizer.state[p] = {"step": torch.tensor(float(step)), "master": master.clone(),
                              **{k: v.clone() for k, v in state.items() if v is not None}}
    return optimizer


def _adam_into_deepspeed(engine, module, sliced: dict) -> None:
    """Give a freshly built ZeRO-1/2 engine the sliced moments, so training continues without a restart."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    base = zero.optimizer
    for flat in zero.single_partition_of_fp32_groups:
        step = next(iter(sliced.values()))["step"].clone() if sliced else torch.tensor(0.0)
        base.state[flat] = {"step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    zero._lazy_init_hp_params_optimizer_state()
    for p in module.parameters():
        if p in sliced and "master" in sliced[p]:
            safe_set_full_fp32_param(p, sliced[p]["master"].to(p.device, torch.float32))
        for key in ("exp_avg", "exp_avg_sq"):
            if p in sliced and key in sliced[p]:
                safe_set_full_optimizer_state(p, sliced[p][key].to(p.device, torch.float32), key)


def warm_up_new_head(cfg: RunConfig, accelerator: Accelerator, model, prepared: Prepared, tracker) -> None:
    """Train only the parameters the checkpoint lacks (a new task head), the encoder frozen, for
    `train.head_warmup_steps` steps. Every rank runs the same steps on the same batches, so the head
    (and the scores computed after it) is identical on every rank without communication."""
    new = new_parameter_names(model, cfg.model.name_or_path)
    if not new:
        raise ValueError(f"train.head_warmup_steps: {cfg.model.name_or_path} already holds every parameter of the model "
                         "(no new head to warm up); set train.head_warmup_steps=0")
    model.to(accelerator.device)
    params = [p for n, p in model.named_parameters() if n in new]
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in new)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sampler = BlockSampler(prepared.train_blocks, cfg.train.micro_batch_size, 0, 1, cfg.seed + 1)
    model.train()
    losses = []
    for step in range(cfg.train.head_warmup_steps):
        batch = {k: v.to(accelerator.device) for k, v in sampler(step).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])
    tracker.log_metrics({"head_warmup_loss_first": losses[0], "head_warmup_loss_last": losses[-1]}, step=0)
    accelerator.print(f"warmed up the new head ({len(params)} tensors, {cfg.train.head_warmup_steps} steps): "
                      f"loss {losses[0]:.4f} → {losses[-1]:.4f}")


def _run_stages(cfg, accelerator, model, prepared, tracker, timer, state, checkpoint, out, dense_params, resume, sparsity) -> dict:
    p = cfg.prune
    stage = zero_stage(accelerator)
    plan: earlycrop.Plan | None = None
    if checkpoint is None and cfg.train.head_warmup_steps:
        with timer("head_warmup"):
            warm_up_new_head(cfg, accelerator, model, prepared, tracker)
    if checkpoint is not None and state.pruned_at is not None:
        # the checkpoint holds the pruned shape: rebuild it, then load_state fills the weights
        plan = earlycrop.Plan.load(out / PLAN_FILE)
        earlycrop.prune(model, plan)
    elif p.prune_at == 0:
        model.to(accelerator.device)  # score on the GPU when there is one
        with timer("score"):
            scores, plan = score_and_plan(cfg, accelerator, model, prepared, out, reuse=checkpoint is None and resume)
        report = target_report(cfg, accelerator, model, plan)
        dense_speed = measured_tokens_per_s(model, prepared.calibration[0]) if report else None
        with timer("prune"):
            result = earlycrop.prune(model, plan)
        if report:
            speeds = {"dense": dense_speed, "pruned": measured_tokens_per_s(model, prepared.calibration[0])}
            tracker.log_metrics({f"budget.{k}.tokens_per_s": v for k, v in speeds.items() if v}, step=0)
            accelerator.print("forward+backward tokens/s: " + ", ".join(
                f"{k} {v:,.0f}" if v else f"{k} does not fit" for k, v in speeds.items()))
        state.pruned_at = 0
        _log_plan(tracker, scores, plan, result, out, 0, report)
        accelerator.print(f"pruned before training: {dense_params:,} → {result.params_after:,} parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    rule = None
    if p.prune_at == "auto":
        # S = the fraction of parameters the plan removes; checkpointed so --resume keeps w_1 and the trace
        rule = WeightDistanceRule(p.auto_interval, p.auto_cap, min(sparsity, 0.99))
        accelerator.register_for_checkpointing(rule)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")

    def maybe_prune(step: int, model, optimizer):
        if state.pruned_at is not None or p.prune_at in (0, "never"):
            return model, optimizer, False
        unwrapped = accelerator.unwrap_model(model)
        if rule is not None:
            # d_e over all weights, as the paper's rule (DESIGN.md §2), not only the prunable ones
            due = step > 0 and rule.observe(step, list(unwrapped.parameters()))
            if rule.trace and step % p.auto_interval == 0:
                tracker.log_metrics({"auto_weight_distance": rule.trace[-1][1]}, step=step)
        else:
            due = step == p.prune_at
        if not due:
            return model, optimizer, False
        with timer("score"):
            scores, new_plan = score_and_plan(cfg, accelerator, unwrapped, prepared, out, reuse=resume)
        if stage is None:
            raw_optimizer = optimizer.optimizer
        else:
            raw_optimizer = _adam_from_deepspeed(cfg, unwrapped, step)
        report = target_report(cfg, accelerator, unwrapped, new_plan)
        accelerator.free_memory()
        with timer("prune"):
            result = earlycrop.prune(unwrapped, new_plan, raw_optimizer)
        if stage is None:
            model, optimizer = accelerator.prepare(unwrapped, raw_optimizer)
        else:
            sliced = {p: raw_optimizer.state.pop(p) for p in list(raw_optimizer.state)}
            model, optimizer = accelerator.prepare(unwrapped, raw_optimizer)
            _adam_into_deepspeed(model, unwrapped, sliced)
        _log_plan(tracker, scores, new_plan, result, out, step, report)
        if rule is not None:
            tracker.log_dict({"trace": rule.trace, "threshold": rule.threshold, "pruned_at": step}, "auto_schedule.json")
        accelerator.print(f"pruned at step {step}: {dense_params:,} → {result.params_after:,} parameters")
        return model, optimizer, True

    sampler = BlockSampler(prepared.train_blocks, cfg.train.micro_batch_size, accelerator.process_index, accelerator.num_processes, cfg.seed)
    loop = Loop(
        accelerator=accelerator, model=model, optimizer=optimizer, sampler=sampler, val_blocks=prepared.val_blocks,
        cfg=cfg.train, output_dir=out, restart_schedule=p.schedule_after_prune == "restart",
        log=lambda metrics, step: tracker.log_metrics(metrics, step=step), maybe_prune=maybe_prune,
    )
    start_metrics = {}
    if checkpoint is None:
        # the model training starts from (pruned at step 0, or dense): what the cut cost before any training
        with timer("eval"):
            start_metrics = evaluate(accelerator, model, prepared.val_blocks, cfg.train.micro_batch_size, cfg.train.eval_batches)
        tracker.log_metrics(start_metrics, step=0)
        state.history.append({"step": 0, **start_metrics})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with timer("train"):
        state = train(loop, state)
    model = loop.model
    finished = state.step >= cfg.train.max_steps
    with timer("eval"):
        final = evaluate(accelerator, model, prepared.val_blocks, cfg.train.micro_batch_size, cfg.train.eval_batches)
    tracker.log_metrics(final, step=state.step)
    unwrapped = accelerator.unwrap_model(model)
    final_params = sum(p.numel() for p in unwrapped.parameters())
    summary = {**final, **{f"{k}_at_start": v for k, v in start_metrics.items()}, "params_dense": dense_params, "params_final": final_params, "steps": state.step,
               "pruned_at": state.pruned_at, "finished": finished, **{f"time_{k}_s": v for k, v in timer.seconds.items()}}
    if torch.cuda.is_available():
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        import resource

        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracker.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=state.step)
    if finished:
        with timer("save"):
            state_dict = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                final_dir = out / "model"
                unwrapped.save_pretrained(final_dir, state_dict=state_dict)
                prepared.tokenizer.save_pretrained(final_dir)
                tracker.log_model_dir(final_dir, "model")
        history = [h for h in state.history if "train_loss" in h]
        evals = [h for h in state.history if "val_loss" in h]
        tracker.log_figure(plot_loss_curves({"train": [(h["step"], h["train_loss"]) for h in history],
                                             "validation": [(h["step"], h["val_loss"]) for h in evals]}), "loss_curves.png")
        if accelerator.is_main_process:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
