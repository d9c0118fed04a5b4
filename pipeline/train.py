"""The training loop: plain Accelerate (DDP or DeepSpeed), kept visible on purpose.

Batches are a pure function of the optimizer step (seeded permutation per epoch), and the
learning rate is a pure function of the step and the pruning step, so a run resumed from a
checkpoint continues exactly where the interrupted one was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator

from .config import TrainConfig
from .outputs import disk_errors, own_checkpoints, write_identity

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    pruned_at: int | None = None
    tokens: int = 0
    history: list[dict] = field(default_factory=list)


class BlockSampler:
    """Micro-batches of fixed-size blocks; the batch of a global micro-step is the same on any restart."""

    def __init__(self, blocks: dict[str, torch.Tensor], micro_batch: int, rank: int, world: int, seed: int):
        self.blocks, self.micro, self.rank, self.world, self.seed = blocks, micro_batch, rank, world, seed
        self.num_blocks = next(iter(blocks.values())).shape[0]
        self.per_epoch = self.num_blocks // (micro_batch * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"{self.num_blocks} training blocks are fewer than one global batch "
                f"({micro_batch} per rank × {world} ranks): use more text or a smaller micro_batch_size / seq_len"
            )

    def __call__(self, micro_step: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(micro_step, self.per_epoch)
        order = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        start = (pos * self.world + self.rank) * self.micro
        index = order[start : start + self.micro]
        return {k: v[index] for k, v in self.blocks.items()}


def learning_rate(cfg: TrainConfig, step: int, pruned_at: int | None, restart: bool) -> float:
    """LR at optimizer step `step`; with `restart`, a fresh one-cycle schedule from the pruning step."""
    if restart and pruned_at is not None and pruned_at > 0:
        span = max(1, cfg.max_steps - pruned_at)
        return _one_cycle(cfg.lr, step - pruned_at, span)
    if cfg.scheduler == "one_cycle":
        return _one_cycle(cfg.lr, step, cfg.max_steps)
    warm = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.scheduler == "constant" or step < cfg.warmup_steps:
        return warm
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _one_cycle(peak: float, step: int, span: int, pct_up: float = 0.25) -> float:
    up = max(1, int(span * pct_up))
    if step < up:
        return peak * (0.04 + 0.96 * (step + 1) / up)
    progress = (step - up) / max(1, span - up)
    return peak * (0.002 + 0.998 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, blocks: dict[str, torch.Tensor], micro_batch: int, max_batches: int) -> dict[str, float]:
    """Mean validation loss (and accuracy for classification) over the first `max_batches` × `micro_batch`
    examples, every one of them (a partial last batch included); batches go round-robin over the ranks, so
    1 and N ranks evaluate the same examples. Every rank runs the same number of forwards (a rank without a
    batch left repeats the first with weight 0), as partitioned parameters need all ranks in each forward."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = min(next(iter(blocks.values())).shape[0], max_batches * micro_batch)
    starts = list(range(0, n, micro_batch))
    was_training = model.training
    model.eval()
    device = accelerator.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·count, count, correct
    for round_ in range(math.ceil(len(starts) / world)):
        index = round_ * world + rank
        weight = 1.0 if index < len(starts) else 0.0
        start = starts[index] if index < len(starts) else 0
        batch = {k: v[start : min(start + micro_batch, n)].to(device) for k, v in blocks.items()}
        out = model(**batch)
        # token losses average over the labelled positions (all of them, or the masked ones for a masked LM)
        count = (batch["labels"] != -100).sum() if out.logits.dim() == 3 else batch["labels"].shape[0]
        totals[0] += weight * out.loss.double() * count
        totals[1] += weight * count
        if out.logits.dim() == 2:
            totals[2] += weight * (out.logits.argmax(-1) == batch["labels"]).sum()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    loss = float(totals[0] / totals[1])
    metrics = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    if out.logits.dim() == 2:
        metrics["val_accuracy"] = float(totals[2] / totals[1])
    return metrics


