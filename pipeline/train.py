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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import TrainConfig

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
    """Mean validation loss (and accuracy for classification) over the first `max_batches` batches in
    total (rounded down to a multiple of the world size), so 1 and N ranks evaluate the same blocks."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = next(iter(blocks.values())).shape[0]
    per_rank = min(max_batches, n // micro_batch) // world
    if per_rank == 0:
        raise ValueError(f"{n} validation blocks are fewer than one batch per rank ({micro_batch} × {world})")
    was_training = model.training
    model.eval()
    device = accelerator.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·count, count, correct
    for b in range(per_rank):
        start = (b * world + rank) * micro_batch
        batch = {k: v[start : start + micro_batch].to(device) for k, v in blocks.items()}
        out = model(**batch)
        # token losses average over the labelled positions (all of them, or the masked ones for a masked LM)
        count = (batch["labels"] != -100).sum() if out.logits.dim() == 3 else batch["labels"].shape[0]
        totals[0] += out.loss.double() * count
        totals[1] += count
        if out.logits.dim() == 2:
            totals[2] += (out.logits.argmax(-1) == batch["labels"]).sum()
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


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Newest COMPLETE checkpoint; a kill while writing leaves only a `.tmp-` folder, never a step folder."""
    root = checkpoint_root(output_dir)
    done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int) -> Path:
    """`save_state` into a temporary folder, then an atomic rename: complete or absent, never half."""
    root = checkpoint_root(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


@dataclass
class Loop:
    """The pieces the loop needs; `maybe_prune` may swap model/optimizer (it returns the new ones)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BlockSampler
    val_blocks: dict[str, torch.Tensor]
    cfg: TrainConfig
    output_dir: Path
    restart_schedule: bool
    log: Callable[[dict[str, float], int], None]
    maybe_prune: Callable[[int, torch.nn.Module, torch.optim.Optimizer], tuple[torch.nn.Module, torch.optim.Optimizer, bool]]


def train(loop: Loop, state: TrainerState) -> TrainerState:
    """Run optimizer steps `state.step` … `cfg.max_steps - 1`; checkpoint, evaluate, log, prune on the way."""
    acc, cfg = loop.accelerator, loop.cfg
    model, optimizer = loop.model, loop.optimizer
    stop = StopSignal()
    tokens_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    try:
        while state.step < cfg.max_steps:
            model, optimizer, pruned = loop.maybe_prune(state.step, model, optimizer)
            if pruned:
                state.pruned_at = state.step
                window_start = time.perf_counter()  # tokens/s measures training steps only
            set_lr(optimizer, learning_rate(cfg, state.step, state.pruned_at, loop.restart_schedule))
            model.train()
            step_loss = torch.zeros((), device=acc.device)
            for micro in range(cfg.gradient_accumulation_steps):
                batch = loop.sampler(state.step * cfg.gradient_accumulation_steps + micro)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(model):
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss is {loss.item()} at step {state.step}: lower train.lr or check the data")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                step_loss += loss.detach() / cfg.gradient_accumulation_steps
                state.tokens += batch["input_ids"].numel() * acc.num_processes
            state.step += 1
            window_steps += 1
            window_loss += float(acc.reduce(step_loss, reduction="mean"))
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                seq_len = batch["input_ids"].shape[1]
                metrics = {
                    "train_loss": window_loss / window_steps,
                    "lr": optimizer.param_groups[0]["lr"],
                    "step_time_s": elapsed / window_steps,
                    "tokens_per_s": window_steps * tokens_per_step * seq_len / elapsed,
                    "tokens": float(state.tokens),
                }
                state.history.append({"step": state.step, **metrics})
                loop.log(metrics, state.step)
                window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
            if state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
                metrics = evaluate(acc, model, loop.val_blocks, cfg.micro_batch_size, cfg.eval_batches)
                state.history.append({"step": state.step, **metrics})
                loop.log(metrics, state.step)
                window_start = time.perf_counter()
            stopping = bool(acc.reduce(torch.tensor(float(stop.requested), device=acc.device), reduction="sum") > 0)
            if stopping or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                save_checkpoint(acc, loop.output_dir, state, cfg.keep_checkpoints)
                window_start = time.perf_counter()
            if stopping:
                acc.print(f"SIGTERM: checkpoint saved at step {state.step}; resume with --resume")
                break
    finally:
        stop.restore()
    loop.model, loop.optimizer = model, optimizer
    return state
