"""What does each criterion keep at initialisation? (issue 4, item 5: why EarlyCroP does not beat random)

At `prune_at: 0` with `layout: uniform` every criterion yields the same architecture, and the units of a freshly
initialised layer are exchangeable, so a criterion can only matter through *which* draws of the init it keeps. The
one property of a unit at init that training could feel is its weight norm (the magnitude criterion's score). This
reads the finished quality sweep's run folders (scores.safetensors and plan.json of every `prune_at: 0`, uniform run)
and measures, per criterion:
- the Spearman rank correlation of its scores with the unit weight norms of the same init, within each layer;
- the mean weight norm of the units it keeps, relative to the layer's mean (1.0 = what random keeps on average);
and sets them beside the paired Δ val loss from the sweep's records. Where the sweep also scored the same init with more
calibration batches (`--calibration-batches`), it reports how well the scores of the two batch counts agree: scores that
change ranking with the batches drawn are mostly sampling noise. Last, for every pruning moment (0, auto, a step), how
much the kept sets of the informed criteria agree with each other and with random (Jaccard overlap).

    python benchmarks/kept_units.py            # after benchmarks/quality.py; writes its RESULTS.md section

The magnitude run of the same seed gives the weight norms: every `prune_at: 0` run of a seed scores the same init.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quality import CRITERIA, _ms, is_main_variant  # noqa: E402
from results_file import write_section  # noqa: E402
from sweep_runner import load_results, shown  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
SECTION = "## What each criterion keeps (kept_units.py)"


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def _kept_norm_ratio(norms, kept: list[int]) -> float:
    return float(norms[kept].mean() / norms.mean())


def measure(runs: Path) -> list[dict]:
    """One row per (criterion, ratio, seed) of the uniform `prune_at: 0` runs found under `runs`."""
    from safetensors.torch import load_file

    norms_of_seed: dict[str, dict | None] = {}  # the magnitude scores of each seed's init, read once
    rows = []
    for folder in sorted(runs.glob("*-at0-s*")):
        name = folder.name
        if not (folder / "plan.json").is_file() or not (folder / "scores.safetensors").is_file() or name.count("-") != 3:
            continue  # unfinished, or a variant (global layout, other calibration): only the plain uniform runs
        criterion, ratio, _, seed = name.split("-")
        if seed not in norms_of_seed:
            found = [f / "scores.safetensors" for f in sorted(runs.glob(f"magnitude-r*-at0-{seed}")) if (f / "scores.safetensors").is_file()]
            norms_of_seed[seed] = load_file(found[0]) if found else None
        norms = norms_of_seed[seed]
        if norms is None:
            continue
        scores = load_file(folder / "scores.safetensors")
        plan = json.loads((folder / "plan.json").read_text())
        row = {"criterion": criterion, "ratio": float(ratio[1:]), "seed": int(seed[1:])}
        for kind in ("heads", "neurons"):
            per_layer = list(zip(scores[kind], norms[kind], plan[kind]))
            row[f"rho_{kind}"] = statistics.mean(_spearman(s, n) for s, n, _ in per_layer)
            row[f"kept_norm_{kind}"] = statistics.mean(_kept_norm_ratio(n, kept) for _, n, kept in per_layer)
        rows.append(row)
    return rows


def stability(runs: Path) -> list[dict]:
    """Scores of the same init from the default calibration batches and from more (`-cb<N>` runs of the same
    criterion, ratio, seed and layout): Spearman ρ within each layer, mean over layers."""
    from safetensors.torch import load_file

    rows = []
    for folder in sorted(runs.glob("*-at0-s*-cb*")):
        base = runs / folder.name.rsplit("-cb", 1)[0]
        if not (folder / "scores.safetensors").is_file() or not (base / "scores.safetensors").is_file():
            continue
        more, default = load_file(folder / "scores.safetensors"), load_file(base / "scores.safetensors")
        criterion, _, _, seed = folder.name.split("-")[:4]
        row = {"criterion": criterion, "seed": int(seed[1:]), "batches": int(folder.name.rsplit("-cb", 1)[1])}
        for kind in ("heads", "neurons"):
            row[f"rho_{kind}"] = statistics.mean(_spearman(a, b) for a, b in zip(more[kind], default[kind]))
        rows.append(row)
    return rows


INFORMED = ["earlycrop", "snip", "fisher", "magnitude", "activation"]  # grasp ranks by a signed score: left out


def _jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def agreement(runs: Path) -> list[dict]:
    """Per (ratio, pruning moment, seed) of the uniform runs: mean Jaccard overlap of the kept neurons and heads,
    within each layer, over the pairs of informed criteria, and between random and each informed criterion."""
    plans = defaultdict(dict)
    for folder in runs.glob("*-r*-at*-s*"):
        if folder.name.count("-") == 3 and (folder / "plan.json").is_file():
            criterion, ratio, at, seed = folder.name.split("-")
            plans[(float(ratio[1:]), at[2:], int(seed[1:]))][criterion] = json.loads((folder / "plan.json").read_text())
    rows = []
    for (ratio, at, seed), by in sorted(plans.items()):
        informed = [c for c in INFORMED if c in by]
        if len(informed) < 2 or "random" not in by:
            continue
        row = {"ratio": ratio, "prune_at": at, "seed": seed, "criteria": informed}
        for kind in ("heads", "neurons"):
            def overlap(a, b):
                return statistics.mean(_jaccard(x, y) for x, y in zip(by[a][kind], by[b][kind]))
            row[f"informed_{kind}"] = statistics.mean(overlap(a, b) for i, a in enumerate(informed) for b in informed[i + 1:])
            row[f"random_{kind}"] = statistics.mean(overlap("random", c) for c in informed)
            kept, total = len(by["random"][kind][0]), by["random"][f"dense_{kind}"][0]
            row[f"chance_{kind}"] = kept / (2 * total - kept)  # expected Jaccard of two random k-subsets, near enough
        rows.append(row)
    return rows


def _grouped(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def report(rows: list[dict], stable: list[dict], agree: list[dict], records: Path, out_json: Path, results: Path) -> str:
    deltas = {}
    runs = load_results(records)
    dense = {r["seed"]: r["summary"]["val_loss"] for r in runs if r["criterion"] == "dense"}
    for r in runs:
        if r["criterion"] != "dense" and r["prune_at"] == "0" and is_main_variant(r) and r["seed"] in dense:
            deltas[(r["criterion"], r["ratio"], r["seed"])] = r["summary"]["val_loss"] - dense[r["seed"]]
    by = defaultdict(list)
    for row in rows:
        row["delta_val_loss"] = deltas.get((row["criterion"], row["ratio"], row["seed"]))
        by[(row["criterion"], row["ratio"])].append(row)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"kept": rows, "score_stability": stable, "agreement": agree}, indent=1))

    def ms(values, fmt="{:.2f}"):
        return _ms([v for v in values if v is not None], fmt)

    lines = [SECTION, "",
             f"Command: `python benchmarks/kept_units.py` (reads the quality sweep's run folders; rows in "
             f"`{shown(out_json, ROOT)}`). Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "",
             "Uniform layout, `prune_at: 0`: every criterion keeps the same number of units per layer of the same "
             "random init. ρ = Spearman rank correlation of the criterion's scores with the units' weight norms (the "
             "magnitude scores of the same init), mean over layers and seeds. Kept norm = mean weight norm of the kept "
             "units / the layer's mean (random keeps 1.00 on average). Δ = final val loss − dense (same seed), from "
             f"`{shown(records, ROOT)}`.", "",
             "| criterion | removed | seeds | ρ heads | ρ neurons | kept norm heads | kept norm neurons | Δ vs dense |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for ratio in RATIOS:
        for criterion in CRITERIA:
            group = sorted(by.get((criterion, ratio), []), key=lambda r: r["seed"])
            if not group:
                continue
            lines.append(f"| {criterion} | {ratio:.0%} | {','.join(str(r['seed']) for r in group)} | "
                         f"{ms([r['rho_heads'] for r in group])} | {ms([r['rho_neurons'] for r in group])} | "
                         f"{ms([r['kept_norm_heads'] for r in group], '{:.3f}')} | "
                         f"{ms([r['kept_norm_neurons'] for r in group], '{:.3f}')} | "
                         f"{ms([r['delta_val_loss'] for r in group], '{:+.3f}')} |")
    if stable:
        groups = _grouped(stable, "criterion", "batches")
        lines += ["", "Do the scores of one init depend on which calibration batches were drawn? ρ = Spearman rank correlation, "
                  "within each layer (mean over layers and seeds), of the scores from 4 calibration batches with the "
                  "scores from more batches of the same training split.", "",
                  "| criterion | batches | seeds | ρ heads (4 vs more) | ρ neurons (4 vs more) |", "|---|---:|---|---:|---:|"]
        for (criterion, batches), group in sorted(groups.items(), key=lambda kv: (CRITERIA.index(kv[0][0]), kv[0][1])):
            lines.append(f"| {criterion} | {batches} | {','.join(str(r['seed']) for r in group)} | "
                         f"{ms([r['rho_heads'] for r in group])} | {ms([r['rho_neurons'] for r in group])} |")
    if agree:
        groups = _grouped(agree, "ratio", "prune_at")
        lines += ["", "Do the criteria keep the same units? Mean Jaccard overlap of the kept sets within each layer (mean over "
                  f"layers and seeds): between every pair of the informed criteria ({', '.join(INFORMED)}), between random "
                  "and each of them, and what two random draws share by chance.", "",
                  "| removed | prune_at | seeds | neurons: informed pairs | neurons: random vs informed | neurons: chance "
                  "| heads: informed pairs | heads: random vs informed | heads: chance |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for (ratio, at), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == "auto", kv[0][1])):
            lines.append(f"| {ratio:.0%} | {at} | {','.join(str(r['seed']) for r in group)} | "
                         + " | ".join(ms([r[f"{who}_{kind}"] for r in group]) for kind in ("neurons", "heads")
                                      for who in ("informed", "random", "chance")) + " |")
    text = "\n".join(lines) + "\n"
    write_section(results, SECTION, text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "quality" / "runs"), help="the quality sweep's run folders")
    ap.add_argument("--records", default=str(ROOT / "benchmarks" / "records" / "quality.jsonl"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "records" / "kept_units.json"), help="where the rows go")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args()
    runs = Path(args.runs)
    rows = measure(runs)
    if not rows:
        raise SystemExit(f"no finished uniform prune_at 0 runs with a magnitude run of the same seed under {runs}")
    print(report(rows, stability(runs), agreement(runs), Path(args.records), Path(args.json), Path(args.results)))


if __name__ == "__main__":
    main()
