"""`earlycrop` command line: `run` a configured job, `prune` a model you have, `plan` for a GPU budget,
`tracking replay` a tracking backlog.

Both work in one process, under `torchrun --nproc_per_node N` and under `accelerate launch`;
calibration batches are then sharded over the ranks and the scores all-reduced exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

LAUNCH_DIR = Path(__file__).parent / "accelerate"

EPILOG_RUN = """examples:
  accelerate launch --config_file launch/accelerate/cpu_2proc.yaml -m launch.cli run configs/quickstart.yaml
  torchrun --nproc_per_node 2 -m launch.cli run configs/quickstart.yaml output_dir=runs/mine train.max_steps=50
  earlycrop run configs/quickstart.yaml --print-commands     # the launch command for every launch config
"""

EPILOG_PRUNE = """GPT-2 and BERT derive head size from hidden size / heads, so a head cut cannot be described by
their config: such outputs load with earlycrop.from_pretrained(DIR), not plain transformers.
Llama / Qwen2 / Mistral with --layout uniform (and any MLP-only uniform cut) also load with plain
AutoModelFor....from_pretrained(DIR)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlycrop", description="Structured EarlyCroP pruning and training for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="score → prune → train → evaluate → save, tracked in MLflow", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="YAML experiment config (see configs/)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=/tmp/run train.lr=1e-3")
    run.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a previous run in output_dir (its checkpoints, model, plan, scores, summary)")
    run.add_argument("--print-commands", action="store_true", help="print the launch command for each config in launch/accelerate and exit")

    _add_prune_parser(sub)
    from .plan_cmd import add_plan_parser

    add_plan_parser(sub)
    _add_tracking_parser(sub)
    return parser


def _add_prune_parser(sub) -> None:
    """`earlycrop prune`: its flags are the fields of pipeline.config.PruneCommandConfig."""
    from pipeline.config import PruneCommandConfig

    from .arguments import HelpFormatter, add_fields, fraction

    prune = sub.add_parser("prune", help="prune a local Hugging Face model folder and save the result", epilog=EPILOG_PRUNE,
                           formatter_class=HelpFormatter)
    add_fields(prune, PruneCommandConfig, ["model", "data", "criterion", "heads", "mlp", "layout", "gqa", "round_to",
                                           "hvp", "fd_step", "batches", "batch_size", "seq_len", "text_field",
                                           "label_field", "objective", "score_dtype", "seed", "out", "overwrite"],
               defaults={"heads": 0.0, "mlp": 0.0}, parsers={"heads": fraction, "mlp": fraction})


def _add_tracking_parser(sub: argparse._SubParsersAction) -> None:
    """`earlycrop tracking replay`: a backlog kept during a tracking outage goes to the store later."""
    tracking = sub.add_parser("tracking", help="tracking utilities (replay a backlog kept during an outage)")
    commands = tracking.add_subparsers(dest="tracking_command", required=True)
    replay = commands.add_parser("replay", help="send a tracking_backlog.jsonl to an MLflow store")
    replay.add_argument("backlog", help="<output_dir>/tracking_backlog.jsonl")
    replay.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the backlog")
    replay.add_argument("--run-id", default=None, help="replay into this run instead")


def print_commands(config: str) -> None:
    for yaml_file in sorted(LAUNCH_DIR.glob("*.yaml")):
        print(f"# {yaml_file.stem}\naccelerate launch --config_file {yaml_file} -m launch.cli run {config}\n")
    print(f"# torchrun, N processes on this machine\ntorchrun --nproc_per_node N -m launch.cli run {config}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        from .plan_cmd import run_plan

        return run_plan(args)
    try:
        if args.command == "run":
            from pipeline.config import load_config

            cfg = load_config(args.config, args.overrides)
            if args.print_commands:
                print_commands(args.config)
                return 0
            from pipeline.run import run

            summary = run(cfg, resume=args.resume, overwrite=args.overwrite)
            if int(os.environ.get("RANK", "0")) == 0:
                print_run_summary(cfg, summary)
        elif args.command == "tracking":
            from pipeline.tracking import replay_backlog

            runs = replay_backlog(args.backlog, args.tracking_uri, run_id=args.run_id)
            print(f"replayed {args.backlog} into run(s): {', '.join(runs)}")
        else:
            from pydantic import ValidationError

            from pipeline.config import PruneCommandConfig, validation_message
            from pipeline.prune_job import prune_model

            from .arguments import fields_of

            try:
                command = PruneCommandConfig.model_validate(fields_of(args, PruneCommandConfig))
            except ValidationError as err:
                raise ValueError(validation_message(err, flags=True)) from None
            prune_model(command)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"earlycrop: error: {first}", file=sys.stderr)
        return 2
    return 0


def print_run_summary(cfg, summary: dict) -> None:
    """What the run reached, and a command (or address) that shows it in MLflow."""
    out = Path(cfg.output_dir)
    quality = f"accuracy {summary['val_accuracy']:.3f}" if "val_accuracy" in summary else f"perplexity {summary['val_perplexity']:.2f}"
    print(f"params {summary['params_dense']:,} → {summary['params_final']:,}; "
          f"val loss {summary['val_loss']:.4f} ({quality}) after {summary['steps']} steps")
    info = out / "run_info.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    if meta.get("run_id"):
        uri = meta["tracking_uri"]
        print(f"MLflow run {meta['run_id']} at {uri}")
        # the run's page, in the UI's model-training view (it opens in its GenAI view otherwise)
        page = (f"/#/experiments/{meta['experiment_id']}/runs/{meta['run_id']}?workflowType=machine_learning"
                if meta.get("experiment_id") else "")
        if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
            print(f"view it: open {uri.rstrip('/')}{page} in a browser")
        else:  # one worker starts in seconds; the default four each import mlflow
            print(f"view it: mlflow ui --host 127.0.0.1 --workers 1 --backend-store-uri {uri}")
            if page:
                print(f"then open http://127.0.0.1:5000{page}")


if __name__ == "__main__":
    sys.exit(main())
