"""Quality sweep (issue 4, scenario 1): does EarlyCroP keep more quality than the baselines?

Trains a tiny Llama-style model with GQA (8 query heads, 2 KV heads) from scratch on gensim's offline
Wikipedia text with the pipeline itself (`pipeline.run.run`), dense and pruned with every criterion at
30/50/70% of heads and MLP neurons removed, pruned before training (`prune_at: 0`) and by the paper's
weight-distance rule (`prune_at: auto`), the same number of training tokens for every run.

    python benchmarks/quality.py --quick                      # smoke run (3 tiny runs, own folder)
    python benchmarks/quality.py                              # the whole sweep (resumable)
    python benchmarks/quality.py --shard 0/2 & python benchmarks/quality.py --shard 1/2   # one process per core
    python benchmarks/quality.py --criteria dense,earlycrop,random --ratios 0.5 --prune-at 0 --seeds 0,1,2
    python benchmarks/quality.py --report                     # write the section of benchmarks/RESULTS.md

Each finished run is appended to `benchmarks/records/quality.jsonl` (committed with the report, so the
numbers outlive the machine; `--records` for another file); a rerun skips runs already there, so an
interrupted sweep resumes where it stopped. Every run is also an MLflow run of one experiment in one
sqlite store, `<out>/mlflow.db`, and leaves its model under `<out>/runs/`. Each run executes in a forked
child process (the pipeline in-process there), so a crash does not end the sweep and the peak RSS is that
run's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results_file import write_section  # noqa: E402
from sweep_runner import (add_report_args, default_records, load_results, metric_histories, plan_counts,  # noqa: E402
                          run_forked, shown)

CONFIG = ROOT / "configs" / "quickstart.yaml"
CRITERIA = ["earlycrop", "grasp", "snip", "fisher", "magnitude", "activation", "random"]
RATIOS = [0.7, 0.3, 0.5]
PRUNE_AT = ["0", "auto"]
SEEDS_FOR = {0.5: [0, 1, 2], 0.3: [0, 1], 0.7: [0, 1]}
SECTION = "## Quality: EarlyCroP vs baselines, from scratch (quality.py)"
PLOT_SUFFIX = ""  # plots of another budget (--max-steps) get their own names
MICRO, SEQ = 8, 128
CALIBRATION = 4  # calibration batches of the main sweep (quickstart.yaml's); --calibration-batches for another count

# The regime. quickstart.yaml plus: 2 KV heads (so uniform per-group removal can express 25/50/75% of
# query heads: 4 query heads per KV group), a longer budget, evaluation every 50 steps on up to 16 batches.
REGIME = [
    "model.init.num_key_value_heads=2",
    "prune.layout=uniform", "prune.gqa=per_group", "prune.round_to=8",
    "train.max_steps=600", "train.warmup_steps=30", "train.eval_every=50", "train.eval_batches=16",
    "train.log_every=25", "train.checkpoint_every=0",
    "prune.auto_interval=20", "prune.auto_cap=200",
]
QUICK = [
    "train.max_steps=40", "train.warmup_steps=5", "train.eval_every=20", "train.eval_batches=4",
    "train.log_every=10", "prune.auto_interval=5", "prune.auto_cap=20", "prune.calibration_batches=2",
]


def set_budget(steps: int) -> None:
    """Another training budget than the main sweep's 600 steps (to see whether and where dense overtakes):
    every run gets `steps` steps; the runs go to their own folder and RESULTS.md section."""
    global SECTION, PLOT_SUFFIX
    REGIME[REGIME.index("train.max_steps=600")] = f"train.max_steps={steps}"
    PLOT_SUFFIX = f"_steps{steps}"
    SECTION = f"## Quality: EarlyCroP vs baselines, from scratch, {steps} steps (quality.py --max-steps {steps})"


def is_main_variant(record: dict) -> bool:
    """A run of the main sweep's variant: uniform layout, the default calibration batches."""
    return record.get("layout", "uniform") == "uniform" and record.get("calibration", CALIBRATION) == CALIBRATION