class StopSignal:
    """SIGTERM (preemption) asks the loop to checkpoint and exit cleanly at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class DeferredSigterm:
    """SIGTERM during a stage that must not be cut (the final evaluation and save) is noted and said, and
    the stage finishes; the caller then exits (`requested`) as a terminated process would, outputs complete."""

    def __init__(self, say: Callable[[str], None], stage: str):
        self.say, self.stage, self.requested = say, stage, False

    def __enter__(self) -> DeferredSigterm:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.say(f"SIGTERM during {self.stage}: finishing it first, then exiting")

    def __exit__(self, exc_type, exc, tb) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path, identity: dict[str, str] | None = None) -> Path | None:
    """Newest COMPLETE checkpoint (a kill while writing leaves only a `.tmp-` folder, never a step folder);
    with `identity`, only this run's own checkpoints count."""
    return (checkpoints(output_dir, identity) or [None])[-1]


def checkpoints(output_dir: Path, identity: dict[str, str] | None = None) -> list[Path]:
    """Complete checkpoints, oldest first: all of them, or those whose identity.json matches `identity`."""
    root = checkpoint_root(output_dir)
    if identity is not None:
        return [p for p in own_checkpoints(root, identity, CHECKPOINT_PREFIX) if (p / STATE_FILE).is_file()]
    return sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()) if root.is_dir() else []


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int,
                    identity: dict[str, str] | None = None, needed_bytes: int = 0) -> Path:
    """`save_state` into a temporary folder, then an atomic rename: complete or absent, never half. The
    run's identity goes into the checkpoint, and rotation deletes only checkpoints of this identity;
    a full disk is one line naming the folder and about `needed_bytes`."""
    root = checkpoint_root(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with disk_errors(root, needed_bytes):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
        if identity is not None:
            write_identity(tmp, identity)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir, identity)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


class Distiller(Protocol):
    """The training loss with a teacher: the task loss and distillation terms, each logged."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class PruneSchedule(Protocol):
    """Whether pruning is due before a step, and the cut itself (pipeline.pruning.Pruner)."""

    def due(self, step: int, model: torch.nn.Module, pruned_at: int | None) -> bool: ...

    def rule_metrics(self, step: int) -> dict[str, float]: ...

    def prune_in_training(self, model, optimizer, step: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]: ...


@dataclass
class Loop:
    """The pieces the loop needs. `pruner` (mid-training pruning) hands back a new model and optimizer;
    `distiller` replaces the model's own loss (from the cut on when the cut hands back a teacher);
    `on_prune` receives each cut for tracking."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BlockSampler
    val_blocks: dict[str, torch.Tensor]
    cfg: TrainConfig
    output_dir: Path
    restart_schedule: bool
    log: Callable[[dict[str, float], int], None]
    pruner: PruneSchedule | None = None
    on_prune: Callable[[object], None] = lambda event: None
    distiller: Distiller | None = None
    identity: dict[str, str] | None = None  # written into every checkpoint; rotation keeps to it
    # a cut after step 0 that hands back its dense model as teacher (event.teacher): the distiller from then on
    make_distiller: Callable[[object], Distiller] | None = None


