"""`earlycrop plan`: how much to prune so that training fits a budget, and what that buys. Shape only: no data, no
scoring, no weights read (the model is built on the meta device).

    earlycrop plan --config configs/llama_1b_8gpu_zero2.yaml --budget "24GB x 1" --micro-batch 1 --checkpointing
    earlycrop plan --model runs/quickstart/model --budget "params<=50M"
    earlycrop plan --model llama3-8b --budget "24GB x 8" --score     # can it be scored there? (launch/plan_score.py)

`run_plan` returns the exit code: 0, or 2 with one line `earlycrop plan: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .arguments import add_fields, fraction, positive
from .plan_score import add_score_flags, run_score_plan

EPILOG = """budgets:
  "24GB x 1", "80GiB × 8", "8 x 80GiB"   GPU memory per GPU × GPU count (GB = 10^9 bytes, GiB = 2^30)
  "params<=50M"                         parameter count (K, M, B/G, T)
  "flops<=2.5G"                         training FLOPs per token at --seq-len

Defaults come from --config (train.micro_batch_size, data.seq_len, train.mixed_precision, prune.layout /
gqa / round_to, model.attn_implementation) or, with --model, micro batch 1, seq len min(2048, the model's
positions) and config.json's attn_implementation, else sdpa. --headroom defaults to earlycrop.budget.DEFAULT_HEADROOM
(printed with the plan). Without --checkpointing, a dense model that fits once activations are checkpointed is
said first. One ratio is searched
for heads and MLP alike; --heads R (or --mlp R) fixes that ratio and searches the other one.
--layout global without scores assumes every layer equally important: the run's real scores will spread the
removal differently (the pipeline re-checks the budget with them)."""

PRECISIONS = ("fp32", "bf16", "bf16_mixed", "fp16_mixed")


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `plan` to an argparse sub-parser collection (`parser.add_subparsers(dest="command")`)."""
    p = subparsers.add_parser(
        "plan",
        help="how much to prune so that training fits a GPU / parameter / FLOP budget (shape only, no data)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local model folder (config.json; weights are not read)")
    src.add_argument("--config", help="YAML run config (see configs/): the model it builds and its training setup")
    p.add_argument("--budget", required=True, help='e.g. "24GB x 1", "80GiB × 8", "params<=50M", "flops<=2.5G"')
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: from the config's train.mixed_precision (bf16 → bf16_mixed), else bf16_mixed")
    p.add_argument("--optimizer", choices=("adamw", "sgd", "adafactor"), default="adamw")
    p.add_argument("--micro-batch", type=positive, default=None, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=positive, default=None,
                   help="tokens per sequence; default: the config's data.seq_len, else min(2048, the model's "
                        "positions); with --score: earlycrop prune's calibration default (128)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage (0: DDP)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--attention", choices=("eager", "sdpa", "flash"), default=None,
                   help="attention kernel of the training run: eager keeps every head's T×T probabilities, sdpa and "
                        "flash do not; default: the config's attn_implementation, else sdpa (transformers' default); "
                        "with --score: eager, what earlycrop prune and ZeRO-3 scoring load")
    # the selection flags are SelectionSettings' fields (declared once, shared with the run config and prune)
    from pipeline.config import SelectionSettings

    add_fields(p, SelectionSettings, ["layout", "gqa", "round_to"], defaults=dict.fromkeys(("layout", "gqa", "round_to")),
               parsers={"round_to": positive}, notes={"layout": "default: the config's, else uniform",
                                                       "gqa": "default: the config's, else per_group"})
    fixed = p.add_mutually_exclusive_group()
    add_fields(fixed, SelectionSettings, ["heads", "mlp"], defaults={"heads": None, "mlp": None},
               parsers={"heads": fraction, "mlp": fraction},
               notes={"heads": "fix it and search the MLP", "mlp": "fix it and search the heads"})
    p.add_argument("--headroom", type=float, default=None,
                   help="fraction of every GPU kept free for what the memory model leaves out (CUDA context, "
                        "fragmentation, communication buffers); default earlycrop.budget.DEFAULT_HEADROOM, printed "
                        "with the plan")
    p.add_argument("--gpu-memory", default=None,
                   help="GPU size for the fewest-GPUs rows with a params / flops budget (e.g. 80GiB)")
    p.add_argument("--allow-unsaveable", action="store_true",
                   help="also accept plans whose pruned config transformers refuses (e.g. heads not dividing hidden)")
    add_score_flags(p)
    p.set_defaults(command="plan")
    return p


