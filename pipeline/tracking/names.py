"""Names in MLflow: metric names in sections and run names that say what a run is.

The pipeline keeps its flat names (summary.json keys, the training log: `train_loss`, `time_score_s`);
MLflow gets `section/name` (`train/loss`, `time/score_s`), because its UI groups charts by the part
before the slash: the loss curves get a section of their own instead of sitting among one-off figures.
The tracker applies :func:`metric_name` to every metric it logs, so this is the one place that renames.

What the UI shows decided the sections (benchmarks/ui_check.py takes the screenshots): MLflow sorts sections by
name and puts `system/` metrics on their own tab, so the stage timings and peak memory go there and the Model
metrics tab reads params (dense, pruned, final), prune, then the train and val curves.
"""

from __future__ import annotations

# MLflow draws a metric whose latest step is 0 as a bar labelled with its value, any other as a line: a one-off
# figure (a time, a parameter count) logged at the step it was taken would be a lone dot on a ±0.5 axis
ONE_OFF_STEP = 0

# names that do not carry their section as a prefix
SECTION_OF = {
    "lr": "train/lr",
    "tokens": "train/tokens",
    "tokens_per_s": "train/tokens_per_s",
    "step_time_s": "train/step_time_s",
    "steps": "train/steps",
    "params_dense": "params/dense",
    "params_final": "params/final",
    "params_pruned": "params/pruned",
    "prune_step": "prune/step",
    "auto_weight_distance": "prune/auto_weight_distance",
    "peak_rss_bytes": "system/peak_rss_bytes",
    "peak_memory_bytes": "system/peak_memory_bytes",
}
# a prefix that names the section: `val_loss` -> `val/loss`, `budget.dense.params` -> `budget/dense.params`
SECTION_PREFIXES = (
    ("train_", "train/"),
    ("val_", "val/"),
    ("distill_", "distill/"),
    ("head_warmup_", "head_warmup/"),
    ("recovery_", "recovery/"),
    ("budget.", "budget/"),
    ("time_", "system/time_"),
    ("flops_", "flops/"),
    ("peak_memory_rank", "system/peak_memory_rank"),
)


def metric_name(name: str) -> str:
    """The MLflow name of a pipeline metric; a name with a section already, or an unknown one, is kept."""
    if "/" in name:
        return name
    if name in SECTION_OF:
        return SECTION_OF[name]
    for prefix, section in SECTION_PREFIXES:
        if name.startswith(prefix):
            return section + name[len(prefix) :]
    return name


def default_run_name(family: str, seed: int, *, criterion: str | None = None, heads: float = 0.0, mlp: float = 0.0,
                     layout: str = "uniform", prune_at: int | str = 0, budget: str | None = None) -> str:
    """What the run is, for a config without `run_name`: `llama-earlycrop-h50-m50-uniform-s0`, a dense run
    (no criterion) `llama-dense-s0`; a budget replaces the ratios, a cut after step 0 adds `-at100` or `-auto`."""
    if criterion is None:
        return f"{family}-dense-s{seed}"
    amount = budget.replace(" ", "") if budget else f"h{heads * 100:g}-m{mlp * 100:g}"
    when = "" if prune_at == 0 else "-auto" if prune_at == "auto" else f"-at{prune_at}"
    return f"{family}-{criterion}-{amount}-{layout}{when}-s{seed}"
