"""`earlycrop plan --score`: can this dense model be SCORED on these GPUs, before any pruning? Per engine (one
process, DDP, ZeRO-3 as pipeline/sharded.py partitions it) the per-rank peak from
`earlycrop.memory.estimate_scoring_memory`, whether it fits with the planner's headroom, and the command that scores
it. Shape only, like the rest of `earlycrop plan`:

    earlycrop plan --model llama3-8b --budget "24GB x 8" --score --batches 8 --batch-size 1 --seq-len 256
"""

from __future__ import annotations

import argparse

from .arguments import positive

ENGINE_NAMES = {"one": "one process", "ddp": "DDP", "zero3": "ZeRO-3"}
COMMANDS = {
    "one": "earlycrop prune",
    "ddp": "torchrun --nproc_per_node {n} -m launch.cli prune",
    "zero3": "accelerate launch --config_file launch/accelerate/zero3.yaml --num_processes {n} -m launch.cli prune",
}


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    """The scoring question's flags; the calibration defaults are `earlycrop prune`'s (--seq-len is shared with
    the training plan and documented there)."""
    from earlycrop.memory import CRITERION_PASSES, SCORE_DTYPES
    from pipeline.config import PruneCommandConfig

    prune = PruneCommandConfig.model_fields
    g = parser.add_argument_group("scoring (--score)")
    g.add_argument("--score", action="store_true",
                   help="answer whether the dense model can be scored on the budget's GPUs, per engine (one process, "
                        "DDP, ZeRO-3), instead of planning training")
    g.add_argument("--criterion", choices=list(CRITERION_PASSES), default="earlycrop",
                   help="the criterion that scores (default: %(default)s)")
    g.add_argument("--hvp", choices=("finite_difference", "exact"), default="finite_difference",
                   help="how earlycrop / grasp compute H·g: only finite_difference is modelled, and ZeRO-3 refuses "
                        "exact (default: %(default)s)")
    g.add_argument("--score-dtype", choices=list(SCORE_DTYPES), default="float32",
                   help="the weights' dtype while scoring; g stays float32 (default: %(default)s)")
    g.add_argument("--batches", type=positive, default=prune["batches"].default,
                   help="calibration batches, sharded over the ranks: DDP needs one per rank, ZeRO-3 a multiple of "
                        "the ranks; memory does not depend on it (default: %(default)s)")
    g.add_argument("--batch-size", type=positive, default=prune["batch_size"].default,
                   help="sequences per calibration batch, the unit of every forward (default: %(default)s)")


def score_seq_len(args: argparse.Namespace) -> int:
    """Tokens per calibration sequence: --seq-len, else `earlycrop prune`'s default."""
    from pipeline.config import PruneCommandConfig

    return args.seq_len or PruneCommandConfig.model_fields["seq_len"].default


def run_score_plan(args: argparse.Namespace, budget, headroom: float, shape) -> int:
    """Print, per engine, the per-rank scoring peak on the budget's GPUs and whether it fits; 0, or ValueError."""
    from earlycrop.memory import ScoringSetup, format_bytes, min_scoring_gpus

    if budget.kind != "memory":
        raise ValueError(f"--score answers for GPUs: give a GPU budget such as '24GB x 8', not {budget}")
    n, usable = budget.num_gpus, budget.limit * (1.0 - headroom)
    attention = args.attention or "eager"
    base = dict(criterion=args.criterion, hvp=args.hvp, dtype=args.score_dtype, batch_size=args.batch_size,
                seq_len=score_seq_len(args), attention=attention)
    print(f"earlycrop plan --score: {args.model or args.config}, budget {budget} ({format_bytes(budget.limit)} per GPU "
          f"on {n} GPU(s); {headroom:.0%} kept free: {format_bytes(usable)} usable)")
    source = "--attention" if args.attention else "earlycrop prune and ZeRO-3 scoring load the model with it"
    print(f"scoring: {args.criterion}" + (f", hvp {args.hvp}" if args.criterion in ("earlycrop", "grasp") else "")
          + f", {args.score_dtype} weights, {args.batches} calibration batch(es) of {args.batch_size} × "
          f"{base['seq_len']} tokens, {attention} attention ({source}); {shape.num_params():,} parameters")
    engines = [("one", 1)] + ([("ddp", n), ("zero3", n)] if n > 1 else [])
    estimated = _print_rows(shape, engines, base, args.batches, usable)
    try:
        fewest = min_scoring_gpus(shape, ScoringSetup(**base, engine="zero3", num_gpus=n), budget.limit,
                                  headroom=headroom)
        print(f"ZeRO-3 scoring fits on {fewest} or more GPUs of this size (--batches a multiple of them)" if fewest else
              "ZeRO-3 scoring does not fit even on 1024 GPUs of this size: activations and one gathered layer stay "
              "whole on every rank")
    except ValueError:
        pass  # the rows above said why ZeRO-3 cannot score with these settings
    print("per rank: the tensors scoring holds at its peak; the headroom covers the CUDA context and communication "
          "buffers")
    if any(engine == "zero3" for engine, _, _ in estimated):
        _print_zero3_note()
    if estimated:
        _print_command(args, [(engine, ranks) for engine, ranks, fits in estimated if fits], base)
    return 0


