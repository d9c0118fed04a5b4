"""Shared by the sweep scripts (quality.py, transfer_quality.py, encoder_quality.py): one forked child per run,
its record appended to a JSONL records file, its traceback to `<out>/failures.log`; and the report flags.

The three scripts used to carry their own copies of this plumbing; it lives here so that the resume / failure
behaviour of every sweep stays the same. A forked child keeps a crash from ending the sweep and makes the peak RSS
the run's own.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable


def load_results(path: Path) -> list[dict]:
    """The records of a JSONL records file, one per finished run ([] when there is none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _logged(out: str, label: str, target: Callable, *args) -> None:
    """In the forked child: run target(*args); on any exception append the traceback to failures.log, re-raise."""
    try:
        target(*args)
    except BaseException:
        with (Path(out) / "failures.log").open("a") as f:
            f.write(f"--- {label} {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n")
        raise


def run_forked_step(out: Path, label: str, target: Callable, *args) -> int:
    """Run target(*args) in a forked child, a failure logged to `<out>/failures.log` under `label`; the exit code."""
    proc = mp.get_context("fork").Process(target=_logged, args=(str(out), label, target, *args))
    proc.start()
    proc.join()
    return proc.exitcode


def run_forked(out: Path, records: Path, key: str, target: Callable, *args, failed_note: str = "",
               enrich: Callable[[dict], None] | None = None) -> dict | None:
    """One sweep run: remove `<out>/runs/<key>` (a half-finished run starts over), run
    target(*args, result_path) in a forked child that writes its JSON record to result_path, then append the
    record to `records` and return it. `enrich(record)`, in this process, may add to the record
    before it is appended. On failure print the FAILED line (`failed_note` appended) and return None.
    The append holds an exclusive lock, so several sweep processes (one per core) can share one records file."""
    shutil.rmtree(out / "runs" / key, ignore_errors=True)
    result_path = out / f".{key}.result.json"
    result_path.unlink(missing_ok=True)
    exitcode = run_forked_step(out, key, target, *args, str(result_path))
    if exitcode != 0 or not result_path.is_file():
        print(f"    FAILED (exit {exitcode}); see {out / 'failures.log'}{failed_note}", flush=True)
        return None
    record = json.loads(result_path.read_text())
    result_path.unlink()
    if enrich is not None:
        enrich(record)
    records.parent.mkdir(parents=True, exist_ok=True)
    with records.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    return record


def add_report_args(ap: argparse.ArgumentParser, root: Path) -> None:
    """--records / --report / --results / --plots / --extra, the same in every sweep script."""
    ap.add_argument("--records", default=None,
                    help="JSONL file of finished runs (default benchmarks/records/<sweep>.jsonl, committed with the "
                         "report so the numbers outlive the machine; <out>/results.jsonl with --quick)")
    ap.add_argument("--report", action="store_true", help="write the RESULTS.md section from the records file")
    ap.add_argument("--results", default=str(root / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--plots", default=str(root / "benchmarks" / "plots"))
    ap.add_argument("--extra", default=None, help="a markdown file appended to the section (hand-written notes)")


def metric_histories(run_dir: Path, names: tuple[str, ...]) -> dict[str, list[tuple[int, float, float]]]:
    """For each metric of the pipeline run in `run_dir` (its run_info.json names the MLflow run), by its pipeline
    name (`val_loss`, logged to MLflow as `val/loss`): the points (step, value, seconds since the run started),
    one per step (runs before the MLflow sections logged the final evaluation twice)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import metric_name

    info = json.loads((run_dir / "run_info.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    start = client.get_run(info["run_id"]).info.start_time
    out = {}
    for name in names:
        history = client.get_metric_history(info["run_id"], metric_name(name))
        points = {m.step: (m.step, m.value, (m.timestamp - start) / 1000.0) for m in history}
        out[name] = sorted(points.values())
    return out


def plan_counts(run_dir: Path) -> dict | None:
    """Kept heads and neurons per layer (and the dense counts) of the run's plan.json; None for a dense run."""
    if not (run_dir / "plan.json").is_file():
        return None
    import earlycrop

    plan = earlycrop.Plan.load(run_dir / "plan.json")
    c = plan.counts()
    return {"heads": list(c["heads"]), "neurons": list(c["neurons"]), "dense_heads": list(plan.dense_heads),
            "dense_neurons": list(plan.dense_neurons), "objective": plan.meta.get("objective")}


def default_records(args: argparse.Namespace, root: Path, name: str) -> Path:
    """The records file: --records, else `<out>/results.jsonl` for a --quick smoke run (not worth keeping), else
    `benchmarks/records/<name>.jsonl`."""
    if args.records:
        return Path(args.records)
    return Path(args.out) / "results.jsonl" if args.quick else root / "benchmarks" / "records" / f"{name}.jsonl"


def shown(path: Path, root: Path) -> str:
    """`path` relative to the repository root when it is inside it (as a report prints it)."""
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)
