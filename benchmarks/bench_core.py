"""Core benchmark: a pruned Llama against its dense parent and a natively built model of the pruned shape.

One run measures, side by side on the same machine and in interleaved rounds (so that load from
other processes hits every model alike and the ratios stay meaningful):

- training-step time (forward + backward + AdamW step + zero_grad), parameter count, parameter bytes
  and AdamW optimizer-state bytes for three models: `dense`; `pruned` (50% of heads, 50% of MLP
  neurons, layout uniform, magnitude scores, `earlycrop.prune`); `native` (a LlamaForCausalLM built
  directly from the pruned model's config, i.e. the shape a user would get without earlycrop);
- the cost of scoring ONE calibration batch with every criterion, as a multiple of one training step
  of the dense model with the same attention implementation.

    python benchmarks/bench_core.py            # full run (~26M-parameter Llama), writes RESULTS.md
    python benchmarks/bench_core.py --quick    # tiny model, smoke check, prints only

The section `## Core: pruned vs dense vs native (bench_core.py)` of benchmarks/RESULTS.md is
replaced in place; other sections are left untouched.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import earlycrop  # noqa: E402
from earlycrop.surgery import LAYOUT_KEY  # noqa: E402
from results_file import write_section  # noqa: E402

SECTION = "## Core: pruned vs dense vs native (bench_core.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

FULL = dict(
    model=dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256),
    batch_size=8, seq_len=128, warmup=1, rounds=7, crit_repeats=2,
)
QUICK = dict(
    model=dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128),
    batch_size=4, seq_len=64, warmup=1, rounds=3, crit_repeats=2,
)

# (label, criterion name, constructor options); every entry of earlycrop.CRITERIA appears at least once
CRITERIA_RUNS = [
    ("earlycrop (hvp exact)", "earlycrop", dict(hvp="exact")),
    ("earlycrop (hvp finite_difference)", "earlycrop", dict(hvp="finite_difference", fd_step=1e-4)),
    ("grasp (hvp exact)", "grasp", dict(hvp="exact")),
    ("snip", "snip", {}),
    ("fisher", "fisher", {}),
    ("activation", "activation", {}),
    ("magnitude", "magnitude", {}),
    ("random", "random", {}),
]


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build(model_kwargs: dict, attn: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**model_kwargs, use_cache=False, attn_implementation=attn)
    return LlamaForCausalLM(config).float()


def with_attn(model: LlamaForCausalLM, attn: str) -> LlamaForCausalLM:
    """A deep copy of `model` that runs with attention implementation `attn`."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(attn)
    return twin


def native_from(pruned: LlamaForCausalLM, attn: str, seed: int) -> LlamaForCausalLM:
    """A model built from scratch at the pruned shape: the pruned config minus earlycrop's layout key."""
    config = copy.deepcopy(pruned.config)
    if hasattr(config, LAYOUT_KEY):
        delattr(config, LAYOUT_KEY)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    native = LlamaForCausalLM(config).float()
    got = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    if got != want:
        diff = [k for k in want if got.get(k) != want[k]]
        raise AssertionError(f"native model's shapes differ from the pruned model's: {diff[:5]}")
    return native


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def optim_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