def _load(args: argparse.Namespace):
    """(ModelShape, the transformers config that checks plans can be saved, defaults from the run config or
    config.json). A plain Llama / Qwen2 / Mistral config.json is read as JSON (no torch or transformers: the config
    is then None, since such a config describes every cut transformers accepts, `describe_layout` writing the head
    count only where it divides hidden_size); anything else is built on the meta device to read its shape."""
    if args.config:
        return _load_run_config(args.config)
    from earlycrop.memory import shape_from_config

    path = Path(args.model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{args.model} is not a model folder: config.json is missing")
    saved = json.loads(path.read_text())
    defaults: dict = {"positions": _max_positions(saved)}
    for key in ("attn_implementation", "_attn_implementation"):
        if saved.get(key):
            defaults["attention"] = (saved[key], f"config.json's {key}")
            break
    shape = shape_from_config(saved)
    if shape is not None:
        return shape, None, defaults
    from earlycrop.budget import model_shape, model_skeleton

    model = model_skeleton(args.model)
    return model_shape(model), model.config, defaults


def _load_run_config(path: str):
    """`_load` for a YAML run config: the model it builds, on the meta device, and the run's training settings."""
    import torch

    from earlycrop.budget import model_shape, model_skeleton
    from pipeline.config import load_config
    from pipeline.modeling import build_model

    cfg = load_config(path)
    if cfg.model.name_or_path is not None:
        model = model_skeleton(cfg.model.name_or_path, task=cfg.model.task, num_labels=cfg.model.num_labels)
    else:
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.data.vocab_size, None, cfg.seed)
    mixed = cfg.train.mixed_precision
    precision = {"bf16": "bf16_mixed", "fp16": "fp16_mixed"}.get(mixed)
    if precision is None:
        precision = "bf16" if cfg.model.dtype == "bfloat16" else "fp32"
    p = cfg.prune
    defaults = dict(precision=precision, micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                    layout=p.layout, gqa=p.gqa, round_to=p.round_to,
                    attention=(cfg.model.attn_implementation, "the config's model.attn_implementation"))
    return model_shape(model), model.config, defaults


def _attention(args: argparse.Namespace, defaults: dict) -> tuple[str, str]:
    """(attention the memory model assumes, where that came from): the flag, the config's setting, else sdpa."""
    from earlycrop.memory import attention_kind

    if args.attention:
        return args.attention, "--attention"
    if "attention" in defaults:
        name, source = defaults["attention"]
        return attention_kind(name), f"{source} {name!r}"
    return "sdpa", "transformers' default"


def _check_saveable(args: argparse.Namespace, config) -> bool:
    """Whether the search checks plans against transformers' config validation: not with --allow-unsaveable, and
    not for a config read as JSON (`_load`: every plan of those families is saveable)."""
    return not args.allow_unsaveable and config is not None


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def run_plan(args: argparse.Namespace) -> int:
    """Print the budget search's ratios and the dense-vs-pruned report; 0 on success, 2 (one line on stderr) on any
    error, including a budget that cannot be met."""
    try:
        return _run(args)
    except BrokenPipeError:
        raise
    except (ValueError, FileNotFoundError, OSError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        print(f"earlycrop plan: error: {first}", file=sys.stderr)
        return 2


def _setup(args: argparse.Namespace, defaults: dict, budget, attention: str):
    """The training setup the plan is for: flags, else the run config's values, else the plan defaults."""
    from earlycrop.memory import TrainingSetup

    seq_len = args.seq_len or defaults.get("seq_len")
    if seq_len is None:
        positions = defaults.get("positions")
        seq_len = min(2048, positions) if positions else 2048
    return TrainingSetup(
        precision=args.precision or defaults.get("precision", "bf16_mixed"),
        optimizer=args.optimizer,
        micro_batch=args.micro_batch or defaults.get("micro_batch", 1),
        seq_len=seq_len,
        activation_checkpointing=args.checkpointing,
        zero_stage=args.zero_stage,
        num_gpus=budget.num_gpus,
        attention=attention,
    )


def _run(args: argparse.Namespace) -> int:
    from earlycrop.budget import DEFAULT_HEADROOM, Budget, budget_report, fit_to_budget
    from earlycrop.memory import estimate_memory, format_bytes
    from earlycrop.plans import SelectionConfig

    budget = Budget.parse(args.budget)  # before building anything: a typo fails fast
    headroom = DEFAULT_HEADROOM if args.headroom is None else args.headroom
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"--headroom {headroom}: the fraction kept free must be in [0, 1)")
    shape, config, d = _load(args)
    if args.score:
        return run_score_plan(args, budget, headroom, shape)
    attention, attention_source = _attention(args, d)
    setup = _setup(args, d, budget, attention)
    search = "mlp" if args.heads is not None else "heads" if args.mlp is not None else "both"
    base = SelectionConfig(
        heads=args.heads or 0.0,
        mlp=args.mlp or 0.0,
        layout=args.layout or d.get("layout", "uniform"),
        round_to=args.round_to or d.get("round_to", 1),
        gqa=args.gqa or d.get("gqa", "per_group"),
    )
    # a dense model that fits once activations are checkpointed needs no pruning: say so before any cut
    checkpointed = None
    if budget.kind == "memory" and not args.checkpointing:
        need = estimate_memory(shape, replace(setup, activation_checkpointing=True)).total
        if need <= budget.limit * (1.0 - headroom):
            checkpointed = (f"no pruning needed with activation checkpointing ({format_bytes(need)} per GPU; "
                            "add --checkpointing)")
    gpu = budget.gpu_bytes if budget.kind == "memory" else args.gpu_memory
    try:
        result = fit_to_budget(shape, None, base, setup, budget, search=search, headroom=headroom,
                               require_saveable=_check_saveable(args, config), config=config)
    except ValueError as exc:
        if checkpointed is None:
            raise
        _print_header(args, budget, setup, headroom, attention_source, shape)
        print(f"{checkpointed}; without it no valid plan fits: {str(exc).splitlines()[0]}")
        print()
        dense = budget_report(shape, None, replace(setup, activation_checkpointing=True), gpu, headroom=headroom)
        print(dense.format())
        return 0
    _print_header(args, budget, setup, headroom, attention_source, shape)
    if result.ratio == 0 and search == "both":
        print(result.summary())
    else:
        if checkpointed is not None:
            print(f"{checkpointed}; without it, prune:")
        _print_plan(result, base, search, shape, config, setup, budget, headroom, args)
    report = budget_report(shape, result.plan if result.ratio > 0 or search != "both" else None, result.setup, gpu,
                           headroom=headroom)
    print()
    print(report.format())
    return 0