def run_key(criterion: str, ratio: float | None, prune_at: str | None, seed: int, layout: str = "uniform",
            calibration: int = CALIBRATION) -> str:
    if criterion == "dense":
        return f"dense-s{seed}"
    return (f"{criterion}-r{ratio}-at{prune_at}-s{seed}" + ("" if layout == "uniform" else f"-{layout}")
            + ("" if calibration == CALIBRATION else f"-cb{calibration}"))


def planned_runs(quick: bool, layout: str = "uniform", calibration: int = CALIBRATION,
                 prune_ats: list[str] | None = None) -> list[dict]:
    """The sweep's runs in order; `prune_ats` replaces the moments 0 and auto (a step number prunes there)."""
    if quick:
        return [dict(criterion="dense", ratio=None, prune_at=None, seed=0),
                dict(criterion="earlycrop", ratio=0.5, prune_at="0", seed=0, layout=layout, calibration=calibration),
                dict(criterion="random", ratio=0.5, prune_at="auto", seed=0, layout=layout, calibration=calibration)]
    # the dense references first (every Δ needs them), then ratio by ratio, seed by seed
    runs = [dict(criterion="dense", ratio=None, prune_at=None, seed=seed) for seed in SEEDS_FOR[0.5]]
    for ratio in RATIOS:
        for seed in SEEDS_FOR[ratio]:
            for prune_at in prune_ats or PRUNE_AT:
                for crit in CRITERIA:
                    runs.append(dict(criterion=crit, ratio=ratio, prune_at=prune_at, seed=seed, layout=layout,
                                     calibration=calibration))
    return runs


def overrides_for(spec: dict, out: Path, quick: bool) -> list[str]:
    ov = list(REGIME) + (QUICK if quick else [])
    key = run_key(**spec)
    ov += [f"seed={spec['seed']}", f"output_dir={out / 'runs' / key}", f"run_name={key}",
           f"experiment=earlycrop-quality{'-quick' if quick else ''}",
           f"tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"]
    if spec["criterion"] == "dense":
        ov += ["prune.prune_at=never"]
    else:
        ov += [f"prune.layout={spec.get('layout', 'uniform')}", f"prune.criterion={spec['criterion']}", f"prune.heads={spec['ratio']}", f"prune.mlp={spec['ratio']}",
               f"prune.prune_at={spec['prune_at']}"]
        if spec.get("calibration", CALIBRATION) != CALIBRATION:
            ov += [f"prune.calibration_batches={spec['calibration']}"]
    return ov