@dataclass
class Trainee:
    name: str
    model: LlamaForCausalLM
    opt: torch.optim.Optimizer = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One training step; returns its wall time and records wall and process CPU time."""
        c0, t0 = time.process_time(), time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss")
        self.times.append(wall)
        self.cpu_times.append(cpu)
        return wall


def time_training(trainees: list[Trainee], batch, warmup: int, rounds: int) -> None:
    for t in trainees:
        for _ in range(warmup):
            t.step(batch)
        t.times.clear()
        t.cpu_times.clear()
        log(f"warm-up done: {t.name}")
    for r in range(rounds):
        # rotate the order every round so no model always runs first / last
        order = trainees[r % len(trainees):] + trainees[: r % len(trainees)]
        for t in order:
            t.step(batch)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{t.name} {t.times[-1]:.3f}s" for t in trainees) + f"; load {loadavg()}")


def time_criterion(model, name: str, options: dict, batch, repeats: int, reference: Trainee) -> dict:
    """Each timed scoring call is paired with one dense training step taken just before it, so the
    ratio compares two things measured under the same (shared-machine) load."""
    criterion = earlycrop.make_criterion(name, **options)
    earlycrop.score_units(model, criterion, [batch])  # warm-up (also surfaces unsupported attention early)
    times, steps, cpus, step_cpus = [], [], [], []
    for _ in range(repeats):
        steps.append(reference.step(batch))
        step_cpus.append(reference.cpu_times[-1])
        c0, t0 = time.process_time(), time.perf_counter()
        earlycrop.score_units(model, criterion, [batch])
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    ratios = [t / s for t, s in zip(times, steps)]
    return dict(median=statistics.median(times), step=statistics.median(steps),
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                cpu_ratio=statistics.median(c / s for c, s in zip(cpus, step_cpus)))


def fmt_mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


# ----------------------------------------------------------------------------- main


def run(args) -> str:
    preset = QUICK if args.quick else FULL
    rounds = args.rounds or preset["rounds"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    crit_repeats = args.crit_repeats or preset["crit_repeats"]
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    bs, seq = preset["batch_size"], preset["seq_len"]
    mk = preset["model"]
    load_start = loadavg()
    started = time.perf_counter()
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"cpu {cpu_model()}, load {load_start}")

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, mk["vocab_size"], (bs, seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}

    # --- the three models
    dense = build(mk, args.attn, seed=0)
    pruned = copy.deepcopy(dense)
    scores = earlycrop.score_units(pruned, "magnitude")
    plan = earlycrop.make_plan(pruned, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.5, layout="uniform"))
    expected = earlycrop.params_after(pruned, plan)
    result = earlycrop.prune(pruned, plan)
    assert result.params_after == expected == n_params(pruned), (result, expected)
    assert result.plain_loadable
    native = native_from(pruned, args.attn, seed=1)
    pc = pruned.config
    log(f"pruned shape: heads {pc.num_attention_heads}, kv heads {pc.num_key_value_heads}, "
        f"head_dim {pc.head_dim}, intermediate {pc.intermediate_size}; params {result.params_before:,} -> {result.params_after:,}")

    trainees = [Trainee("dense", dense), Trainee("pruned", pruned), Trainee("native", native)]
    time_training(trainees, batch, warmup, rounds)

    rows = {}
    for t in trainees:
        rows[t.name] = dict(
            median=statistics.median(t.times), min=min(t.times), max=max(t.times),
            cpu=statistics.median(t.cpu_times), times=list(t.times),
            params=n_params(t.model), pbytes=param_bytes(t.model), obytes=optim_state_bytes(t.opt),
        )

    def paired(a: str, b: str) -> float:
        """Median over rounds of (a's step / b's step) in the same round."""
        return statistics.median(x / y for x, y in zip(rows[a]["times"], rows[b]["times"]))

    # --- criteria: score one batch on a fresh copy of the dense model (its initial weights)
    references = {args.attn: trainees[0]}
    crit_rows = []
    score_model = {args.attn: build(mk, args.attn, seed=0)}
    for label, name, options in CRITERIA_RUNS:
        attn = args.attn
        note = ""
        try:
            res = time_criterion(score_model[attn], name, options, batch, crit_repeats, references[attn])
        except RuntimeError as e:
            if attn == "eager" or "not implemented" not in str(e):
                raise
            note = f"{attn} failed (`{str(e).splitlines()[0][:120]}`); eager used"
            attn = "eager"
            score_model.setdefault("eager", build(mk, "eager", seed=0))
            if "eager" not in references:  # paired reference: the dense model with eager attention
                references["eager"] = Trainee("dense-eager", with_attn(dense, "eager"))
                for _ in range(max(warmup, 1)):
                    references["eager"].step(batch)
            res = time_criterion(score_model[attn], name, options, batch, crit_repeats, references[attn])
        crit_rows.append(dict(label=label, attn=attn, note=note, **res))
        log(f"criterion {label}: {res['median']:.3f}s on {attn}, paired dense step {res['step']:.3f}s, "
            f"ratio {res['ratio']:.2f} ({res['ratio_min']:.2f}-{res['ratio_max']:.2f}); load {loadavg()}")

    elapsed = time.perf_counter() - started
    load_end = loadavg()
    log(f"done in {elapsed:.0f}s, load {load_end}")

    # --- report
    cmd = shlex.join(["python", "benchmarks/bench_core.py", *sys.argv[1:]])
    L = []
    L.append(SECTION)
    L.append("")
    L.append(f"Command: `{cmd}` (run from the repository root; {'quick smoke preset' if args.quick else 'full preset'}; "
             f"wall time {elapsed:.0f} s).")
    L.append("")
    L.append(f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    L.append(f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores visible, shared with other jobs "
             f"(1-min load average {load_start.split()[0]} at start, {load_end.split()[0]} at end); no GPU.")
    if args.note:
        L.append(f"- Note: {args.note}")
    L.append(f"- Code: earlycrop at `{git_rev()}` (working tree as run).")
    L.append(f"- Software: Python {platform.python_version()}, torch {torch.__version__} "
             f"(`torch.set_num_threads({threads})`" + (" — below the core count, see the note" if threads < (os.cpu_count() or 1) else " = the core count")
             + f", {torch.get_num_interop_threads()} inter-op threads), "
             f"transformers {transformers.__version__}; float32.")
    L.append(f"- Model: `LlamaForCausalLM(LlamaConfig({', '.join(f'{k}={v}' for k, v in mk.items())}, use_cache=False))`, "
             f"head_dim {mk['hidden_size'] // mk['num_attention_heads']}, untied embeddings, random init, "
             f"attention `{args.attn}`" + (" (a criterion that fails on it falls back to `eager`, see the notes)." if args.attn != "eager" else "."))
    L.append(f"- Pruning: `score_units(model, \"magnitude\")` → `make_plan(..., SelectionConfig(heads=0.5, mlp=0.5, "
             f"layout=\"uniform\"))` → `prune(model, plan)`. Pruned shape: {pc.num_attention_heads} heads, "
             f"{pc.num_key_value_heads} kv heads, head_dim {pc.head_dim}, intermediate {pc.intermediate_size}.")
    L.append("- Native: `LlamaForCausalLM(deepcopy(pruned.config))` with the `earlycrop_layout` key removed "
             "(same parameter shapes as the pruned model, checked).")
    L.append(f"- Training step: forward + backward + `AdamW.step()` + `zero_grad(set_to_none=True)` on one batch of "
             f"{bs} × {seq} random tokens (labels = inputs); {warmup} warm-up step(s) per model, then {rounds} rounds in which "
             "every model takes one timed step (order rotated each round). Wall time: median (min–max) over the rounds; "
             "CPU = process CPU time per step (all threads), median.")
    L.append("")
    L.append("| model | params | param MiB | AdamW state MiB | train step s, median (min–max) | CPU s/step |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for t in trainees:
        r = rows[t.name]
        L.append(f"| {t.name} | {r['params']:,} | {fmt_mb(r['pbytes'])} | {fmt_mb(r['obytes'])} | "
                 f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}) | {r['cpu']:.3f} |")
    L.append("")
    L.append("Ratios. \"paired\" = median over rounds of the ratio of the two models' steps in the same round "
             "(the most load-robust number on a shared machine); \"medians\" / \"mins\" = ratio of the per-model medians / minima.")
    L.append("")
    L.append("| ratio | params | param bytes | AdamW state bytes | step, paired | step, medians | step, mins | CPU/step |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for an, bn in (("pruned", "dense"), ("pruned", "native"), ("native", "dense")):
        a, b = rows[an], rows[bn]
        L.append(f"| {an} / {bn} | {a['params'] / b['params']:.3f} | {a['pbytes'] / b['pbytes']:.3f} | "
                 f"{a['obytes'] / b['obytes']:.3f} | {paired(an, bn):.3f} | {a['median'] / b['median']:.3f} | "
                 f"{a['min'] / b['min']:.3f} | {a['cpu'] / b['cpu']:.3f} |")
    L.append("")
    L.append(f"Scoring cost of ONE calibration batch ({bs} × {seq}) per criterion: wall time of one "
             f"`score_units(dense, criterion, [batch])` call (gates attached and removed inside; one warm-up call, then "
             f"{crit_repeats} timed calls). Each timed call is paired with one dense training step (same attention "
             "implementation) taken just before it; the multiple is the median of those per-pair ratios.")
    L.append("")
    L.append("| criterion | attention | score s (median) | paired dense step s (median) | × dense train step, wall (min–max) | × dense train step, CPU |")
    L.append("|---|---|---:|---:|---:|---:|")
    for c in crit_rows:
        L.append(f"| {c['label']} | {c['attn']} | {c['median']:.3f} | {c['step']:.3f} | "
                 f"{c['ratio']:.2f} ({c['ratio_min']:.2f}–{c['ratio_max']:.2f}) | {c['cpu_ratio']:.2f} |")
    notes = [c for c in crit_rows if c["note"]]
    if notes:
        L.append("")
        for c in notes:
            L.append(f"- {c['label']}: {c['note']}.")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke check (prints, does not write)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation (default sdpa)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--rounds", type=int, default=None, help="timed training rounds (one step per model each)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up training steps per model")
    ap.add_argument("--crit-repeats", type=int, default=None, help="timed calls per criterion")
    ap.add_argument("--note", default="", help="free text added to the report (e.g. why --threads differs from the core count)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is replaced")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write the section into --results (default: yes for the full run, no for --quick)")
    args = ap.parse_args(argv)
    section = run(args)
    print()
    print(section)
    write = (not args.quick) if args.write is None else args.write
    if write:
        write_section(args.results, SECTION, section)
        log(f"wrote section to {args.results}")


if __name__ == "__main__":
    main()
