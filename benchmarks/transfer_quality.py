"""Transfer sweep (issue 4, scenario 2): prune a TRAINED model, then fine-tune it on a new domain.

Starts from the dense Llama-style models that `benchmarks/quality.py` trained on gensim's Wikipedia text
(`runs/quality/runs/dense-s{0,1,2}/model`, each with its own tokenizer) and fine-tunes them with the pipeline
(`pipeline.run.run`) on the Lee news corpus (`gensim:lee`): dense (`prune_at: never`) and pruned before
fine-tuning (`prune_at: 0`, scores from calibration batches of the news training split) with every criterion,
the same number of fine-tuning tokens for every run. The zero-shot validation loss on the news text (the
dense wiki model, and each pruned model right after pruning, before any fine-tuning) is measured in the run's
child process (these runs predate the pipeline's own step-0 evaluation, `val_loss_at_start`).

    python benchmarks/transfer_quality.py --quick             # smoke run (3 tiny runs, own folder)
    python benchmarks/transfer_quality.py --ratios 0.5        # dense + 7 criteria at 50%, 3 seeds (resumable)
    python benchmarks/transfer_quality.py --ratios 0.7        # 7 criteria at 70%, seeds 0 and 1
    python benchmarks/transfer_quality.py --report            # write the section of benchmarks/RESULTS.md
    python benchmarks/transfer_quality.py --kd                # issue 13: dense, earlycrop, earlycrop+kd at 50%, 3 seeds
    python benchmarks/transfer_quality.py --kd --report       # write the distillation section of benchmarks/RESULTS.md

`--kd` (issue 13, item 4) runs per seed, at 50% removed: `dense`, `earlycrop` (prune_at 0) and `earlycrop+kd`: the
same cut, fine-tuned with logit + hidden-state distillation from the dense wiki model as built (before the cut;
`train.distill.*`, see `KD`); and `earlycrop+kd-news`, the same with the seed's dense run (the wiki model
fine-tuned on news) as the teacher. Its runs go to `runs/transfer-kd` and `benchmarks/records/transfer-kd.jsonl`, with
their own dense runs (the dense wiki models are retrained on the machine that runs them), and to their own
RESULTS.md section, so the records and section of the main transfer sweep are left as they are.

Each finished run is appended to `benchmarks/records/transfer.jsonl` (`--records`); a rerun skips runs already there. Every run is an MLflow
run of one experiment in one sqlite store, `<out>/mlflow.db`. Each run executes in a forked child process, so a
crash does not end the sweep (traceback in `<out>/failures.log`) and the peak RSS is that run's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quality import CONFIG, CRITERIA, _flops, _interp, _ms, _reach  # noqa: E402
from results_file import write_section  # noqa: E402
from sweep_runner import (add_report_args, default_records, load_results, metric_histories, plan_counts,  # noqa: E402
                          run_forked, shown)

DENSE_ROOT = ROOT / "runs" / "quality" / "runs"
SECTION = "## Transfer: prune a wiki-trained model, fine-tune on news (transfer_quality.py)"
SEEDS_FOR = {0.5: [0, 1, 2], 0.7: [0, 1]}

# quickstart.yaml with the model taken from a folder (no family / init), news text, quality.py's selection
# settings, and a fine-tuning budget: 300 steps of 8 × 128 tokens (~2.7 epochs of the news training split).
TRANSFER = [
    "model.family=", "model.init={}", "model.attn_implementation=eager",
    "data.source=gensim:lee", "data.validation_fraction=0.1",
    "prune.layout=uniform", "prune.gqa=per_group", "prune.round_to=8",
    "train.max_steps=300", "train.lr=5e-4", "train.warmup_steps=20", "train.scheduler=cosine",
    "train.eval_every=25", "train.eval_batches=16", "train.log_every=25", "train.checkpoint_every=0",
]
# issue 13 item 4: the variants a criterion name stands for, each = (the pruning criterion, extra overrides)
KD = ["train.distill.enabled=true", "train.distill.logits=1.0", "train.distill.hidden=1.0", "train.distill.task=1.0"]
VARIANTS = {"earlycrop+kd": ("earlycrop", KD),
            # the same, but the teacher is the dense wiki model already fine-tuned on news: this sweep's own dense run
            # of the seed (its model/ folder, so that run must be done first), i.e. a teacher better than the student
            "earlycrop+kd-news": ("earlycrop", KD)}
NEWS_TEACHER = "earlycrop+kd-news"
KD_NAMES = ("dense", "earlycrop", "earlycrop+kd", NEWS_TEACHER)
KD_SECTION = "## Transfer with distillation from the dense wiki model (transfer_quality.py --kd)"
QUICK = ["train.max_steps=30", "train.warmup_steps=3", "train.eval_every=10", "train.eval_batches=4",
         "train.log_every=10", "prune.calibration_batches=2"]


def run_key(criterion: str, ratio: float | None, seed: int) -> str:
    return f"dense-s{seed}" if criterion == "dense" else f"{criterion}-r{ratio}-s{seed}"


def planned_runs(quick: bool, kd: bool = False) -> list[dict]:
    if kd:
        return [dict(criterion=c, ratio=None if c == "dense" else 0.5, seed=seed)
                for seed in ([0] if quick else [0, 1, 2]) for c in KD_NAMES]
    if quick:
        return [dict(criterion="dense", ratio=None, seed=0), dict(criterion="earlycrop", ratio=0.5, seed=0),
                dict(criterion="random", ratio=0.5, seed=0)]
    runs = []
    for ratio, seeds in SEEDS_FOR.items():
        for seed in seeds:
            runs += [dict(criterion="dense", ratio=None, seed=seed)] if ratio == 0.5 else []
            runs += [dict(criterion=c, ratio=ratio, seed=seed) for c in CRITERIA]
    return runs


def overrides_for(spec: dict, out: Path, quick: bool, dense_root: Path, extra: list[str]) -> list[str]:
    key = run_key(**spec)
    ov = list(TRANSFER) + (QUICK if quick else []) + list(extra)
    model = dense_root / f"dense-s{spec['seed']}" / "model"
    ov += [f"model.name_or_path={model}", f"seed={spec['seed']}",
           f"output_dir={out / 'runs' / key}", f"run_name={key}", f"experiment=earlycrop-transfer{'-quick' if quick else ''}",
           f"tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"]
    if spec["criterion"] == "dense":
        return ov + ["prune.prune_at=never"]
    criterion, more = VARIANTS.get(spec["criterion"], (spec["criterion"], []))
    return ov + [f"prune.criterion={criterion}", f"prune.heads={spec['ratio']}", f"prune.mlp={spec['ratio']}",
                 "prune.prune_at=0"] + list(more) + (
        [f"train.distill.teacher={out / 'runs' / run_key('dense', None, spec['seed']) / 'model'}"]
        if spec["criterion"] == NEWS_TEACHER else [])


def zero_shot(cfg, plan_path: Path) -> dict:
    """Validation loss on the run's own news validation blocks of the wiki model before fine-tuning: dense,
    or pruned with the plan the run saved (same blocks and batches as the pipeline's evaluation)."""
    from types import SimpleNamespace

    import torch

    import earlycrop
    from pipeline import data as data_lib
    from pipeline.modeling import load_model_tokenizer
    from pipeline.train import evaluate

    tok = load_model_tokenizer(cfg.model.name_or_path)
    docs = data_lib.load_documents(cfg.data.source)
    train_docs, val_docs = data_lib.split_documents(docs, cfg.data.validation_fraction, cfg.seed)
    val = data_lib.pack_causal_lm(val_docs, tok, cfg.data.seq_len)
    blocks = {c: torch.tensor(list(val[c])) for c in ("input_ids", "attention_mask", "labels") if c in val.column_names}
    model = earlycrop.from_pretrained(cfg.model.name_or_path, attn_implementation=cfg.model.attn_implementation)
    if plan_path.is_file():
        earlycrop.prune(model, earlycrop.Plan.load(plan_path))
    single = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), reduce=lambda t, reduction: t)
    loss = evaluate(single, model, blocks, cfg.train.micro_batch_size, cfg.train.eval_batches)["val_loss"]
    train_tokens = len(data_lib.pack_causal_lm(train_docs, tok, cfg.data.seq_len)) * cfg.data.seq_len
    return {"val_loss": loss, "train_tokens": train_tokens, "val_blocks": len(val), "train_docs": len(train_docs),
            "val_docs": len(val_docs)}


