"""Scoring a model no rank holds whole (issue 14): `earlycrop prune` on a random-init Llama, three ways, side by side.

- `one`: one process holding the whole model (`python -m launch.cli prune ...`);
- `ddp`: 2 ranks under torchrun, each holding the whole model, the calibration batches sharded;
- `zero3`: 2 ranks under `accelerate launch --config_file launch/accelerate/cpu_2proc_zero3.yaml`, the model partitioned
  while it loads, scored on the partitions and cut block by block (pipeline/sharded.py).

Each case also runs as `<case>+mmap`, with glibc's malloc told to hand freed blocks of 64 KiB or more back to the OS
(`MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`), which separates the tensors a rank holds from the heap
memory that earlier, freed tensors left resident (ratios of `+mmap` rows are against `one+mmap`).

Every case runs in a fresh process tree; its figures: wall and CPU seconds (all processes), the scoring peak per
rank that the command prints, and the largest process's peak RSS over the whole command (loading, scoring, surgery,
saving: `RUSAGE_CHILDREN` max RSS). Scores are compared with the one-process run's (max |Δ| / the layer's largest).

    python benchmarks/bench_partitioned.py --sizes 300m,1.1b            # appends to benchmarks/records/partitioned.jsonl
    python benchmarks/bench_partitioned.py --sizes 300m,1.1b --cases one+mmap,zero3+mmap
    python benchmarks/bench_partitioned.py --report                     # the RESULTS.md section from the records
    python benchmarks/bench_partitioned.py --sizes tiny --out /tmp/bp   # smoke check (records under --out)

Recorded cases are skipped, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_file import write_section  # noqa: E402
from sweep_runner import add_report_args, load_results  # noqa: E402

RECORDS = ROOT / "benchmarks" / "records" / "partitioned.jsonl"
SECTION = "## Scoring with partitioned parameters: one process, DDP, ZeRO-3 (bench_partitioned.py)"
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # about 290M parameters: TinyLlama's head layout at half the width
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4),
    # TinyLlama-1.1B's shape
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}
VOCAB = 32000
CASES = ("one", "ddp", "zero3", "one+mmap", "ddp+mmap", "zero3+mmap")
# `+mmap`: glibc's malloc returns every freed block of 64 KiB or more to the OS at once (its default raises the
# mmap threshold as large blocks are freed, after which they come from the heap and stay resident when freed): the
# peak RSS then follows the live tensors instead of what the heap kept from earlier gathers and buffers
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
PRUNE = ["--data", "gensim:lee", "--criterion", "earlycrop", "--hvp", "finite_difference", "--heads", "0.5", "--mlp", "0.5",
         "--layout", "uniform", "--batches", "2", "--batch-size", "1", "--seq-len", "256", "--overwrite"]
PEAKS = re.compile(r"^peak memory per rank: (.*)$", re.M)
MEASURE = ("import json, resource, subprocess, sys, time\n"
           "t = time.time(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(json.dumps({'rc': p.returncode, 'wall_s': time.time() - t, 'cpu_s': u.ru_utime + u.ru_stime,\n"
           "                  'max_rss_bytes': u.ru_maxrss * 1024, 'stdout': p.stdout, 'stderr': p.stderr[-4000:]}))\n")


def model_folder(out: Path, size: str) -> Path:
    """A random-init Llama of `size` with a tokenizer, saved once (float32 safetensors)."""
    folder = out / size / "model"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import data as data_lib

    tokenizer = data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"]), 8000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, **SHAPES[size]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command(case: str, folder: Path, out: Path) -> list[str]:
    prune = ["-m", "launch.cli", "prune", "--model", str(folder), *PRUNE, "--out", str(out)]
    case = case.removesuffix("+mmap")
    if case == "one":
        return [sys.executable, *prune]
    if case == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", "29631", *prune]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu_2proc_zero3.yaml",
            "--main_process_port", "29632", *prune]


def score_error(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    sa, sb = load_file(a / "scores.safetensors"), load_file(b / "scores.safetensors")
    return max(float(((sa[k] - sb[k]).abs().amax(1) / sb[k].abs().amax(1)).max()) for k in sb)


def run_case(size: str, case: str, out: Path) -> dict:
    folder = model_folder(out, size)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(MMAP_ENV if case.endswith("+mmap") else {})}
    measured = subprocess.run([sys.executable, "-c", MEASURE, *command(case, folder, out / size / case)],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    result = json.loads(measured.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{size} {case} failed ({result['rc']}):\n{result['stderr']}")
    peaks = PEAKS.findall(result.pop("stdout"))
    result.pop("stderr")
    result["scoring_peak_gb_per_rank"] = [float(gb) for gb in re.findall(r"\d+: (\d+\.\d+) GB", peaks[-1])]
    one = out / size / "one"  # the plain one-process run: `one+mmap` scores the same
    result["score_error_vs_one"] = score_error(out / size / case, one) if (one / "scores.safetensors").exists() else None
    import torch

    result["weight_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    result["parameters"] = result["weight_bytes"] // torch.float32.itemsize
    return result


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")


def sweep(args: argparse.Namespace) -> None:
    done = {(r["size"], r["case"]) for r in load_results(args.records)}
    for size in args.sizes:
        for case in args.cases:  # `one` first: the others' scores are compared with it
            if (size, case) in done:
                print(f"{size} {case}: recorded, skipped", flush=True)
                continue
            print(f"{size} {case} ...", flush=True)
            result = run_case(size, case, Path(args.out))
            record = {"size": size, "case": case, **result, "machine": platform.machine(), "cores": os.cpu_count(),
                      "finished_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            append(args.records, record)
            print(f"    {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU, largest process {result['max_rss_bytes'] / 1e9:.2f} GB, "
                  f"scoring peak per rank {result['scoring_peak_gb_per_rank']} GB, score error {result['score_error_vs_one']}", flush=True)


def _rows(records: list[dict]) -> list[str]:
    by = {(r["size"], r["case"]): r for r in records}
    rows = []
    for (size, case), r in by.items():
        one = by.get((size, "one+mmap" if case.endswith("+mmap") else "one"))
        ratio = f"{r['max_rss_bytes'] / one['max_rss_bytes']:.2f}×" if one else "–"
        scoring = max(r["scoring_peak_gb_per_rank"])
        scoring_ratio = f"{scoring / max(one['scoring_peak_gb_per_rank']):.2f}×" if one else "–"
        err = "–" if case.startswith("one") or r["score_error_vs_one"] is None else f"{r['score_error_vs_one']:.1e}"
        time_ratio = f"{r['wall_s'] / one['wall_s']:.2f}×" if one else "–"
        rows.append(f"| {size} ({r['parameters'] / 1e6:,.0f}M, {r['weight_bytes'] / 1e9:.2f} GB) | {case} | "
                    f"{len(r['scoring_peak_gb_per_rank'])} | {r['wall_s']:.0f} ({time_ratio}) | {r['cpu_s']:.0f} | "
                    f"{', '.join(f'{gb:.1f}' for gb in r['scoring_peak_gb_per_rank'])} ({scoring_ratio}) | "
                    f"{r['max_rss_bytes'] / 1e9:.2f} ({ratio}) | {err} |")
    return rows


def report(args: argparse.Namespace) -> None:
    records = load_results(args.records)
    if not records:
        raise SystemExit(f"no records in {args.records}")
    lines = [SECTION, "",
             f"Command: `python benchmarks/bench_partitioned.py --sizes {','.join(dict.fromkeys(r['size'] for r in records))}`, "
             f"then `--report`. Records: `benchmarks/records/partitioned.jsonl` ({records[-1]['finished_at']}); machine: "
             f"{records[-1]['machine']}, {records[-1]['cores']} logical cores shared with other jobs, 24 GiB, no GPU; one torch "
             "thread per process.", "",
             "`earlycrop prune` of a random-init Llama (vocab 32000): earlycrop with finite-difference H·g, 50% of heads and "
             "MLP, uniform; 2 calibration batches of 1 × 256 tokens; weights float32. Ratios against the `one` row of the "
             "same model. Scoring peak: what the command prints (per rank, at the end of scoring); largest process: the "
             "peak RSS of the largest process over the whole command (load, score, cut, save).", "",
             "| model | case | ranks | wall s (vs one) | CPU s | scoring peak GB per rank (largest vs one) | "
             "largest process GB (vs one) | score error vs one |",
             "|---|---|---:|---:|---:|---|---:|---:|", *_rows(records), ""]
    text = "\n".join(lines)
    if args.extra:
        text += "\n" + Path(args.extra).read_text().rstrip() + "\n"
    write_section(Path(args.results), SECTION, text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=lambda s: s.split(","), default=["300m"], help=f"comma-separated, from: {', '.join(SHAPES)}")
    ap.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help="comma-separated, from: one, ddp, zero3")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_partitioned"), help="model folders and pruned outputs")
    add_report_args(ap, ROOT)  # --records (default here: the committed records; <out>/partitioned.jsonl for tiny)
    args = ap.parse_args()
    bad = [s for s in args.sizes if s not in SHAPES] + [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"unknown sizes/cases {bad}")
    if args.records is None:
        args.records = Path(args.out) / "partitioned.jsonl" if args.sizes == ["tiny"] else RECORDS
    args.records = Path(args.records)
    report(args) if args.report else sweep(args)


if __name__ == "__main__":
    main()
