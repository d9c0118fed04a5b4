"""Peak memory of scoring one model in one process: finite-difference H·g against its floors (docs/DESIGN.md §1).

Each case runs in fresh Python processes (so a peak RSS is that case's own): build a randomly initialised Llama
(~100M parameters by default) in the case's dtype, score it once with `earlycrop.score_units`, and report

- the process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, what `/usr/bin/time -v` calls "Maximum
  resident set size"), median and range over `--repeat` processes, and the RSS once the model is built;
- in one more process, the peak of the tensors alive while scoring (`torch.profiler` memory events: allocations
  minus frees, in order), which the C allocator's retention and address-space layout do not move.

Cases: `snip` (forward/backward for the gates only: the floor), `earlycrop` with `hvp: finite_difference` in
float32 and bfloat16. With `--before DIR` (a checkout of an earlier commit) the float32 FD case is also run with
that tree's earlycrop, for a before/after row.

    python benchmarks/bench_scoring_memory.py                                  # prints the table
    python benchmarks/bench_scoring_memory.py --before /tmp/before --write     # also replaces the RESULTS.md section
    python benchmarks/bench_scoring_memory.py --quick --repeat 1               # tiny model, smoke check

`--write` replaces the section `## Lean finite-difference scoring (bench_scoring_memory.py)` of
benchmarks/RESULTS.md; other sections are left untouched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Lean finite-difference scoring (bench_scoring_memory.py)"
FULL = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
CASES = [("snip", "float32"), ("finite_difference", "float32"), ("finite_difference", "bfloat16")]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def live_peak(fn) -> int:
    """Highest running sum of the CPU allocator's allocations minus frees while `fn` runs (bytes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure(shape: dict, hvp: str, dtype: str, batches: int, seq_len: int, live: bool) -> dict:
    """One case in this process: the figures as a dict (bytes); `live` measures the tensors instead of RSS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import earlycrop

    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: no float32 phase in the peak
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, use_cache=False)).eval()
    torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(0, shape["vocab_size"], (1, seq_len), generator=gen) for _ in range(batches))]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    theta = sum(w.numel() * w.element_size() for w in earlycrop.get_adapter(model).prunable_weights(model))
    figures = dict(params=sum(p.numel() for p in model.parameters()), weights=weights, theta=theta, built=rss_bytes())
    criterion = "snip" if hvp == "snip" else earlycrop.make_criterion("earlycrop", hvp=hvp)
    if live:
        return {**figures, "live": live_peak(lambda: earlycrop.score_units(model, criterion, data))}
    earlycrop.score_units(model, criterion, data)
    return {**figures, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_case(src: Path, args: argparse.Namespace, hvp: str, dtype: str) -> dict:
    """`measure` in `args.repeat` fresh processes importing earlycrop from `src` (peak RSS: median, min, max; the
    allocator's layout moves it by up to ~0.4 GB from run to run), and once more for the live tensors."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--case", hvp, dtype, "--batches", str(args.batches), "--seq-len", str(args.seq_len)]
    cmd += ["--quick"] if args.quick else []

    def once(*extra: str) -> dict:
        out = subprocess.run([*cmd, *extra], env=env, cwd=src, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs = [once() for _ in range(args.repeat)]
    peaks = [r["peak"] for r in runs]
    return {**runs[0], "peak": statistics.median(peaks), "peak_min": min(peaks), "peak_max": max(peaks),
            "built": statistics.median(r["built"] for r in runs), "live": once("--live")["live"]}


def git_rev(src: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    return rev or src.name


def report(rows: list[tuple[str, str, str, dict]], args: argparse.Namespace, shape: dict) -> str:
    gb = 1e9
    cmd = shlex.join(["python", "benchmarks/bench_scoring_memory.py", *sys.argv[1:]])
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    lines = [SECTION, "", f"Command: `{cmd}` (repository root). Each figure comes from fresh processes.", "",
             f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.machine()}, "
             f"{os.cpu_count()} logical cores (shared with other jobs), {memory:.0f} GiB; Python {platform.python_version()}, "
             "one torch thread.",
             f"- Model: `LlamaForCausalLM(LlamaConfig({', '.join(f'{k}={v}' for k, v in shape.items())}, "
             f"tie_word_embeddings=False))`, random init, eager attention; {args.batches} calibration batch(es) of 1 × "
             f"{args.seq_len} tokens. θ (the prunable block weights) is {rows[0][3]['theta'] / rows[0][3]['weights']:.0%} "
             "of the weight bytes.",
             f"- Peak RSS: `ru_maxrss` (= `/usr/bin/time -v` \"Maximum resident set size\"), median (min–max) of "
             f"{args.repeat} processes. Built: RSS after building the model. Runtime = built − weight bytes (Python, "
             "torch, transformers; the same for any model size), so (peak − runtime) / weights is the ratio a large "
             "model approaches. Live: weights + the peak of the tensors scoring allocates (`torch.profiler` memory "
             "events), over weights.", "",
             "| code | criterion | weights | parameters | weight bytes | RSS built | peak RSS | peak / weights "
             "| (peak − runtime) / weights | live / weights |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for code, hvp, dtype, r in rows:
        name = "snip" if hvp == "snip" else "earlycrop, hvp finite_difference"
        w = r["weights"]
        lines.append(f"| {code} | {name} | {dtype} | {r['params'] / 1e6:.1f}M | {w / gb:.3f} GB | {r['built'] / gb:.3f} GB | "
                     f"{r['peak'] / gb:.3f} GB ({r['peak_min'] / gb:.3f}–{r['peak_max'] / gb:.3f}) | {r['peak'] / w:.2f}× | "
                     f"{(r['peak'] - r['built'] + w) / w:.2f}× | {(w + r['live']) / w:.2f}× |")
    first = rows[0][3]
    lines += ["", f"Reading: the weight gradient g is the one θ-sized buffer FD needs besides the weights, "
              f"{first['theta'] / first['weights']:.2f}× the weight bytes in float32 (g is float32 for bf16 weights too: "
              f"{2 * first['theta'] / first['weights']:.2f}× their bytes there); the rest above the snip row is one "
              "tensor's shift and the kept entries. A copy of θ (the code before) adds another θ. The live-tensor "
              "column is what the code allocates; peak RSS adds what the C allocator keeps mapped, which varies "
              "between identical processes (the min–max range)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=2, metavar=("HVP", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path, help="a checkout of an earlier commit: its float32 FD case is measured too")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="processes per case for the peak RSS (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny model, smoke check")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.case:
        print(json.dumps(measure(shape, *args.case, args.batches, args.seq_len, args.live)))
        return
    rows, here = [], f"this tree (`{git_rev(ROOT)}`)"
    if args.before:
        rows.append((f"before (`{git_rev(args.before)}`)", "finite_difference", "float32",
                     run_case(args.before, args, "finite_difference", "float32")))
    for hvp, dtype in CASES:
        rows.append((here, hvp, dtype, run_case(ROOT, args, hvp, dtype)))
    text = report(rows, args, shape)
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_file import write_section

        write_section(RESULTS, SECTION, text)


if __name__ == "__main__":
    main()