def _child(spec: dict, out: str, quick: bool, dense_root: str, extra: list[str], experiment: str | None,
           result_path: str) -> None:
    """In the forked child: run the pipeline in-process, measure the zero-shot loss, collect histories from MLflow."""
    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.run import run

    overrides = overrides_for(spec, Path(out), quick, Path(dense_root), extra)
    cfg = load_config(CONFIG, overrides + ([f"experiment={experiment}"] if experiment else []))
    t0 = time.time()
    summary = run(cfg)
    wall = time.time() - t0
    run_dir = Path(cfg.output_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    # pipeline names; metric_histories maps them to MLflow's (`val_loss` -> `val/loss`, `params_pruned` -> `params/pruned`)
    hist = metric_histories(run_dir, ("val_loss", "train_loss", "params_pruned", "params_dense",
                                      "distill_task", "distill_logits", "distill_hidden"))
    if not hist["val_loss"]:
        raise RuntimeError(f"no validation history in MLflow for {run_dir}: metric names changed?")
    val = hist["val_loss"]
    ready = hist["params_pruned"] or hist["params_dense"]  # logged when the model is ready to train
    counts = plan_counts(run_dir)
    zs = zero_shot(cfg, run_dir / "plan.json")
    wiki = Path(cfg.model.name_or_path).parent / "summary.json"
    record = {**spec, "key": run_key(**spec), "quick": quick, "summary": summary, "wall_s": wall,
              "mlflow_run_id": info["run_id"], "val_history": val, "train_history": hist["train_loss"],
              "zero_shot": {**zs, "t": ready[0][2] if ready else 0.0}, "counts": counts, "overrides": extra,
              "wiki_val_loss": json.loads(wiki.read_text())["val_loss"] if wiki.is_file() else None,
              "max_steps": cfg.train.max_steps, "tokens_per_step": cfg.train.micro_batch_size * cfg.data.seq_len,
              "train_cfg": cfg.train.model_dump(), "calibration_batches": cfg.prune.calibration_batches,
              "variant_overrides": VARIANTS.get(spec["criterion"], (None, []))[1],
              "distill_history": {k: hist[f"distill_{k}"] for k in ("task", "logits", "hidden") if hist[f"distill_{k}"]},
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(result_path).write_text(json.dumps(record))


def sweep(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = [s for s in (args.seeds or [0, 1, 2]) if not (Path(args.dense_root) / f"dense-s{s}" / "model").is_dir()]
    if missing:
        raise SystemExit(f"no trained dense model for seeds {missing} under {args.dense_root}: run benchmarks/quality.py first")
    done = {r["key"] for r in load_results(args.records)}
    todo = [s for s in planned_runs(args.quick, args.kd)
            if (not args.criteria or s["criterion"] in args.criteria)
            and (s["criterion"] == "dense" or not args.ratios or s["ratio"] in args.ratios)
            and (args.seeds is None or s["seed"] in args.seeds) and run_key(**s) not in done]
    print(f"{len(done)} runs already in {args.records}; {len(todo)} to run", flush=True)
    for i, spec in enumerate(todo, 1):
        key = run_key(**spec)
        print(f"[{i}/{len(todo)}] {key} ...", flush=True)
        t0 = time.time()
        experiment = f"earlycrop-transfer-kd{'-quick' if args.quick else ''}" if args.kd else None
        record = run_forked(out, args.records, key, _child, spec, str(out), args.quick, args.dense_root, args.set,
                            experiment, failed_note="; not recorded, a rerun retries it")
        if record is None:
            continue
        s = record["summary"]
        print(f"    zero-shot {record['zero_shot']['val_loss']:.4f} → val_loss {s['val_loss']:.4f} "
              f"params {s['params_final']:,} ({time.time() - t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------- report


def _curve(r: dict) -> list:
    """Validation history with the zero-shot point (step 0, before fine-tuning) in front."""
    return [(0, r["zero_shot"]["val_loss"], r["zero_shot"]["t"])] + r["val_history"]


def _shape(counts) -> str:
    if counts is None:
        return "dense"
    return f"{counts['heads'][0]}/{counts['dense_heads'][0]} heads, {counts['neurons'][0]}/{counts['dense_neurons'][0]} MLP"


def _rows(results: list[dict], dense: dict) -> list[dict]:
    groups = defaultdict(list)
    for r in results:
        groups[(r["criterion"], r["ratio"])].append(r)
    rows = []
    for c, ratio in sorted(groups, key=lambda k: (k[0] != "dense", k[1] or 0, CRITERIA.index(k[0]) if k[0] in CRITERIA else -1)):
        rs = sorted(groups[(c, ratio)], key=lambda r: r["seed"])
        paired = [r for r in rs if r["seed"] in dense and c != "dense"]
        d_final = {r["seed"]: r["summary"]["val_loss"] - dense[r["seed"]]["summary"]["val_loss"] for r in paired}
        d_zs = {r["seed"]: r["zero_shot"]["val_loss"] - dense[r["seed"]]["zero_shot"]["val_loss"] for r in paired}
        best = [min(_curve(r), key=lambda x: x[1]) for r in rs]
        reach, eq_wall = [], []
        for r in paired:
            d = dense[r["seed"]]
            hit = _reach({"val_history": _curve(r)}, d["summary"]["val_loss"])
            reach.append("never" if hit is None else f"{hit[0]} / {hit[1]:.0f}s")
            dl = _interp(d["val_history"], r["val_history"][-1][2])
            if dl is not None:
                eq_wall.append(r["summary"]["val_loss"] - dl)
        tok = [r["summary"]["steps"] * r["tokens_per_step"] for r in rs]
        rows.append(dict(
            crit=c, r=ratio, d_final=d_final, d_zs=d_zs, name=c, ratio="–" if ratio is None else f"{ratio:.0%}",
            seeds=",".join(str(r["seed"]) for r in rs), zs=_ms([r["zero_shot"]["val_loss"] for r in rs]),
            dzs=_ms(list(d_zs.values()), "{:+.3f}") if d_zs else "–", loss=_ms([r["summary"]["val_loss"] for r in rs]),
            ppl=_ms([r["summary"]["val_perplexity"] for r in rs], "{:.1f}"),
            dfinal=_ms(list(d_final.values()), "{:+.3f}") if d_final else "–",
            best=_ms([b[1] for b in best]) + f" (step {','.join(str(b[0]) for b in best)})",
            eqwall=_ms(eq_wall, "{:+.3f}") if eq_wall else "–", reach="; ".join(reach) if reach else "–",
            shape=_shape(rs[0]["counts"]), params=f"{statistics.mean(r['summary']['params_final'] for r in rs):,.0f}",
            flops=f"{statistics.mean(_flops(r) for r in rs):.2e}",
            tps=f"{statistics.mean(t / r['summary']['time_train_s'] for t, r in zip(tok, rs)):,.0f}",
            score=f"{statistics.mean(r['summary'].get('time_score_s', 0.0) for r in rs):.1f}",
            wall=f"{statistics.mean(r['val_history'][-1][2] for r in rs):.0f}",
            rss=f"{statistics.mean(r['summary'].get('peak_rss_bytes', 0) / 2**20 for r in rs):,.0f}"))
    return rows


def _verdicts(rows: list[dict], field: str, label: str) -> list[str]:
    """earlycrop vs each other criterion on one paired-Δ column (seeds both have); beyond noise = |mean diff| >
    the larger seed std of the two Δ columns (quality.py's rule)."""
    by = {(w["crit"], w["r"]): w for w in rows}
    lines = []
    for ratio in sorted({w["r"] for w in rows if w["r"] is not None}):
        ec = by.get(("earlycrop", ratio))
        if not ec or not ec[field]:
            continue
        ranked = sorted((statistics.mean(w[field].values()), w["crit"]) for w in rows if w["r"] == ratio and w[field])
        worse = []
        place = [c for _, c in ranked].index("earlycrop") + 1
        lines.append(f"- {label}, {ratio:.0%} removed: ranking by mean Δ vs dense (best first): "
                     + ", ".join(f"{c} {m:+.3f}" for m, c in ranked) + f". earlycrop is #{place} of {len(ranked)}.")
        for other in CRITERIA[1:]:
            ot = by.get((other, ratio))
            if not ot or not ot[field]:
                continue
            seeds = sorted(set(ec[field]) & set(ot[field]))
            if not seeds:
                continue
            a, b = [ec[field][s] for s in seeds], [ot[field][s] for s in seeds]
            diff = statistics.mean(a) - statistics.mean(b)
            noise = max(statistics.stdev(a), statistics.stdev(b)) if len(seeds) > 1 else 0.0
            wins = sum(x < y for x, y in zip(a, b))
            verdict = ("one seed only: no verdict" if len(seeds) < 2 else "earlycrop better" if diff < -noise
                       else "earlycrop WORSE" if diff > noise else "within seed noise")
            worse += [other] if verdict == "earlycrop WORSE" else []
            lines.append(f"  - earlycrop − {other} = {diff:+.3f} (larger seed std {noise:.3f}; earlycrop lower in "
                         f"{wins}/{len(seeds)} seeds): {verdict}.")
        lines.append(f"  - **earlycrop loses beyond seed noise to: {', '.join(worse) or 'none'}.**")
    return lines


def report(args) -> None:
    out = Path(args.out)
    results = [r for r in load_results(args.records) if r.get("quick", False) == args.quick]
    if not results:
        raise SystemExit(f"no results in {args.records}")
    dense = {r["seed"]: r for r in results if r["criterion"] == "dense"}
    rows = _rows(results, dense)
    made = _plots(results, dense, Path(args.plots), args.quick)
    r0, d0 = results[0], (dense[min(dense)] if dense else results[0])
    zs, tokens, t = d0["zero_shot"], r0["max_steps"] * r0["tokens_per_step"], r0["train_cfg"]
    wiki = {s: d.get("wiki_val_loss") for s, d in sorted(dense.items())}
    lines = [SECTION, "",
             "Command: `nice -n 5 python benchmarks/transfer_quality.py [filters]` then `python benchmarks/transfer_quality.py "
             "--report`" + (" (with `--quick`: smoke-run numbers, meaningless as quality)" if args.quick else "") + ".",
             f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; records in `{shown(args.records, ROOT)}`, runs in `{out}` (one MLflow "
             f"experiment `earlycrop-transfer{'-quick' if args.quick else ''}` in `{out}/mlflow.db`). Machine: "
             f"{platform.processor() or platform.machine()}, 2 logical cores shared with other jobs (one of them busy with "
             "another sweep), one run at a time, `torch.set_num_threads(1)`; no GPU. Wall times: trust them to ±20%.", "",
             "**Scenario.** Prune a model that is already trained, then fine-tune it on a new domain. Start: the dense "
             "models of the Quality section (`runs/quality/runs/dense-s{seed}/model`: Llama-style, 967,808 parameters, "
             "8 query / 2 KV heads, intermediate 352, trained 600 steps on `gensim:wiki` with seed = this seed; wiki "
             "validation loss " + ", ".join(f"s{s} {v:.3f}" for s, v in wiki.items() if v is not None) + "). New domain: "
             "`gensim:lee` (news stories), split by story with the run's seed, tokenized with the model's own tokenizer.",
             f"- Overrides of `configs/quickstart.yaml`: `{' '.join(TRANSFER + (QUICK if args.quick else []) + r0.get('overrides', []))}`, "
             "plus `model.name_or_path=<dense model>`, `seed`, and `prune.prune_at=never` (dense fine-tuning) or "
             "`prune.prune_at=0 prune.criterion=C prune.heads=prune.mlp=R`. With 4 query heads per KV group and uniform "
             "per-group removal, 50% / 70% remove 4 / 6 of 8 query heads per layer (50% / 75%); see the kept shape.",
             f"- Budget: {r0['max_steps']} steps × 8 × 128 = {tokens:,} fine-tuning tokens for every run = "
             f"{tokens / zs['train_tokens']:.1f} epochs of the news training split (seed {d0['seed']}: {zs['train_docs']} stories, "
             f"{zs['train_tokens']:,} tokens; validation {zs['val_docs']} stories, {zs['val_blocks']} blocks, of which "
             f"{min(zs['val_blocks'] // 8, t['eval_batches']) * 8} are evaluated every {t['eval_every']} steps). AdamW lr "
             f"{t['lr']:g}, wd {t['weight_decay']:g}, {t['warmup_steps']} warm-up steps, {t['scheduler']} to 10%. Scoring: "
             f"{r0['calibration_batches']} calibration batches of 8 × 128 from the news training split, model in eval mode.",
             "- **Zero-shot** = validation loss on the news text before any fine-tuning (measured by the script; the runs "
             "predate the pipeline's own step-0 evaluation): the dense wiki model, or the wiki model right after pruning with the "
             "run's plan. **Δ vs dense** pairs each run with the dense run of the same seed (same model, same split).",
             "- Train FLOPs = 6 × parameters × fine-tuning tokens (scoring not included). tokens/s = tokens / training-stage "
             "wall time (evaluations included). Wall = seconds from the MLflow run start to the last evaluation (scoring + "
             "pruning + fine-tuning + evaluations). Peak RSS = the run's forked process.", "",
             "| criterion | removed | seeds | zero-shot val loss | Δ zero-shot vs dense | final val loss | final ppl | Δ final vs dense "
             "(same seed) | Δ vs dense at equal wall time | best val loss (step) | reaches dense final loss at step / s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {w['name']} | {w['ratio']} | {w['seeds']} | {w['zs']} | {w['dzs']} | {w['loss']} | {w['ppl']} | {w['dfinal']} | "
              f"{w['eqwall']} | {w['best']} | {w['reach']} |" for w in rows]
    lines += ["", "| criterion | removed | kept shape | params | train FLOPs | tokens/s | scoring s | wall s | peak RSS MiB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {w['name']} | {w['ratio']} | {w['shape']} | {w['params']} | {w['flops']} | {w['tps']} | {w['score']} | "
              f"{w['wall']} | {w['rss']} |" for w in rows]
    lines += ["", f"\"reaches dense final loss\": the first evaluation (step 0 = zero-shot, then every {t['eval_every']} steps) at which the "
              "pruned run's validation loss is at or below the dense fine-tuned run's final loss (same seed); \"never\" = "
              "not within the budget. \"Δ vs dense at equal wall time\": the pruned run's final loss minus the dense run's "
              "loss interpolated at the wall time the pruned run needed.", ""]
    lines += [f"![{m.stem}](plots/{m.name})" for m in made] + [""]
    lines += ["**What the numbers say (computed from the table).**", ""]
    if dense:
        dz = [d["zero_shot"]["val_loss"] for d in dense.values()]
        df = [d["summary"]["val_loss"] for d in dense.values()]
        lines.append(f"- Dense: zero-shot news loss {_ms(dz)} → {_ms(df)} after fine-tuning (n={len(dz)}).")
    for w in rows:
        if w["d_final"] and w["crit"] != "dense" and statistics.mean(w["d_final"]) < 0:
            lines.append(f"- {w['crit']} at {w['ratio']} ends BELOW dense ({w['dfinal']}).")
    lines += _verdicts(rows, "d_zs", "Zero-shot (right after pruning)")
    lines += _verdicts(rows, "d_final", "After fine-tuning")
    text = "\n".join(lines).rstrip() + "\n"
    if args.extra:
        text += "\n" + Path(args.extra).read_text().rstrip() + "\n"
    write_section(Path(args.results), SECTION, text)
    print(text)


def _seed_std(values: list[float], fmt: str = "{:+.3f}") -> str:
    return _ms(values, fmt) if values else "–"


def kd_report(args) -> None:
    """The `--kd` section: per seed and mean, the final news validation loss of dense / earlycrop / earlycrop+kd
    at 50%, the paired differences, and the time each took."""
    results = [r for r in load_results(args.records) if r.get("quick", False) == args.quick]
    if not results:
        raise SystemExit(f"no results in {args.records}")
    by = {(r["criterion"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    loss = lambda c, s: by[(c, s)]["summary"]["val_loss"]  # noqa: E731
    r0 = results[0]
    lines = [KD_SECTION, "",
             "Issue 13, item 4. Command: `OMP_NUM_THREADS=1 python benchmarks/quality.py --criteria dense --seeds 0,1,2 "
             "--records <scratch>` (the dense wiki models, `runs/quality/runs/dense-s{seed}/model`, 600 steps as in the "
             "Transfer section), then `OMP_NUM_THREADS=1 python benchmarks/transfer_quality.py --kd [--seeds S]` and "
             "`python benchmarks/transfer_quality.py --kd --report --extra benchmarks/records/transfer-kd.notes.md`" + (" (with `--quick`: smoke-run numbers, meaningless "
             "as quality)" if args.quick else "") + ".",
             f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; records in `{shown(args.records, ROOT)}`, "
             f"runs in `{shown(Path(args.out), ROOT)}`. Machine: {platform.processor() or platform.machine()}, 2 logical cores "
             "shared with other jobs (a CI run), one run at a time, one torch thread; no GPU. Wall times: trust them to ±20%.",
             "",
             "Same scenario, split, budget and recipe as the Transfer section above (300 steps × 8 × 128 news tokens, lr 5e-4, "
             "cosine; 50% of heads and MLP neurons removed, uniform per KV group, earlycrop scores from 4 news calibration "
             "batches, prune_at 0), run anew here with the dense runs it is paired with. `earlycrop+kd` = the same cut, "
             f"fine-tuned with `{' '.join(KD)}`: loss = task + KL(student ‖ teacher logits, temperature 2) + per-layer "
             "hidden-state MSE, the teacher the dense wiki model as built (before the cut), frozen, float32, one extra "
             "forward per step. `earlycrop+kd-news` (where it ran: an extra, not asked for) = the same with "
             "`train.distill.teacher=` this sweep's dense run of the seed, i.e. the dense wiki model already fine-tuned on "
             "news (a teacher better than the student on the target domain; it costs that dense fine-tuning first). "
             "Validation loss = the news task loss (cross-entropy) on the same "
             f"{min(r0['zero_shot']['val_blocks'] // 8, r0['train_cfg']['eval_batches']) * 8} validation blocks for every run.",
             "",
             ]
    names = [c for c in KD_NAMES if any((c, s) in by for s in seeds)]
    pairs = [(c, "dense") for c in names if c != "dense"] + [(c, "earlycrop") for c in names if c.startswith("earlycrop+")]
    lines += ["| seed | " + " | ".join(f"{c} final val loss" for c in names) + " | "
              + " | ".join(f"{a} − {b}" for a, b in pairs) + " | zero-shot dense / pruned |",
              "|---|" + "---:|" * (len(names) + len(pairs)) + "---|"]
    diffs = {p: [] for p in pairs}
    for s in seeds:
        cells = [f"{loss(c, s):.3f}" if (c, s) in by else "–" for c in names]
        for a, b in pairs:
            if (a, s) in by and (b, s) in by:
                diffs[(a, b)].append(loss(a, s) - loss(b, s))
                cells.append(f"{diffs[(a, b)][-1]:+.3f}")
            else:
                cells.append("–")
        zs = " / ".join(f"{by[(c, s)]['zero_shot']['val_loss']:.3f}" for c in ("dense", "earlycrop") if (c, s) in by)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {zs} |")
    means = [_ms([loss(c, s) for s in seeds if (c, s) in by]) for c in names]
    lines.append("| mean ± sd | " + " | ".join(means + [_seed_std(diffs[p]) for p in pairs]) + " | |")
    lines += ["", "| variant | seeds | params | training s (mean) | wall s (mean) | tokens/s | last logged distill terms "
              "(task / logits / hidden) |", "|---|---|---:|---:|---:|---:|---|"]
    for c in names:
        rs = [by[(c, s)] for s in seeds if (c, s) in by]
        tps = statistics.mean(r["summary"]["steps"] * r["tokens_per_step"] / r["summary"]["time_train_s"] for r in rs)
        dh = rs[0].get("distill_history") or {}
        terms = " / ".join(f"{statistics.mean(r['distill_history'][k][-1][1] for r in rs):.3f}" if k in dh else "–"
                           for k in ("task", "logits", "hidden")) if dh else "–"
        lines.append(f"| {c} | {','.join(str(r['seed']) for r in rs)} | {statistics.mean(r['summary']['params_final'] for r in rs):,.0f} | "
                     f"{statistics.mean(r['summary']['time_train_s'] for r in rs):.0f} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {tps:,.0f} | {terms} |")
    steps = sorted({st for r in results for st, _, _ in r["val_history"]})
    marks = [st for st in steps if st % 100 == 0] or steps
    lines += ["", "Mean news validation loss along fine-tuning (step 0 = right after the cut, before any fine-tuning):", "",
              "| variant | " + " | ".join(f"step {st}" for st in marks) + " |", "|---|" + "---:|" * len(marks)]
    for c in names:
        rs = [by[(c, s)] for s in seeds if (c, s) in by]
        if rs:
            cells = []
            for st in marks:
                v = [x for r in rs for s2, x, _ in r["val_history"] if s2 == st]
                cells.append(f"{statistics.mean(v):.3f}" if v else "–")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    done_at = sorted(r["finished_at"] for r in results)
    lines += ["", f"Runs finished {done_at[0]} – {done_at[-1]} (machine local time, UTC).", ""]
    lines += ["Training s = the pipeline's training stage (evaluations included; the teacher's forwards included for "
              "the +kd variants). Wall s = the whole `run()` in the forked child (data, scoring, pruning, training, evaluations, "
              "saving). Differences are paired by seed (same wiki model, same news split).", "",
              "**What the numbers say.**", ""]
    gap = diffs.get(("earlycrop", "dense"), [])
    for c in names:
        d = diffs.get((c, "earlycrop"), [])
        if not d:
            continue
        m, sd = statistics.mean(d), (statistics.stdev(d) if len(d) > 1 else 0.0)
        verdict = ("distillation helped" if m < 0 and (len(d) < 2 or abs(m) > sd)
                   else "distillation HURT" if m > 0 and (len(d) < 2 or abs(m) > sd)
                   else "no difference beyond seed noise")
        line = (f"- {c} − earlycrop = {m:+.3f} ± {sd:.3f} (n={len(d)}; {c} lower in {sum(x < 0 for x in d)}/{len(d)} "
                f"seeds): **{verdict}**.")
        if gap and (c, "dense") in diffs and diffs[(c, "dense")]:
            g, closed = statistics.mean(gap), statistics.mean(gap) - statistics.mean(diffs[(c, "dense")])
            line += (f" Of earlycrop's {g:+.3f} gap to dense it closes {closed:+.3f}" + (f" ({closed / g:.0%})." if g > 0 else ".")
                     if closed >= 0 else f" It widens earlycrop's {g:+.3f} gap to dense by {-closed:.3f}.")
        lines.append(line)
    if len(seeds) < 3:
        lines.append(f"- Only seed(s) {', '.join(map(str, seeds))} ran (time box); the issue asked for 3.")
    text = "\n".join(lines).rstrip() + "\n"
    if args.extra:
        text += "\n" + Path(args.extra).read_text().rstrip() + "\n"
    results_path = Path(args.results)
    if KD_SECTION not in results_path.read_text().splitlines():
        # first time: right after the Transfer section (write_section would append at the end)
        lines_all = results_path.read_text().splitlines()
        start = lines_all.index(SECTION)
        end = next((i for i in range(start + 1, len(lines_all)) if lines_all[i].startswith("## ")), len(lines_all))
        lines_all[end:end] = [KD_SECTION, ""]
        results_path.write_text("\n".join(lines_all) + "\n")
    write_section(results_path, KD_SECTION, text)
    print(text)


def _plots(results: list[dict], dense: dict, plots: Path, quick: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    suffix, made = "_quick" if quick else "", []
    ratio = 0.5
    sel = [r for r in results if r["criterion"] == "dense" or r["ratio"] == ratio]
    if len(sel) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        seed = min(r["seed"] for r in sel)
        for crit in ["dense"] + CRITERIA:
            rs = [r for r in sel if r["criterion"] == crit]
            if not rs:
                continue
            style = dict(color="k", lw=2.2) if crit == "dense" else dict(lw=1.2)
            steps = sorted({s for r in rs for s, _, _ in _curve(r)})
            mean = [statistics.mean(v for r in rs for s2, v, _ in _curve(r) if s2 == s) for s in steps]
            axes[0].plot(steps, mean, marker=".", label=f"{crit} (n={len(rs)})", **style)
            one = [r for r in rs if r["seed"] == seed]
            if one:
                axes[1].plot([t for _, _, t in _curve(one[0])], [v for _, v, _ in _curve(one[0])], marker=".", label=crit, **style)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_ylabel("news validation loss")
        axes[0].set_xlabel("fine-tuning step (step 0 = zero-shot, before fine-tuning)")
        axes[0].set_title(f"mean over seeds, {ratio:.0%} removed")
        axes[1].set_xlabel("wall s since run start (scoring + fine-tuning + evals)")
        axes[1].set_title(f"seed {seed}, vs wall time")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        p = plots / f"transfer_loss_curves_50{suffix}.png"
        fig.savefig(p, dpi=80); plt.close(fig); made.append(p)
    ratios = sorted({r["ratio"] for r in results if r["ratio"] is not None})
    if dense and ratios:
        stages = (("zero-shot (right after pruning)", lambda r: r["zero_shot"]["val_loss"]),
                  ("after fine-tuning", lambda r: r["summary"]["val_loss"]))
        fig, axes = plt.subplots(2, len(ratios), figsize=(6 * len(ratios), 6.5), squeeze=False)
        for col, ratio in enumerate(ratios):
            for row, (stage, get) in enumerate(stages):
                ax, ys, es = axes[row][col], [], []
                for crit in CRITERIA:
                    v = [get(r) - get(dense[r["seed"]]) for r in results
                         if r["criterion"] == crit and r["ratio"] == ratio and r["seed"] in dense]
                    ys.append(statistics.mean(v) if v else float("nan"))
                    es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
                ax.bar(range(len(CRITERIA)), ys, yerr=es, capsize=3, color=[f"C{i}" for i in range(len(CRITERIA))])
                ax.set_xticks(range(len(CRITERIA)), CRITERIA, rotation=30 if row else 0, fontsize=8)
                ax.axhline(0, color="k", lw=1)
                ax.set_title(f"{ratio:.0%} removed, {stage}", fontsize=10)
                ax.grid(alpha=0.3, axis="y")
            axes[0][col].set_ylabel("val loss − dense (same seed)")
            axes[1][col].set_ylabel("val loss − dense (same seed)")
        fig.suptitle("News validation loss vs dense, mean ± std over seeds")
        fig.tight_layout()
        p = plots / f"transfer_delta_vs_dense{suffix}.png"
        fig.savefig(p, dpi=80); plt.close(fig); made.append(p)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="sweep folder (default runs/transfer, or runs/transfer-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 runs of 30 steps")
    ap.add_argument("--kd", action="store_true",
                    help="issue 13: dense / earlycrop / earlycrop+kd at 50%% (own --out, records and RESULTS.md section)")
    ap.add_argument("--dense-root", default=str(DENSE_ROOT), help="folder holding dense-s{seed}/model (quality.py's dense runs)")
    ap.add_argument("--criteria", type=lambda s: s.split(","), default=None, help="comma list; 'dense' included")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=None, help="0.5,0.7")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra pipeline override for every run (repeatable; use its own --out, it is not in the run key)")
    add_report_args(ap, ROOT)
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "runs" / (("transfer-kd" if args.kd else "transfer") + ("-quick" if args.quick else "")))
    args.records = default_records(args, ROOT, "transfer-kd" if args.kd else "transfer")
    if args.report:
        kd_report(args) if args.kd else report(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
