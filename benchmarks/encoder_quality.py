"""Quality, scenario 3 (issue 4): a PRETRAINED encoder gets a NEW, randomly initialised classification
head and is pruned before fine-tuning. Which scoring keeps the pretrained features?

A small BERT is pre-trained once with masked-LM on gensim's offline Wikipedia text
(`configs/bert_pretrain_mlm.yaml`), then every variant fine-tunes it on 20 Newsgroups posts shipped with
gensim (`configs/bert_prune_pretrained.yaml`: 140 training / 60 held-out posts, 2 classes), 50% of the
heads and MLP neurons removed before fine-tuning. The variants differ only in how units are scored:

- the task loss through the random new head (`objective: task`), at step 0 or after training the new head
  alone for a while (`train.head_warmup_steps`, encoder frozen);
- the checkpoint's own masked-LM loss on the task's text (`objective: pretraining`);
- magnitude and random, with a global or per-layer (uniform) ranking.

    python benchmarks/encoder_quality.py --quick        # smoke run: tiny pre-training, 3 variants, own folder
    python benchmarks/encoder_quality.py                # pre-train once, then every variant × seed (resumable)
    python benchmarks/encoder_quality.py --variants dense,magnitude-global --seeds 3,4
    python benchmarks/encoder_quality.py --report       # the section of benchmarks/RESULTS.md

Runs are appended to `benchmarks/records/encoder-<base>.jsonl` (a rerun skips what is there) and logged to one MLflow
experiment in `<out>/mlflow.db`; each runs in a forked child, like benchmarks/quality.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quality import REGIME, _ms  # noqa: E402
from results_file import write_section  # noqa: E402
from sweep_runner import (add_report_args, default_records, load_results, metric_histories, plan_counts,  # noqa: E402
                          run_forked, run_forked_step, shown)

FINETUNE = ROOT / "configs" / "bert_prune_pretrained.yaml"
# the pre-trained model: its config, overrides, and the config.json keys that rebuild its shape from scratch
BASES = {
    "bert": (ROOT / "configs" / "bert_pretrain_mlm.yaml", [],
             ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings", "vocab_size")),
    # the dense model of benchmarks/quality.py (causal LM on gensim:wiki), used as a pretrained decoder
    "llama": (ROOT / "configs" / "quickstart.yaml", [*REGIME, "prune.prune_at=never"],
              ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "max_position_embeddings", "vocab_size", "tie_word_embeddings")),
}
WARMUP = 40  # head-only steps: 2+ epochs of the 140 training posts at micro batch 8
SEEDS = [0, 1, 2]

# the tiny pre-trained BERT's fine-tuning recipe, as bert_prune_pretrained.yaml held it when these runs were made
# (the config now holds the real-MiniLM recipe that benchmarks/recovery.py chose)
TINY_RECIPE = ["train.max_steps=60", "train.micro_batch_size=8", "train.lr=5e-4", "train.warmup_steps=6",
               "train.eval_every=10", "train.eval_batches=8", "prune.layout=global", "train.recovery_steps=0"]
# name → overrides of bert_prune_pretrained.yaml (50% of heads and MLP neurons removed unless dense)
VARIANTS: dict[str, list[str]] = {
    "dense": ["prune.prune_at=never"],
    "dense + head warm-up": ["prune.prune_at=never", f"train.head_warmup_steps={WARMUP}"],
    "dense, no pre-training": ["prune.prune_at=never"],  # the same encoder shape, randomly initialised
    "magnitude, global": ["prune.criterion=magnitude", "prune.layout=global"],
    "magnitude, uniform": ["prune.criterion=magnitude", "prune.layout=uniform"],
    "random, uniform": ["prune.criterion=random", "prune.layout=uniform"],
    "earlycrop, task head, global": ["prune.objective=task", "prune.layout=global"],
    "earlycrop, task head, uniform": ["prune.objective=task", "prune.layout=uniform"],
    "earlycrop, task head after warm-up, global": ["prune.objective=task", "prune.layout=global",
                                                   f"train.head_warmup_steps={WARMUP}"],
    "earlycrop, pretraining, global": ["prune.objective=pretraining", "prune.layout=global"],
    "earlycrop, pretraining, uniform": ["prune.objective=pretraining", "prune.layout=uniform"],
    "snip, task head, global": ["prune.criterion=snip", "prune.objective=task", "prune.layout=global"],
    "snip, pretraining, global": ["prune.criterion=snip", "prune.objective=pretraining", "prune.layout=global"],
    "fisher, pretraining, global": ["prune.criterion=fisher", "prune.objective=pretraining", "prune.layout=global"],
    "fisher, pretraining, global, 16 batches": ["prune.criterion=fisher", "prune.objective=pretraining",
                                                "prune.layout=global", "prune.calibration_batches=16"],
    "activation, global": ["prune.criterion=activation", "prune.layout=global"],
}
QUICK_VARIANTS = ["dense", "magnitude, global", "earlycrop, pretraining, global"]
QUICK_PRETRAIN = ["train.max_steps=20", "train.warmup_steps=2", "train.eval_every=10", "train.eval_batches=2"]
QUICK_FINETUNE = ["train.max_steps=10", "train.eval_every=5", "train.eval_batches=2", "prune.calibration_batches=2"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def _tracking(out: Path, run_name: str, quick: bool) -> list[str]:
    return [f"tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}", f"run_name={run_name}",
            f"experiment=earlycrop-encoder-quality{'-quick' if quick else ''}"]


DESCRIBE = {
    "bert": "`configs/bert_pretrain_mlm.yaml` (BERT, hidden 128, 4 layers × 4 heads, MLP 512, masked LM, 8 × 128 tokens a step)",
    "llama": "the dense model of benchmarks/quality.py (Llama, hidden 128, 4 layers × 8 query / 2 KV heads, MLP 352, causal LM, "
             "8 × 128 tokens a step)",
}


def _section(base: str) -> str:
    return f"## Quality: pretrained {base} + new head, pruned before fine-tuning (encoder_quality.py)"


def _pretrain_child(out: str, quick: bool, base: str) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.run import run

    folder = Path(out) / "pretrain"
    config, extra, _ = BASES[base]
    cfg = load_config(config, [*extra, f"output_dir={folder}", "train.checkpoint_every=0", *_tracking(Path(out), "pretrain", quick),
                               *(QUICK_PRETRAIN if quick else [])])
    run(cfg)


def _finetune_child(variant: str, seed: int, out: str, quick: bool, base: str, result_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.run import run

    out = Path(out)
    key = f"{slug(variant)}-s{seed}"
    overrides = [f"seed={seed}", f"output_dir={out / 'runs' / key}", f"model.name_or_path={out / 'pretrain' / 'model'}",
                 *TINY_RECIPE, *_tracking(out, key, quick), *VARIANTS[variant], *(QUICK_FINETUNE if quick else [])]
    if variant == "dense, no pre-training":
        init = json.loads((out / "pretrain" / "model" / "config.json").read_text())
        shape = {k: init[k] for k in BASES[base][2]}
        overrides += ["model.name_or_path=null", f"model.family={base}", f"model.init={json.dumps(shape)}",
                      f"data.tokenizer={out / 'pretrain' / 'model'}"]
    cfg = load_config(FINETUNE, overrides)
    t0 = time.time()
    summary = run(cfg)
    wall = time.time() - t0
    run_dir = Path(cfg.output_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    counts = plan_counts(run_dir)
    retained = None if variant == "dense, no pre-training" else _pretraining_loss(out / "pretrain", run_dir / "plan.json" if counts else None)
    record = {"variant": variant, "seed": seed, "key": key, "quick": quick, "summary": summary, "wall_s": wall,
              "pretraining_loss_after_prune": retained,
              "mlflow_run_id": info["run_id"], "history": metric_histories(run_dir, ("val_loss", "val_accuracy")), "counts": counts,
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(result_path).write_text(json.dumps(record))


def _pretraining_loss(pretrain: Path, plan_path: Path | None, batches: int = 8) -> float:
    """The pretrained model's own held-out loss (its pre-training objective) with the plan applied and no
    fine-tuning: how much of what pre-training learned survives the cut, whatever the tiny task says."""
    import torch

    import earlycrop
    from pipeline import data as data_lib
    from pipeline.modeling import load_model_tokenizer

    model = earlycrop.from_pretrained(pretrain / "model", attn_implementation="eager").eval()
    if plan_path is not None:
        earlycrop.prune(model, earlycrop.Plan.load(plan_path))
    tokenizer = load_model_tokenizer(str(pretrain / "model"))
    _, val_docs = data_lib.split_documents(data_lib.load_documents("gensim:wiki"), 0.05, 0)
    blocks = {"input_ids": torch.tensor(data_lib.pack_causal_lm(val_docs, tokenizer, 128)["input_ids"][: batches * 8])}
    if type(model).__name__.endswith("ForMaskedLM"):
        blocks = data_lib.mask_for_mlm(blocks, tokenizer, 0.15, seed=1)
    else:
        blocks["labels"] = blocks["input_ids"]
    with torch.no_grad():
        losses = [model(**{k: v[i : i + 8] for k, v in blocks.items()}).loss.item() for i in range(0, len(blocks["input_ids"]), 8)]
    return sum(losses) / len(losses)


def sweep(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pretrained and not (out / "pretrain" / "summary.json").is_file():
        shutil.copytree(args.pretrained, out / "pretrain", dirs_exist_ok=True)
    if not (out / "pretrain" / "summary.json").is_file():
        print(f"pre-training the {args.base} model on gensim:wiki ...", flush=True)
        shutil.rmtree(out / "pretrain", ignore_errors=True)
        if run_forked_step(out, "pretrain", _pretrain_child, str(out), args.quick, args.base) != 0:
            raise SystemExit(f"pre-training failed; see {out / 'failures.log'}")
    pre = json.loads((out / "pretrain" / "summary.json").read_text())
    print(f"pretrained {args.base}: val loss {pre['val_loss']:.3f} after {pre['steps']} steps", flush=True)
    done = {r["key"] for r in load_results(args.records)}
    variants = args.variants or (QUICK_VARIANTS if args.quick else list(VARIANTS))
    todo = [(v, s) for s in (args.seeds or ([0] if args.quick else SEEDS)) for v in variants if f"{slug(v)}-s{s}" not in done]
    print(f"{len(done)} runs already in {args.records}; {len(todo)} to run", flush=True)
    for i, (variant, seed) in enumerate(todo, 1):
        key = f"{slug(variant)}-s{seed}"
        print(f"[{i}/{len(todo)}] {key} ...", flush=True)
        record = run_forked(out, args.records, key, _finetune_child, variant, seed, str(out), args.quick, args.base)
        if record is None:
            continue
        s = record["summary"]
        print(f"    val accuracy {s['val_accuracy']:.3f} loss {s['val_loss']:.4f} params {s['params_final']:,} "
              f"({record['wall_s']:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------- report


def report(args) -> None:
    out = Path(args.out)
    results = [r for r in load_results(args.records) if r["quick"] == args.quick]
    if not results:
        raise SystemExit(f"no results in {args.records}")
    by = defaultdict(list)
    for r in results:
        by[r["variant"]].append(r)
    dense = {r["seed"]: r for r in by.get("dense", [])}
    pre = json.loads((out / "pretrain" / "summary.json").read_text())
    rows, deltas, retained = [], {}, {}
    for variant in [v for v in VARIANTS if v in by]:
        rs = sorted(by[variant], key=lambda r: r["seed"])
        acc = [r["summary"]["val_accuracy"] for r in rs]
        loss = [r["summary"]["val_loss"] for r in rs]
        d_acc = [r["summary"]["val_accuracy"] - dense[r["seed"]]["summary"]["val_accuracy"] for r in rs if r["seed"] in dense]
        d_loss = [r["summary"]["val_loss"] - dense[r["seed"]]["summary"]["val_loss"] for r in rs if r["seed"] in dense]
        deltas[variant] = d_acc
        kept_lm = [r["pretraining_loss_after_prune"] for r in rs if r.get("pretraining_loss_after_prune") is not None]
        if kept_lm and not variant.startswith("dense"):
            retained[variant] = kept_lm
        c = rs[0]["counts"]
        kept = "–" if c is None else f"heads {c['heads']}, MLP {c['neurons']}"
        rows.append(f"| {variant} | {','.join(str(r['seed']) for r in rs)} | {_ms(acc)} | "
                    f"{_ms(d_acc, '{:+.3f}') if variant != 'dense' else '–'} | {_ms(loss)} | "
                    f"{_ms(d_loss, '{:+.3f}') if variant != 'dense' else '–'} | {_ms(kept_lm) if kept_lm else '–'} | "
                    f"{statistics.mean(r['summary']['params_final'] for r in rs):,.0f} | {kept} | "
                    f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    steps = results[0]["summary"]["steps"]
    lines = [_section(args.base), "",
             f"Command: `python benchmarks/encoder_quality.py --base {args.base}"
             + (" --pretrained runs/quality/runs/dense-s0" if args.base == "llama" else "")
             + f"` then `python benchmarks/encoder_quality.py --base {args.base} --report`"
             + (" (`--quick`: smoke numbers, meaningless as quality)" if args.quick else "") + ".",
             f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; records in `{shown(args.records, ROOT)}`, runs in `{out}`. Machine: "
             f"{platform.machine()}, 2 logical cores shared with other jobs, one thread per run; no GPU.",
             "",
             f"**Setup.** Pretrained model: {DESCRIBE[args.base]}, trained on gensim:wiki for {pre['steps']} steps; held-out "
             f"loss {pre['val_loss']:.3f} (perplexity {pre['val_perplexity']:.0f}; a uniform guess over the 2,048-token "
             "vocabulary is ln 2048 = 7.62, the unigram frequencies give about 6.4-6.5). Fine-tuning: "
             "`configs/bert_prune_pretrained.yaml` with `model.name_or_path` at that model (20 Newsgroups alt.atheism vs "
             f"sci.space, 140 training / 60 held-out posts split by the seed, posts cut to 128 tokens, {steps} steps × 8, "
             "lr 5e-4), with a NEW randomly initialised classification head. 50% of heads and of MLP neurons removed "
             f"before fine-tuning (`prune_at: 0`). Head warm-up: {WARMUP} steps training only the new head (the rest "
             "frozen) before scoring; the warmed head is kept for fine-tuning. Scoring: 4 calibration batches of 8 posts "
             "from the training split; `objective: pretraining` scores the same posts through the checkpoint's own "
             "pre-training head (masked LM: 15% of tokens masked; causal LM: next-token loss). Δ pairs each run with the "
             "dense run of the same seed (same split, same head initialisation). \"Pre-training loss after the cut\": the "
             "pretrained model's own objective on 64 held-out Wikipedia blocks with the run's plan applied and no "
             "fine-tuning (dense rows: nothing cut): how much of what pre-training learned each scoring keeps.",
             "",
             "| variant | seeds | val accuracy | Δ accuracy vs dense | val loss | Δ loss vs dense | pre-training loss after the cut | params | kept per layer (first seed) | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|", *rows, ""]
    lines += _retention(retained) + _verdicts(deltas)
    made = _plot(by, Path(args.plots), args.quick, args.base)
    lines += [f"![{m.stem}](plots/{m.name})" for m in made] + [""]
    text = "\n".join(lines).rstrip() + "\n"
    if args.extra:
        text += "\n" + Path(args.extra).read_text().rstrip() + "\n"
    write_section(Path(args.results), _section(args.base), text)
    print(text)


def _retention(retained: dict[str, list[float]]) -> list[str]:
    """Rank the pruned variants by the pretrained model's own loss after the cut (lower keeps more)."""
    ref = retained.get("magnitude, global")
    out = ["**What each scoring keeps of the pretrained model (pre-training loss after the cut, lower is better; "
           "computed from the table, best first; verdict against global magnitude, which needs no data and has no "
           "seed spread, so 'noise' is the other variant's seed std).**", ""]
    for variant, v in sorted(retained.items(), key=lambda kv: statistics.mean(kv[1])):
        line = f"- {variant}: {_ms(v)}"
        if ref and variant != "magnitude, global" and len(v) > 1:
            diff, noise = statistics.mean(v) - statistics.mean(ref), statistics.stdev(v)
            line += f"; {diff:+.3f} vs global magnitude: " + ("better" if diff < -noise else "WORSE" if diff > noise else "within seed noise")
        out.append(line + ".")
    return out + [""]