def _print_header(args, budget, setup, headroom: float, attention_source: str, shape) -> None:
    from earlycrop.memory import attention_kernel, format_bytes

    source = args.config or args.model
    line = f"earlycrop plan: {source}, budget {budget}"
    if budget.kind == "memory":
        line += (f" ({format_bytes(budget.limit)} per GPU on {budget.num_gpus} GPU(s), ZeRO-{setup.zero_stage}; "
                 f"{headroom:.0%} kept free: {format_bytes(budget.limit * (1.0 - headroom))} usable)")
    print(line)
    kept = {"eager": "every head's T×T attention probabilities kept for backward",
            "fused": "fused kernels, no T×T scores kept",
            "math": "SDPA's math fallback (CPU with attention dropout): T×T scores kept in fp32"}
    print(f"attention: {setup.attention} ({attention_source}; {kept[attention_kernel(shape, setup)]})")


def _print_plan(result, base, search, shape, config, setup, budget, headroom, args) -> None:
    from earlycrop.budget import format_measure

    c, plan = result.plan.counts(), result.plan
    print(f"fits with {result.summary()}")
    print(f"  per layer: {_per_layer(c, plan, base.layout)}")
    print(f"  use: prune.heads={result.heads:g} prune.mlp={result.mlp:g} prune.layout={base.layout} "
          f"prune.round_to={base.round_to} prune.gqa={base.gqa}")
    print(f"   or: earlycrop prune --heads {result.heads:g} --mlp {result.mlp:g} --layout {base.layout} "
          f"--round-to {base.round_to} --gqa {base.gqa} ...")
    if result.below is not None:
        print(f"  the next less pruned plan ({_per_layer(result.below['counts'], plan, base.layout)}) "
              f"would need {format_measure(budget.kind, result.below['value'])}")
    errors: dict[str, int] = {}
    for item in result.skipped_unsaveable:
        errors[item["error"]] = errors.get(item["error"], 0) + 1
    for error, n in errors.items():
        print(f"  skipped {n} plan(s) that fit but whose config transformers refuses: {error}")
    if search == "both":
        for other in _alternatives(shape, config, base, setup, budget, headroom, args, result):
            print(f"  also fits: {other.summary()}")


def _per_layer(counts: dict, plan, layout: str) -> str:
    text = (f"{counts['heads'][0]} of {plan.dense_heads[0]} heads, {counts['kv_heads'][0]} of {plan.dense_kv_heads[0]} "
            f"key/value heads, {counts['neurons'][0]} of {plan.dense_neurons[0]} MLP neurons")
    return text + (" in layer 0 (global layout: layers differ)" if layout == "global" else "")


def _alternatives(shape, config, base, setup, budget, headroom, args, result) -> list:
    """With one ratio for both kinds the coarse GQA / rounding steps of one kind can force the other to prune more
    than needed: also search each kind with the other fixed at the found ratio, and show what differs."""
    from earlycrop.budget import fit_to_budget

    out = []
    for search, fixed in (("mlp", {"heads": result.heads}), ("heads", {"mlp": result.mlp})):
        try:
            other = fit_to_budget(shape, None, replace(base, **fixed), setup, budget, search=search, headroom=headroom,
                                  require_saveable=_check_saveable(args, config), config=config)
        except ValueError:
            continue
        if other.plan.counts() != result.plan.counts():
            out.append(other)
    return out