def _print_rows(shape, engines: list[tuple[str, int]], base: dict, batches: int,
                usable: float) -> list[tuple[str, int, bool]]:
    """The per-engine table; returns (engine, ranks, fits) for every engine it could estimate."""
    from earlycrop.memory import ScoringEstimate, ScoringSetup, estimate_scoring_memory, format_bytes

    parts = ScoringEstimate.PARTS
    labels = {engine: f"{ENGINE_NAMES[engine]}" + (f", {ranks} ranks" if ranks > 1 else "") for engine, ranks in engines}
    width = max(len(label) for label in labels.values()) + 2
    print("".ljust(width) + "".join(h.rjust(13) for h in ("per rank", *parts, "fits")))
    estimated = []
    for engine, ranks in engines:
        try:
            _check_batches(engine, ranks, batches)
            est = estimate_scoring_memory(shape, ScoringSetup(**base, engine=engine, num_gpus=ranks))
        except ValueError as exc:
            print(labels[engine].ljust(width) + f"no estimate: {exc}")
            continue
        fits = est.total <= usable
        estimated.append((engine, ranks, fits))
        values = [format_bytes(v) for v in (est.total, *(getattr(est, part) for part in parts))]
        print(labels[engine].ljust(width) + "".join(v.rjust(13) for v in values) + ("yes" if fits else "no").rjust(13))
    return estimated


def _print_zero3_note() -> None:
    """What the estimate leaves out on CPU ranks (benchmarks/records/partitioned.notes.md, the `+mmap` rows)."""
    print("on CPU ranks glibc keeps the freed ZeRO-3 gather buffers resident (measured 0.5-1.3x the weights beyond "
          "these terms); with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 ranks measured within 1.5% of "
          "them (benchmarks/RESULTS.md, 'Scoring with partitioned parameters')")


def _check_batches(engine: str, ranks: int, batches: int) -> None:
    """`earlycrop prune`'s rules for sharding the calibration batches over the ranks."""
    if engine == "ddp" and batches < ranks:
        raise ValueError(f"{batches} calibration batches for {ranks} ranks: every rank needs one (--batches {ranks})")
    if engine == "zero3" and batches % ranks:
        raise ValueError(f"{batches} calibration batches do not divide evenly over {ranks} ranks (every rank runs "
                         "the same passes): use a multiple of the ranks")


def _print_command(args: argparse.Namespace, fitting: list[tuple[str, int]], base: dict) -> None:
    """The command that scores and prunes with the first engine that fits (fewest processes first)."""
    if not fitting:
        print("no engine fits these GPUs: more or larger GPUs, or a smaller calibration batch / sequence")
        return
    engine, ranks = fitting[0]
    if args.score_dtype != "float32":
        print(f"fits with {ENGINE_NAMES[engine]}; earlycrop prune scores float32 weights: score {args.score_dtype} "
              "weights with the library (earlycrop.score_units, pipeline.sharded.load_partitioned(dtype=...))")
        return
    hvp = f" --hvp {args.hvp}" if args.criterion in ("earlycrop", "grasp") else ""
    print(f"score with: {COMMANDS[engine].format(n=ranks)} --model {args.model or 'DIR'} --criterion {args.criterion}"
          f"{hvp} --batches {args.batches} --batch-size {args.batch_size} --seq-len {base['seq_len']} --data ... "
          "--out ...")