def _verdicts(deltas: dict[str, list[float]]) -> list[str]:
    """Each pruned variant against global magnitude (the baseline to beat), by paired Δ accuracy vs dense."""
    ref = deltas.get("magnitude, global")
    out = ["**Against global magnitude (computed from the table: difference of mean paired Δ accuracy; "
           "'beyond noise' = larger than the larger seed std).**", ""]
    if not ref or len(ref) < 2:
        return out + ["- not enough magnitude runs for a verdict", ""]
    noise_ref = statistics.stdev(ref)
    for variant, d in deltas.items():
        if variant in ("dense", "magnitude, global") or variant.startswith("dense") or len(d) < 2:
            continue
        diff = statistics.mean(d) - statistics.mean(ref)
        noise = max(noise_ref, statistics.stdev(d))
        verdict = "better" if diff > noise else "WORSE" if diff < -noise else "within seed noise"
        out.append(f"- {variant}: {diff:+.3f} accuracy vs global magnitude (noise {noise:.3f}, n={len(d)}/{len(ref)}): {verdict}.")
    return out + [""]


def _plot(by, plots: Path, quick: bool, base: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for variant, rs in by.items():
        curves = [dict((s, v) for s, v, _ in r["history"]["val_accuracy"]) for r in rs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], marker="o", markersize=3,
                linestyle="--" if variant.startswith("dense") else "-", label=f"{variant} (n={len(rs)})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"Pretrained {base} + new head, 50% of heads and MLP removed before fine-tuning")
    fig.tight_layout()
    path = plots / f"encoder_{base}_accuracy_curves{'_quick' if quick else ''}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="bert", choices=list(BASES),
                    help="the pretrained model: bert (masked LM, configs/bert_pretrain_mlm.yaml) or llama (causal LM, "
                         "the dense model of benchmarks/quality.py)")
    ap.add_argument("--out", default=None, help="folder (default runs/encoder-BASE, or runs/encoder-BASE-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 pre-training steps, 3 variants of 10 steps")
    ap.add_argument("--variants", type=lambda s: s.split(";"), default=None,
                    help=f"';'-separated variant names, from: {'; '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None, help="default 0,1,2")
    ap.add_argument("--pretrained", default=None,
                    help="reuse a finished pre-training run folder (model/ + summary.json) made with the same config, "
                         "e.g. runs/quality/runs/dense-s0 for --base llama")
    add_report_args(ap, ROOT)
    args = ap.parse_args()
    if args.variants:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from: {'; '.join(VARIANTS)}")
    args.out = args.out or str(ROOT / "runs" / f"encoder-{args.base}{'-quick' if args.quick else ''}")
    args.records = default_records(args, ROOT, f"encoder-{args.base}")
    report(args) if args.report else sweep(args)


if __name__ == "__main__":
    main()