def _child(spec: dict, out: str, quick: bool, result_path: str) -> None:
    """In the forked child: run the pipeline in-process, then collect histories from MLflow."""
    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.run import run

    out = Path(out)
    cfg = load_config(CONFIG, overrides_for(spec, out, quick))
    t0 = time.time()
    summary = run(cfg)
    wall = time.time() - t0
    run_dir = Path(cfg.output_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    hist = metric_histories(run_dir, ("val_loss", "train_loss", "tokens_per_s"))
    record = {**spec, "key": run_key(**spec), "quick": quick, "summary": summary, "wall_s": wall,
              "mlflow_run_id": info["run_id"], "val_history": hist["val_loss"], "train_history": hist["train_loss"],
              "tokens_per_s_logged": [v for _, v, _ in hist["tokens_per_s"]], "counts": plan_counts(run_dir),
              "max_steps": cfg.train.max_steps, "tokens_per_step": cfg.train.micro_batch_size * cfg.data.seq_len,
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(result_path).write_text(json.dumps(record))


def unigram_ppl(out: Path, cache: Path, seed: int, quick: bool) -> dict:
    """Unigram perplexity of the evaluated validation blocks, with the run's own trained tokenizer;
    unigram probabilities from the training split's token counts (add-one smoothed). Cached per seed in `cache`."""
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    if str(seed) in table:
        return table[str(seed)]
    from pipeline import data as data_lib
    from pipeline.config import load_config
    from pipeline.modeling import load_model_tokenizer

    cfg = load_config(CONFIG, overrides_for(dict(criterion="dense", ratio=None, prune_at=None, seed=seed), out, quick))
    tok = load_model_tokenizer(str(Path(cfg.output_dir) / "tokenizer"))
    docs = data_lib.load_documents(cfg.data.source, text_field=cfg.data.text_field)
    train_docs, val_docs = data_lib.split_documents(docs, cfg.data.validation_fraction, seed)
    counts = Counter()
    for ids in tok(list(train_docs["text"]), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
        counts[tok.eos_token_id] += 1
    train_tokens = sum(counts.values())
    vocab = len(tok)
    val = data_lib.pack_causal_lm(val_docs, tok, cfg.data.seq_len)
    n_eval = min(cfg.train.eval_batches * cfg.train.micro_batch_size, len(val))
    nll, n = 0.0, 0
    for row in val.select(range(n_eval))["labels"]:
        for t in row[1:]:  # the model predicts positions 1..L-1 of each block
            nll -= math.log((counts[t] + 1) / (train_tokens + vocab))
            n += 1
    train_blocks = train_tokens // cfg.data.seq_len
    entry = {"unigram_val_loss": nll / n, "unigram_val_ppl": math.exp(nll / n), "val_tokens_scored": n,
             "train_tokens": train_tokens, "train_blocks": train_blocks, "val_blocks": len(val),
             "train_docs": len(train_docs), "val_docs": len(val_docs), "vocab": vocab}
    # re-read right before writing: another sweep process (--shard) may have added a seed meanwhile
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({**table, str(seed): entry}, indent=1, sort_keys=True))
    return entry


def unigram_cache(records: Path) -> Path:
    return records.with_name(records.stem + ".unigram.json")


def sweep(args) -> None:
    out, records = Path(args.out), Path(args.records)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in load_results(records)}
    todo = []
    for spec in planned_runs(args.quick, args.layout, args.calibration_batches, args.prune_at):
        if args.criteria and spec["criterion"] not in args.criteria:
            continue
        if spec["criterion"] != "dense":
            if args.ratios and spec["ratio"] not in args.ratios:
                continue
        if args.seeds is not None and spec["seed"] not in args.seeds:
            continue
        if run_key(**spec) in done:
            continue
        todo.append(spec)
    index, count = args.shard
    todo = todo[index::count]
    print(f"{len(done)} runs already in {records}; {len(todo)} to run" + (f" (shard {index}/{count})" if count > 1 else ""),
          flush=True)

    def add_unigram(record: dict) -> None:
        record["concurrent_shards"] = count
        try:
            record["unigram"] = unigram_ppl(out, unigram_cache(records), record["seed"], args.quick)
        except Exception as exc:  # the unigram baseline must not lose a finished run
            record["unigram"] = {"error": repr(exc)}

    for i, spec in enumerate(todo, 1):
        key = run_key(**spec)
        print(f"[{i}/{len(todo)}] {key} ...", flush=True)
        t0 = time.time()
        record = run_forked(out, records, key, _child, spec, str(out), args.quick,
                            failed_note="; not recorded, a rerun retries it", enrich=add_unigram)
        if record is None:
            continue
        s = record["summary"]
        print(f"    val_loss {s['val_loss']:.4f} ppl {s['val_perplexity']:.1f} params {s['params_final']:,} "
              f"({time.time() - t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------- report


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0]) + " (n=1)"
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def _flops(r: dict) -> float:
    """6 × params × tokens, with the dense size before a mid-training prune and the pruned size after."""
    s = r["summary"]
    tps = r["tokens_per_step"]
    at = s.get("pruned_at")
    if at is None:
        return 6.0 * s["params_dense"] * s["steps"] * tps
    return 6.0 * (s["params_dense"] * at + s["params_final"] * (s["steps"] - at)) * tps


def _reach(r: dict, target: float):
    for step, loss, t in r["val_history"]:
        if loss <= target:
            return step, t
    return None


def _interp(hist, t):
    """Validation loss of a history [(step, loss, time)] at wall time t (linear between evaluations)."""
    pts = [(tt, v) for _, v, tt in hist]
    if not pts or t < pts[0][0]:
        return None
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-9)
    return pts[-1][1]