def training_loss(loop: Loop, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's own loss, or the distiller's total with its terms."""
    if loop.distiller is None:
        return model(**batch).loss, {}
    return loop.distiller.loss(model, batch)


def train(loop: Loop, state: TrainerState) -> TrainerState:
    """Run optimizer steps `state.step` … `cfg.max_steps - 1`; checkpoint, evaluate, log, prune on the way."""
    acc, cfg = loop.accelerator, loop.cfg
    model, optimizer = loop.model, loop.optimizer
    stop = StopSignal()
    tokens_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    window = Window()
    progress = Progress(acc.is_main_process, state.step, cfg.max_steps)
    try:
        while state.step < cfg.max_steps:
            if loop.pruner is not None and state.pruned_at is None:
                due = loop.pruner.due(state.step, model, state.pruned_at)
                if metrics := loop.pruner.rule_metrics(state.step):
                    loop.log(metrics, state.step)
                if due:
                    model, optimizer, event = loop.pruner.prune_in_training(model, optimizer, state.step)
                    loop.model, loop.optimizer = model, optimizer  # nothing holds the engine the cut replaced
                    state.pruned_at = state.step
                    loop.on_prune(event)
                    if getattr(event, "teacher", None) is not None and loop.make_distiller is not None:
                        loop.distiller = loop.make_distiller(event.teacher)
                    window.restart()  # tokens/s measures training steps only
            set_lr(optimizer, learning_rate(cfg, state.step, state.pruned_at, loop.restart_schedule))
            model.train()
            step_loss = torch.zeros((), device=acc.device)
            for micro in range(cfg.gradient_accumulation_steps):
                batch = loop.sampler(state.step * cfg.gradient_accumulation_steps + micro)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(model):
                    loss, terms = training_loss(loop, model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss is {loss.item()} at step {state.step}: lower train.lr or check the data")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                step_loss += loss.detach() / cfg.gradient_accumulation_steps
                window.add_terms(terms, cfg.gradient_accumulation_steps)
                state.tokens += batch["input_ids"].numel() * acc.num_processes
            state.step += 1
            window.add(float(acc.reduce(step_loss, reduction="mean")))
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                metrics = {**window.metrics(tokens_per_step * batch["input_ids"].shape[1], acc),
                           "lr": optimizer.param_groups[0]["lr"], "tokens": float(state.tokens)}
                state.history.append({"step": state.step, **metrics})
                loop.log(metrics, state.step)
                progress.show(state.step, metrics)
                window.restart()
            progress.update(state.step)
            if state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
                metrics = evaluate(acc, model, loop.val_blocks, cfg.micro_batch_size, cfg.eval_batches)
                state.history.append({"step": state.step, **metrics})
                loop.log(metrics, state.step)
                window.restart()
            stopping = bool(acc.reduce(torch.tensor(float(stop.requested), device=acc.device), reduction="sum") > 0)
            if stopping or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(acc, loop.output_dir, state, cfg.keep_checkpoints, loop.identity,
                                needed_bytes=12 * sum(p.numel() for p in model.parameters()))  # fp32 weights + 2 moments
                window.restart()
            if stopping:
                acc.print(f"SIGTERM: checkpoint saved at step {state.step}; resume with --resume")
                break
    finally:
        stop.restore()
        progress.close()
    loop.model, loop.optimizer = model, optimizer
    return state


class Progress:
    """Rank 0's view of training: a tqdm bar (step, loss, tokens/s, ETA) on a terminal, and a plain log
    line per `log_every` when output goes to a file or a cluster log, as the field's trainers do."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled, self.total, self.begin, self.first = enabled, total, time.perf_counter(), start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}", refresh=False)
            return
        done = step - self.first
        eta = (time.perf_counter() - self.begin) / done * (self.total - step) if done else 0.0
        print(f"step {step}/{self.total}  loss {metrics['train_loss']:.4f}  tokens/s {metrics['tokens_per_s']:,.0f}  "
              f"eta {int(eta) // 60}m{int(eta) % 60:02d}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Window:
    """Training loss, distillation terms and throughput since the last log line."""

    def __init__(self) -> None:
        self.loss, self.steps, self.terms = 0.0, 0, {}
        self.restart()

    def restart(self) -> None:
        """Start timing anew: after evaluation, a checkpoint or a cut, so tokens/s counts training only."""
        self.start = time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss += loss
        self.steps += 1

    def add_terms(self, terms: dict[str, torch.Tensor], accumulation: int) -> None:
        for key, value in terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + float(value.detach()) / accumulation

    def metrics(self, tokens_per_step: int, acc: Accelerator) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        out = {"train_loss": self.loss / self.steps, "step_time_s": elapsed / self.steps,
               "tokens_per_s": self.steps * tokens_per_step / elapsed}
        # distillation terms are rank-local means; reduce them once per log line, not per step
        for key, value in sorted(self.terms.items()):
            out[f"distill_{key}"] = float(acc.reduce(torch.tensor(value / self.steps, device=acc.device), reduction="mean"))
        self.loss, self.steps, self.terms = 0.0, 0, {}
        return out