def report(args) -> None:
    records = Path(args.records)
    results = [r for r in load_results(records) if r.get("quick", False) == args.quick]
    if not results:
        raise SystemExit(f"no results in {records}")
    dense = {r["seed"]: r for r in results if r["criterion"] == "dense"}
    groups = defaultdict(list)
    for r in results:
        groups[(r["criterion"], r["ratio"], r["prune_at"], r.get("layout", "uniform"),
                r.get("calibration", CALIBRATION))].append(r)

    def order(k):
        c, ratio, at, layout, cal = k
        return (c != "dense", ratio or 0, str(at), layout, cal, CRITERIA.index(c) if c in CRITERIA else -1)

    rows = []
    for k in sorted(groups, key=order):
        rs = sorted(groups[k], key=lambda r: r["seed"])
        c, ratio, at, layout, cal = k
        tags = ([] if layout == "uniform" else [layout]) + ([] if cal == CALIBRATION else [f"{cal} calibration batches"])
        loss = [r["summary"]["val_loss"] for r in rs]
        ppl = [r["summary"]["val_perplexity"] for r in rs]
        delta = [r["summary"]["val_loss"] - dense[r["seed"]]["summary"]["val_loss"] for r in rs if r["seed"] in dense and c != "dense"]
        params = [r["summary"]["params_final"] for r in rs]
        flops = [_flops(r) for r in rs]
        tok = [r["summary"]["steps"] * r["tokens_per_step"] for r in rs]
        tps = [t / r["summary"]["time_train_s"] for t, r in zip(tok, rs)]
        wall = [r["val_history"][-1][2] for r in rs]
        rss = [r["summary"].get("peak_rss_bytes", 0) / 2**20 for r in rs]
        at_s = [r["summary"].get("pruned_at") for r in rs]
        reach, eq_wall = [], []
        for r in rs:
            d = dense.get(r["seed"])
            if d is None or c == "dense":
                continue
            hit = _reach(r, d["summary"]["val_loss"])
            reach.append("never" if hit is None else f"{hit[0]} / {hit[1]:.0f}s")
            dl = _interp(d["val_history"], r["val_history"][-1][2])
            if dl is not None:
                eq_wall.append(r["summary"]["val_loss"] - dl)
        heads = rs[0]["counts"]
        if heads is None:
            shape = "dense"
        elif len(set(heads["heads"])) == 1 and len(set(heads["neurons"])) == 1:
            shape = f"{heads['heads'][0]}/{heads['dense_heads'][0]} heads, {heads['neurons'][0]}/{heads['dense_neurons'][0]} MLP"
        else:  # global layout: per-layer counts (of the first seed)
            shape = f"heads {heads['heads']}, MLP {heads['neurons']} (seed {rs[0]['seed']})"
        rows.append(dict(name=c if c == "dense" or not tags else f"{c} ({', '.join(tags)})", ratio="–" if ratio is None else f"{ratio:.0%}",
                         at="–" if at is None else at, n=len(rs), seeds=",".join(str(r["seed"]) for r in rs),
                         loss=_ms(loss), ppl=_ms(ppl, "{:.1f}"), delta=_ms(delta, "{:+.3f}") if delta else "–",
                         eqwall=_ms(eq_wall, "{:+.3f}") if eq_wall else "–",
                         params=f"{statistics.mean(params):,.0f}", shape=shape,
                         flops=f"{statistics.mean(flops):.2e}", tps=f"{statistics.mean(tps):,.0f}",
                         wall=f"{statistics.mean(wall):.0f}", rss=f"{statistics.mean(rss):,.0f}",
                         pruned_at=",".join("–" if a is None else str(a) for a in at_s),
                         reach="; ".join(reach) if reach else "–", raw_delta=delta, crit=c, r=ratio, pa=at, layout=layout, cal=cal))

    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    made = _plots(results, dense, plots, args.quick)

    uni = json.loads(unigram_cache(records).read_text()) if unigram_cache(records).is_file() else {}
    shards = max(r.get("concurrent_shards", 1) for r in results)
    at_once = "one run at a time" if shards == 1 else f"up to {shards} runs at a time (one sweep process per core)"
    any_r = results[0]
    steps, tps = any_r["max_steps"], any_r["tokens_per_step"]
    tokens = steps * tps
    u0 = uni.get(str(min(dense) if dense else 0), {})
    lines = [SECTION, ""]
    lines += [
        "Command: `python benchmarks/quality.py [filters]` then `python benchmarks/quality.py --report`"
        + (" (with `--quick`: smoke-run numbers, meaningless as quality)" if args.quick else "") + ".",
        f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; records in `{shown(records, ROOT)}` (every number "
        f"below is computed from them), one MLflow experiment `earlycrop-quality{'-quick' if args.quick else ''}` in "
        f"`{shown(Path(args.out) / 'mlflow.db', ROOT)}` (not committed). Machine: {platform.processor() or platform.machine()}, 2 logical cores shared with other jobs, {at_once}, "
        "`torch.set_num_threads(1)`; no GPU. Times are wall-clock on a shared machine: trust them to ±20%.",
        "",
        "**Regime.** `configs/quickstart.yaml` (Llama-style, hidden 128, 4 layers, 8 query heads, intermediate 352, tied "
        "embeddings, eager attention, `gensim:wiki`, byte-level BPE with 2,048 tokens trained on the training split, blocks of "
        f"128) with overrides `{' '.join(REGIME + (QUICK if args.quick else []))}`. "
        "GQA choice: **2 KV heads** (4 query heads per KV group) with `layout: uniform, gqa: per_group`, so every layer keeps "
        "the same number of query heads in every group and the result loads with plain `from_pretrained`. With quickstart's "
        "4 KV heads (2 query heads per group) uniform per-group removal can only express 0% or 50% (30% removes nothing, "
        "70% is invalid). Heads removed are therefore 25% / 50% / 75% for the 30% / 50% / 70% settings (6 / 4 / 2 of 8 "
        "query heads kept per layer); MLP 248 / 176 / 104 of 352 neurons kept (`round_to: 8`).",
        "",
        f"- Dense model: {dense[min(dense)]['summary']['params_dense']:,} parameters (of which 262,144 are the tied "
        "embedding / LM head, which pruning does not touch: it dominates the parameter count and the step time, so "
        "pruned models are only modestly faster per token here)." if dense else "- no dense run yet",
        f"- Budget: {steps} optimizer steps × {MICRO} × {SEQ} tokens = {tokens:,} training tokens for every run"
        + (f" = {tokens / u0['train_tokens']:.2f} epochs over the training text ({u0['train_tokens']:,} tokens, "
           f"{u0['train_docs']} articles; validation {u0['val_docs']} held-out articles, {u0['val_blocks']} blocks, "
           f"{u0['val_tokens_scored']:,} predicted tokens scored)" if u0 else "") + ".",
        "- Schedule: AdamW lr 2e-3, wd 0.1, 30 warm-up steps, cosine to 10%; after a mid-training prune (`auto`) the "
        "pipeline restarts a one-cycle schedule (the paper's rule). `auto`: weight distance measured every 20 steps, "
        "cap 200 steps. Scoring: 4 calibration batches of 8 × 128 from the training split, model in eval mode.",
        "- Training FLOPs = 6 × parameters × tokens (embedding included; dense parameters before an `auto` prune, pruned "
        "after; scoring cost not included). tokens/s = training tokens / training-stage wall time (evaluations every "
        "50 steps included). Wall = seconds from the MLflow run start (after data preparation) to the last evaluation: "
        "scoring + pruning + training + evaluations. Peak RSS = the run's forked process (it includes the imported "
        "libraries, inherited from the sweep process).",
        "- The validation split depends on the seed (the pipeline splits articles with `cfg.seed`), so absolute losses "
        "vary between seeds by the choice of articles. **Δ vs dense** pairs each pruned run with the dense run of the "
        "same seed (same split, same init seed): that is the column to read for the comparison.",
    ]
    if uni:
        lines.append("- Unigram baseline (add-one-smoothed token frequencies of the training split, same tokenizer, scored on "
                     "the same validation blocks): " + "; ".join(
                         f"seed {s}: loss {v['unigram_val_loss']:.3f}, perplexity {v['unigram_val_ppl']:.0f}" for s, v in sorted(uni.items())) + ".")
    lines += ["", "| criterion | removed | prune_at (step) | seeds | val loss | val ppl | Δ vs dense (same seed) | Δ vs dense at equal wall time | kept shape | params | train FLOPs | tokens/s | wall s | peak RSS MiB | reaches dense final loss at step / s |",
              "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for w in rows:
        lines.append(f"| {w['name']} | {w['ratio']} | {w['at']} ({w['pruned_at']}) | {w['seeds']} | {w['loss']} | {w['ppl']} | "
                     f"{w['delta']} | {w['eqwall']} | {w['shape']} | {w['params']} | {w['flops']} | {w['tps']} | {w['wall']} | "
                     f"{w['rss']} | {w['reach']} |")
    lines += ["", "\"Δ vs dense at equal wall time\": the pruned run's final loss minus the dense run's loss (same seed) "
              "interpolated at the wall time the pruned run needed. \"reaches dense final loss\": the first evaluation "
              "(every 50 steps) at which the pruned run's validation loss is at or below the dense run's final one, as "
              "step / seconds; \"never\" = not within the budget.", ""]
    for m in made:
        lines.append(f"![{m.stem}](plots/{m.name})")
    lines.append("")
    lines += _findings(rows, args)
    text = "\n".join(lines).rstrip() + "\n"
    if args.extra:
        text += "\n" + Path(args.extra).read_text().rstrip() + "\n"
    write_section(Path(args.results), SECTION, text)
    print(text)


def _findings(rows, args) -> list[str]:
    """Plain statements computed from the table: who beats whom at 50% by the paired Δ, beyond seed noise."""
    by = {(w["crit"], w["r"], w["pa"], w["layout"], w["cal"]): w for w in rows}
    settings = sorted({(w["pa"], w["layout"], w["cal"]) for w in rows if w["crit"] == "earlycrop"},
                      key=lambda k: (k[2] != CALIBRATION, k[1], str(k[0])))
    out = ["**What the numbers say (computed from the table).**", ""]
    for ratio in (0.3, 0.5, 0.7):
        for at, layout, cal in settings:
            ec = by.get(("earlycrop", ratio, at, layout, cal))
            if not ec or not ec["raw_delta"]:
                continue
            # against every other criterion in the same setting; a calibration variant also against earlycrop's default
            others = [(o, by.get((o, ratio, at, layout, cal))) for o in ("random", "magnitude", "snip", "grasp", "fisher", "activation")]
            if cal != CALIBRATION:
                others.append((f"earlycrop ({CALIBRATION} batches)", by.get(("earlycrop", ratio, at, layout, CALIBRATION))))
            setting = f"{ratio:.0%}, prune_at {at}, {layout}" + ("" if cal == CALIBRATION else f", {cal} calibration batches")
            for other, ot in others:
                if not ot or not ot["raw_delta"]:
                    continue
                a, b = ec["raw_delta"], ot["raw_delta"]
                diff = statistics.mean(a) - statistics.mean(b)
                noise = max((statistics.stdev(a) if len(a) > 1 else 0.0), (statistics.stdev(b) if len(b) > 1 else 0.0))
                if min(len(a), len(b)) < 2:
                    verdict = "one seed only: no noise estimate, no verdict"
                else:
                    verdict = ("earlycrop better" if diff < -noise else "earlycrop WORSE" if diff > noise else "within seed noise")
                out.append(f"- {setting}: earlycrop − {other} = {diff:+.3f} val loss "
                           f"(larger seed std {noise:.3f}, n={len(a)}/{len(b)}): {verdict}.")
    return out + [""]


def _plots(results, dense, plots: Path, quick: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "_quick" if quick else PLOT_SUFFIX
    made = []
    # quality vs fraction removed, one line per criterion, one panel per prune_at
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    dl = [r["summary"]["val_loss"] for r in dense.values()]
    for ax, at in zip(axes, PRUNE_AT):
        for crit in CRITERIA:
            xs, ys, es = [], [], []
            for ratio in sorted({0.3, 0.5, 0.7}):
                v = [r["summary"]["val_loss"] - dense[r["seed"]]["summary"]["val_loss"] for r in results
                     if r["criterion"] == crit and r["ratio"] == ratio and r["prune_at"] == at and r["seed"] in dense
                     and is_main_variant(r)]
                if v:
                    xs.append(ratio); ys.append(statistics.mean(v)); es.append(statistics.stdev(v) if len(v) > 1 else 0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=crit)
        ax.axhline(0.0, color="k", lw=1, ls="--", label="dense (same seed)")
        ax.set_title(f"prune_at: {at} (layout uniform)")
        ax.set_xlabel("fraction of heads and MLP neurons removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final val loss − dense (same seed)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Quality vs fraction removed (mean ± std over seeds; dense val loss {statistics.mean(dl):.3f})" if dl else "Quality vs fraction removed")
    fig.tight_layout()
    p = plots / f"quality_vs_removed{suffix}.png"
    fig.savefig(p, dpi=80); plt.close(fig); made.append(p)

    # loss curves at 50%, seed 0 (or the lowest seed present): vs step and vs wall time
    seed = min(dense) if dense else 0
    for at in PRUNE_AT:
        sel = [r for r in results if r["seed"] == seed and (r["criterion"] == "dense" or (r["ratio"] == 0.5 and r["prune_at"] == at and is_main_variant(r)))]
        if len(sel) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for r in sorted(sel, key=lambda r: (r["criterion"] != "dense", r["criterion"])):
            h = r["val_history"]
            style = dict(color="k", lw=2) if r["criterion"] == "dense" else dict(lw=1)
            axes[0].plot([x[0] for x in h], [x[1] for x in h], label=r["criterion"], **style)
            axes[1].plot([x[2] for x in h], [x[1] for x in h], label=r["criterion"], **style)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        axes[0].set_xlabel("optimizer step (= tokens / 1,024)")
        axes[1].set_xlabel("wall s since run start (scoring + training + evals)")
        axes[0].set_ylabel("validation loss")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Validation loss curves, 50% removed, prune_at {at}, seed {seed}")
        fig.tight_layout()
        p = plots / f"loss_curves_50_at{at}{suffix}.png"
        fig.savefig(p, dpi=80); plt.close(fig); made.append(p)
    return made


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"need a positive whole number, not {text!r}")
    return int(text)


def _prune_ats(text: str) -> list[str]:
    moments = text.split(",")
    bad = [m for m in moments if m != "auto" and not m.isdigit()]
    if bad:
        raise argparse.ArgumentTypeError(f"pruning moments are 0, auto or a step number, not {bad}")
    return moments


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N (e.g. 0/2), not {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return index, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="sweep folder (default runs/quality, or runs/quality-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 runs of 40 steps")
    ap.add_argument("--criteria", type=lambda s: s.split(","), default=None, help="comma list; 'dense' included")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=None)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--prune-at", type=_prune_ats, default=None,
                    help="comma list of pruning moments: 0, auto or a step number (default 0,auto)")
    ap.add_argument("--layout", default="uniform", choices=["uniform", "global"],
                    help="selection layout of the pruned runs (global: one ranking across layers, as the paper; runs get a -global suffix)")
    ap.add_argument("--calibration-batches", type=_positive, default=CALIBRATION,
                    help=f"calibration batches the pruned runs score on ({CALIBRATION}: the main sweep); other counts get a -cb<N> suffix")
    ap.add_argument("--max-steps", type=int, default=600,
                    help="training steps of every run (600: the main sweep); another budget uses its own folder "
                         "runs/quality-steps<N> and its own RESULTS.md section")
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                    help="run only every N-th pending run starting at I: start N processes (I = 0..N-1) to use N cores")
    add_report_args(ap, ROOT)
    args = ap.parse_args()
    if args.max_steps != 600:
        set_budget(args.max_steps)
    if args.out is None:
        args.out = str(ROOT / "runs" / ("quality-quick" if args.quick else
                                        "quality" if args.max_steps == 600 else f"quality-steps{args.max_steps}"))
    args.records = default_records(args, ROOT, "quality" if args.max_steps == 600 else f"quality-steps{args.max_steps}")
    if args.report:
        report(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
