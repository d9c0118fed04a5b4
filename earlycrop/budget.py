"""Prune to a hardware budget, and say what the pruning buys.

A `Budget` is what the user has, written as text:

    "24GB x 1"        GPU memory × GPU count: every GPU holds at most 24·10⁹ bytes (SI units: GB, MB, TB)
    "80GiB × 8"       binary units (GiB, MiB, TiB); `x`, `×` or `*`; "8 x 80GiB" is the same; "24GB" alone is 1 GPU
    "params<=50M"     a parameter budget (also `≤`); suffixes K, M, B (or G), T are powers of 10³
    "flops<=2.5G"     a budget on training FLOPs per token (forward + backward) at the setup's sequence length,
                      `ModelShape.flops_per_token`; suffixes K, M, G (or B), T, P

`fit_to_budget(model, scores, base, setup, budget)` finds the SMALLEST fraction removed whose plan fits:

- The search runs on the dense `ModelShape` alone: at each ratio it counts the units `make_plan` would keep per
  layer (uniform: closed form, the same rounding to GQA groups / `round_to` multiples; global: one ranking of all
  layers, sorted once) and measures `shape.with_counts(...)`: memory per GPU is `estimate_memory` under the setup's
  precision / optimizer / micro batch / sequence length / checkpointing / attention / ZeRO stage, with `num_gpus`
  taken from the budget (the budget's count wins over `setup.num_gpus`); it must be ≤ the GPU size × (1 −
  headroom). Parameter and FLOP budgets compare `num_params()` and `flops_per_token(setup.seq_len)`. Only the result becomes a
  `Plan`: `make_plan` on the model, or, given a `ModelShape` (and its config for the saveability check), the plan
  the placeholder scores give, built from the counts; no module is built either way.
- One ratio r drives the search. `search="both"` (the default) removes the fraction r of the heads AND of the MLP
  neurons; each kind is capped at its own most pruned valid ratio (uniform: one GQA group or `round_to` multiple
  left per layer), so MLP pruning can go on after the heads hit their floor. `search="mlp"` keeps `base.heads` fixed
  and searches the MLP ratio; `search="heads"` keeps `base.mlp` fixed and searches the head ratio (what
  `earlycrop plan --heads R` / `--mlp R` do). `base.heads` / `base.mlp` are ignored for the searched kinds.
- Kept counts never grow with r (uniform: per-layer rounding of a shrinking count; global: nested top-k sets), and
  memory, parameters and FLOPs never grow when counts shrink, so bisection over r is exact up to its resolution
  (1e-9, far finer than one unit of any real model). The search then re-checks the returned plan (it fits: never an
  overshoot) and records the plan just below it (it does not fit, unless r = 0), and reports a readable ratio that
  gives the same plan (the shortest decimal, or the fraction really removed when that is as short: 0.5, not
  0.4999999996).
- Plans whose pruned config transformers refuses (`config.validate()`: e.g. a Llama whose kept head count does not
  divide `hidden_size`) are skipped with `require_saveable=True` (the default): the run would otherwise fail in
  `save_pretrained` after training. The search moves on to the next more pruned plan.
- Uniform layout: the kept counts do not depend on the scores, so placeholder scores (`scores=None`) give the
  same plan counts as the real ones. Global layout: the per-layer counts DO depend on the scores; the search uses the
  scores it is given. With `scores=None` it uses `placeholder_scores`, which rank every layer alike (the kept
  fraction is the same in every layer), i.e. a shape estimate only; run the search again with the real scores before
  pruning (the pipeline does).
- When even the most pruned valid plan does not fit, `fit_to_budget` raises ValueError (one line) with what that
  plan needs against the budget and the changes that would make it fit (ZeRO stage / GPU count, smaller micro
  batch, activation checkpointing), each computed with the memory model.

`budget_report(model, plan_or_none, setup, gpu_bytes)` puts dense and pruned side by side: parameters, training
FLOPs per token, memory per GPU by part, and the fewest GPUs of `gpu_bytes` each needs under ZeRO 0/1/2/3.
`.format()` is the printed table, `.to_dict()` flat numbers for `log_metrics`.

Everything here works on models built on the meta device (`with torch.device("meta"): model = ...`): only
parameter shapes are read, no weights. `model_skeleton(folder)` builds such a model from a saved folder's
config.json (pruned earlycrop folders included) without reading the weights.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .memory import (
    MemoryEstimate,
    ModelShape,
    TrainingSetup,
    estimate_memory,
    format_bytes,
    min_gpus,
    min_gpus_per_stage,
    parse_memory,
)
from .plans import Plan, SelectionConfig

if TYPE_CHECKING:  # a search on a shape with the uniform layout needs neither torch nor transformers
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from .scores import Scores

BudgetKind = Literal["memory", "params", "flops"]
Search = Literal["both", "heads", "mlp"]

RESOLUTION = 1e-9  # bisection stops when the ratio interval is this narrow
# fraction of every GPU a plan leaves free for what the memory model does not count: the CUDA context (0.3-1 GiB),
# allocator fragmentation, NCCL and DeepSpeed communication buffers; `earlycrop plan` and `target.headroom` default
DEFAULT_HEADROOM = 0.08

BUDGET_SYNTAX = (
    "write a GPU budget as '24GB x 1' or '80GiB × 8' (memory per GPU × GPUs), a parameter budget as "
    "'params<=50M', or a FLOP budget as 'flops<=2.5G' (training FLOPs per token)"
)

_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12, "p": 10**15}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_SIZE = rf"{_NUMBER}\s*[a-z]+"
_MEMORY_RES = (
    re.compile(rf"^(?P<size>{_SIZE})(?:\s*[x×*]\s*(?P<n>\d+))?$", re.IGNORECASE),
    re.compile(rf"^(?P<n>\d+)\s*[x×*]\s*(?P<size>{_SIZE})$", re.IGNORECASE),
)
_LIMIT_RE = re.compile(
    rf"^(?P<key>params|parameters|flops|flops/token|flops_per_token)\s*(?:<=|≤)\s*(?P<num>{_NUMBER})\s*(?P<suffix>[a-z]?)$",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------------------------------
# The budget


@dataclass(frozen=True)
class Budget:
    """What must fit: `memory` (bytes per GPU on `num_gpus` GPUs), `params` (parameter count) or `flops` (training
    FLOPs per token). Build with `Budget.parse(text)` (syntax in the module docstring) or directly."""

    kind: BudgetKind
    limit: float  # bytes per GPU, parameters, or FLOPs per token
    num_gpus: int = 1  # memory budgets only
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("memory", "params", "flops"):
            raise ValueError(f"budget kind {self.kind!r}: choose 'memory', 'params' or 'flops'")
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or not math.isfinite(self.limit) or self.limit <= 0:
            raise ValueError(f"budget limit {self.limit!r}: must be a positive number")
        if isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, int) or self.num_gpus < 1:
            raise ValueError(f"budget GPU count {self.num_gpus!r}: must be a positive integer")
        if self.kind != "memory" and self.num_gpus != 1:
            raise ValueError("a GPU count belongs to a memory budget only")

    @classmethod
    def parse(cls, text: str | Budget) -> Budget:
        """'24GB x 1', '80GiB × 8', '8 x 80GiB', '24GB', 'params<=50M', 'flops<=2.5G' → Budget; ValueError otherwise."""
        if isinstance(text, Budget):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"cannot read budget {text!r}: {BUDGET_SYNTAX}")
        s = text.strip()
        m = _LIMIT_RE.match(s)
        if m:
            suffix = m.group("suffix").lower()
            if suffix not in _COUNT_SUFFIX:
                raise ValueError(f"cannot read budget {text!r}: unknown suffix {m.group('suffix')!r} (use K, M, B/G, T)")
            value = float(m.group("num")) * _COUNT_SUFFIX[suffix]
            kind = "params" if m.group("key").lower().startswith("param") else "flops"
            if kind == "params":
                value = int(value)
            if value <= 0:
                raise ValueError(f"cannot read budget {text!r}: the limit must be positive")
            return cls(kind, value, 1, s)
        for pattern in _MEMORY_RES:
            m = pattern.match(s)
            if m:
                try:
                    size = parse_memory(m.group("size"))
                except ValueError:
                    raise ValueError(
                        f"cannot read budget {text!r}: {m.group('size')!r} is not a memory size (use e.g. 24GB or 80GiB)"
                    ) from None
                n = int(m.group("n")) if m.group("n") else 1
                if size <= 0 or n < 1:
                    raise ValueError(f"cannot read budget {text!r}: memory and GPU count must be positive")
                return cls("memory", size, n, s)
        raise ValueError(f"cannot read budget {text!r}: {BUDGET_SYNTAX}")

    @property
    def gpu_bytes(self) -> int | None:
        return int(self.limit) if self.kind == "memory" else None

    def __str__(self) -> str:
        if self.text:
            return self.text
        if self.kind == "memory":
            return f"{format_bytes(self.limit)} x {self.num_gpus}"
        return f"{self.kind}<={_format_count(self.limit)}"


# --------------------------------------------------------------------------------------------------------------------
# Shapes without weights


def model_shape(model: nn.Module | ModelShape) -> ModelShape:
    """The model's `ModelShape` (models built on the meta device included); a shape passes through."""
    return model if isinstance(model, ModelShape) else ModelShape.from_model(model)


def model_skeleton(path: str | Path, *, task: str | None = None, num_labels: int | None = None) -> nn.Module:
    """The model a saved folder describes, built on the meta device from its config.json (weights are not read):
    dense or pruned (an earlycrop layout is replayed), enough for `ModelShape`, `make_plan` and the budget search.
    `task="sequence_classification"` puts a new classification head with `num_labels` on a folder that has none,
    like the pipeline does."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .families import architecture_class
    from .serialization import plain_loadable
    from .surgery import LAYOUT_KEY, prune, shape_plan

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: config.json is missing")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        if task == "sequence_classification" and not any(a.endswith("SequenceClassification") for a in config.architectures or []):
            if num_labels is not None:
                config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = architecture_class(config)(config)
        if not plain_loadable(config):
            prune(model, shape_plan(model, getattr(config, LAYOUT_KEY)))
    return model


def placeholder_scores(model: nn.Module | ModelShape) -> Scores:
    """Scores for a shape-only search: within every layer, unit j of n scores 1 − (j + ½)/n, so every layer is ranked
    alike and a global ranking keeps the same fraction of every layer (uniform plans do not depend on scores)."""
    import torch

    from .families import get_adapter
    from .scores import Scores

    if isinstance(model, ModelShape):
        heads, neurons = model.heads, model.intermediate
    else:
        layers = get_adapter(model).layers(model)
        heads, neurons = [l.num_heads for l in layers], [l.intermediate_size for l in layers]

    def ramp(n: int) -> torch.Tensor:
        return 1.0 - (torch.arange(n, dtype=torch.float64) + 0.5) / n

    return Scores(heads=[ramp(n) for n in heads], neurons=[ramp(n) for n in neurons])


def plan_config_error(model: nn.Module | PretrainedConfig, plan: Plan) -> str | None:
    """Why transformers would refuse the pruned config (e.g. hidden_size not a multiple of the kept heads), or None.
    `model` is the model or just its config (a shape-only search has no model); the config is copied and described
    as surgery would describe it."""
    from torch import nn

    from .families import FAMILIES

    config = copy.deepcopy(model.config if isinstance(model, nn.Module) else model)
    counts = plan.counts()
    FAMILIES[plan.family].describe_layout(config, counts["heads"], counts["kv_heads"], counts["neurons"])
    validate = getattr(config, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as exc:  # transformers raises its own validation error types
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__
    return None


# --------------------------------------------------------------------------------------------------------------------
# The search


@dataclass
class BudgetResult:
    """The least pruned plan that fits. `selection` reproduces `plan` with `make_plan` (same scores for global
    layout); `heads` / `mlp` are its ratios, `removed` the fractions of heads / neurons actually removed (after
    rounding). `value` is the pruned model's measure (bytes per GPU, parameters or FLOPs per token), `dense_value`
    the dense one's, `limit` the budget after headroom. `below` describes the next less pruned plan, which does not
    fit (ratio, heads, mlp, value, counts, config_error; None when no pruning is needed); `skipped_unsaveable` the
    plans between the two that fit but whose config transformers refuses (ratio, counts, error)."""

    budget: Budget
    plan: Plan
    selection: SelectionConfig
    ratio: float
    removed: dict[str, float]
    value: float
    dense_value: float
    limit: float
    setup: TrainingSetup
    shape: ModelShape
    dense_shape: ModelShape
    memory: MemoryEstimate | None
    below: dict | None
    skipped_unsaveable: list[dict] = field(default_factory=list)
    evaluations: int = 0

    @property
    def heads(self) -> float:
        return self.selection.heads

    @property
    def mlp(self) -> float:
        return self.selection.mlp

    @property
    def dense_fits(self) -> bool:
        return self.dense_value <= self.limit

    def summary(self) -> str:
        what = format_measure(self.budget.kind, self.value)
        if self.ratio == 0 and self.removed["heads"] == 0 and self.removed["mlp"] == 0:
            return f"no pruning needed: the dense model takes {what} of {format_measure(self.budget.kind, self.limit)} allowed"
        return (
            f"heads={self.heads:g} mlp={self.mlp:g} (removes {self.removed['heads']:.1%} of heads, "
            f"{self.removed['mlp']:.1%} of MLP neurons): {what} of {format_measure(self.budget.kind, self.limit)} "
            f"allowed (dense {format_measure(self.budget.kind, self.dense_value)})"
        )


def _format_count(x: float) -> str:
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{suffix}"
    return f"{x:.3g}"


def format_measure(kind: str, x: float) -> str:
    """A budget measure as a reader sees it: "12.00 GiB per GPU", "1,234 parameters" or "2.5G FLOPs/token"."""
    if kind == "memory":
        return f"{format_bytes(x)} per GPU"
    if kind == "params":
        return f"{int(x):,} parameters"
    return f"{_format_count(x)} FLOPs/token"


class _Units:
    """One kind of unit (head units or MLP neurons) of every layer, counted as `make_plan` selects them but from the
    shape alone: per-layer totals, the multiple kept counts come in, and for the global layout the ranking over all
    layers (sorted once, so a ratio's counts cost one pass instead of a plan)."""

    def __init__(self, kind: str, totals: list[int], multiples: list[int], layout: str,
                 scores: list[torch.Tensor] | None):
        self.kind, self.totals, self.multiples, self.layout = kind, totals, multiples, layout
        if layout == "global":
            import torch

            flat = torch.cat([s.double().cpu() for s in scores])
            self.order = torch.sort(-flat, stable=True).indices  # make_plan's ranking: ties keep the lower index
            self.layer_of = torch.repeat_interleave(torch.arange(len(totals)), torch.tensor(totals))

    def max_ratio(self) -> float:
        """The most pruned valid ratio: uniform leaves one multiple per layer; global keeps nothing in the ranking
        (every layer then keeps one multiple)."""
        if self.layout == "uniform":
            return max(0.0, min(1.0 - min(m, u) / u for u, m in zip(self.totals, self.multiples)))
        return 1.0 - 0.25 / sum(self.totals)

    def keep(self, ratio: float) -> list[int]:
        """Kept units per layer when the fraction `ratio` is removed (make_plan's rounding)."""
        if ratio == 0:
            return list(self.totals)
        if self.layout == "uniform":
            kept = [m * round(u * (1.0 - ratio) / m) for u, m in zip(self.totals, self.multiples)]
            for layer, (k, u, m) in enumerate(zip(kept, self.totals, self.multiples)):
                if k <= 0:
                    raise ValueError(
                        f"{self.kind}={ratio} would empty layer {layer} ({u} units, kept in multiples of {m}); "
                        f"use a ratio of at most {1 - m / u:.4g}"
                    )
            return [min(k, u) for k, u in zip(kept, self.totals)]
        keep_total = round(len(self.order) * (1.0 - ratio))
        if keep_total >= len(self.order):
            return list(self.totals)
        ranked = self.layer_of[self.order[:keep_total]].bincount(minlength=len(self.totals)).tolist()
        return [min(u, max(m, m * round(k / m))) for k, u, m in zip(ranked, self.totals, self.multiples)]

    def removes_nothing(self, ratio: float, kept: list[int]) -> bool:
        return ratio > 0 and sum(kept) >= sum(self.totals)

    def nothing_error(self, ratio: float) -> ValueError:
        smallest = min(m / u for m, u in zip(self.multiples, self.totals))
        return ValueError(
            f"{self.kind}={ratio} removes nothing: counts are kept in multiples of {self.multiples[0]} of "
            f"{max(self.totals)} units per layer (GQA groups / rounding); a ratio of at least {smallest:.4g} "
            "removes some"
        )


Counts = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # kept heads, key/value heads, neurons per layer


class _Searcher:
    """Bisection over the ratio on the dense `ModelShape` alone: kept counts from `_Units`, measures from the memory
    model; no model is built or planned until the result. `model` (None for a shape-only search) makes the returned
    plan with `make_plan`; `source` (the model or its config, None: no config at hand) checks saveability."""

    def __init__(self, shape, model, scores, base, setup, budget, search, headroom, source, require_saveable):
        self.dense_shape, self.model, self.scores, self.base, self.setup = shape, model, scores, base, setup
        self.budget, self.search, self.source, self.require_saveable = budget, search, source, require_saveable
        # make_plan's head units: key/value groups (no GQA, or gqa=group), else query heads in multiples of the groups
        self.grouped = [h == kv or base.gqa == "group" for h, kv in zip(shape.heads, shape.kv_heads)]
        layers = list(zip(shape.heads, shape.kv_heads, self.grouped))
        head_scores = neuron_scores = None  # the uniform layout's counts do not depend on scores
        if scores is not None:
            head_scores = [s.double().reshape(kv, h // kv).sum(1) if g else s.double()
                           for s, (h, kv, g) in zip(scores.heads, layers)]
            neuron_scores = scores.neurons
        self.units = {
            "heads": _Units("heads", [kv if g else h for h, kv, g in layers], [1 if g else kv for h, kv, g in layers],
                            base.layout, head_scores),
            "mlp": _Units("mlp", list(shape.intermediate), [base.round_to] * shape.num_layers, base.layout,
                          neuron_scores),
        }
        self.hmax, self.mmax = self.units["heads"].max_ratio(), self.units["mlp"].max_ratio()
        self.rmax = {"both": max(self.hmax, self.mmax), "heads": self.hmax, "mlp": self.mmax}[search]
        if budget.kind == "memory":
            self.limit = parse_memory(int(budget.limit)) * (1.0 - headroom)
        else:
            self.limit = float(budget.limit)
        self.evaluations = 0
        self._cache: dict[float, tuple[Counts, SelectionConfig]] = {}
        self._plans: dict[Counts, Plan] = {}

    def selection(self, r: float) -> SelectionConfig:
        h = min(r, self.hmax) if self.search in ("both", "heads") else self.base.heads
        m = min(r, self.mmax) if self.search in ("both", "mlp") else self.base.mlp
        return SelectionConfig(h, m, self.base.layout, self.base.round_to, self.base.gqa)

    def plan(self, r: float) -> tuple[Counts, SelectionConfig]:
        """Kept counts at ratio r and the selection make_plan turns into them: a searched kind whose ratio removes
        nothing is the same plan as its ratio 0; a fixed one that removes nothing is the user's setting, an error."""
        if r in self._cache:
            return self._cache[r]
        sel = self.selection(r)
        narrowest = min(self.dense_shape.intermediate)
        if sel.mlp > 0 and self.base.round_to > narrowest:
            raise ValueError(
                f"round_to={self.base.round_to} is larger than a layer's {narrowest} MLP neurons; "
                f"use round_to <= {narrowest}"
            )
        kept = {}
        for kind, units in self.units.items():
            ratio = getattr(sel, kind)
            kept[kind] = units.keep(ratio)
            if units.removes_nothing(ratio, kept[kind]):
                if self.search not in ("both", kind):
                    raise units.nothing_error(ratio)
                sel = replace(sel, **{kind: 0.0})
        layers = zip(kept["heads"], self.dense_shape.heads, self.dense_shape.kv_heads, self.grouped)
        q, kv = zip(*[(u * (h // k), u) if g else (u, k) for u, h, k, g in layers])
        self.evaluations += 1
        self._cache[r] = ((q, kv, tuple(kept["mlp"])), sel)
        return self._cache[r]

    def counts(self, r: float) -> Counts:
        return self.plan(r)[0]

    def shape(self, counts: Counts) -> ModelShape:
        return self.dense_shape.with_counts(*counts)

    def measure(self, shape: ModelShape) -> tuple[float, MemoryEstimate | None]:
        if self.budget.kind == "memory":
            est = estimate_memory(shape, self.setup)
            return float(est.total), est
        if self.budget.kind == "params":
            return float(shape.num_params()), None
        return float(shape.flops_per_token(self.setup.seq_len)), None

    def fits(self, r: float) -> bool:
        return self.measure(self.shape(self.counts(r)))[0] <= self.limit

    def full_plan(self, r: float) -> Plan:
        """The Plan at ratio r: make_plan on the model with its scores, or for a shape alone the plan of the
        placeholder ranking, built from the counts (every layer keeps its lowest indices, as make_plan would)."""
        counts, sel = self.plan(r)
        if counts not in self._plans:
            if self.model is not None:
                from .select import make_plan

                self._plans[counts] = make_plan(self.model, self.scores, sel)
            else:
                self._plans[counts] = _placeholder_plan(self.dense_shape, counts, sel)
        return self._plans[counts]

    def config_error(self, r: float) -> str | None:
        return None if self.source is None else plan_config_error(self.source, self.full_plan(r))

    def saveable_error(self, r: float) -> str | None:
        return self.config_error(r) if self.require_saveable else None

    def _plan_boundary(self, r: float, hi: float) -> tuple[float, float]:
        """Bisect (r, hi] to RESOLUTION: the last ratio with r's plan and the first with another."""
        here, lo = self.counts(r), r
        while hi - lo > RESOLUTION:
            mid = (lo + hi) / 2
            if self.counts(mid) == here:
                lo = mid
            else:
                hi = mid
        return lo, hi

    def next_plan(self, r: float) -> float | None:
        """The smallest ratio above r (to RESOLUTION) whose plan differs from r's, or None."""
        if self.counts(self.rmax) == self.counts(r):
            return None
        return self._plan_boundary(r, self.rmax)[1]

    def plan_end(self, r: float) -> float:
        """The largest ratio (to RESOLUTION) whose plan equals r's."""
        nxt = self.next_plan(r)
        return self.rmax if nxt is None else self._plan_boundary(r, nxt)[0]

    def removed(self, counts: Counts) -> tuple[float, float]:
        """Fractions of the heads and of the MLP neurons that `counts` remove."""
        dense = self.dense_shape
        return 1.0 - sum(counts[0]) / sum(dense.heads), 1.0 - sum(counts[2]) / sum(dense.intermediate)

    def tidy(self, lo: float, r: float) -> float:
        """A readable ratio in (lo, end of r's plan] that gives r's plan: the fraction of heads or neurons the plan
        really removes or else the shortest decimal (0.5 rather than 0.49999999977), whichever is shorter."""
        here = self.counts(r)
        end = self.plan_end(r)
        removed = self.removed(here)
        for digits in range(1, 10):
            scale = 10**digits
            # the fraction really removed where it is this short, then the first decimal of this length above lo
            candidates = [x for x in removed if x > 0 and round(x, digits) == round(x, 12)]
            candidates.append(math.floor(lo * scale + 1) / scale)
            for candidate in candidates:
                candidate = round(candidate, digits)
                if lo < candidate <= end and self.counts(candidate) == here:
                    return candidate
        return r

    def run(self) -> tuple[float, float | None, list[dict]]:
        """(the least pruned ratio that fits and whose plan is saveable, the largest ratio known not to fit or None,
        the plans skipped in between because their config is refused). Raises ValueError when nothing fits."""
        skipped: list[dict] = []
        if self.fits(0.0) and self.saveable_error(0.0) is None:
            return 0.0, None, skipped
        if not self.fits(self.rmax):
            raise ValueError(_refusal(self))
        lo, hi, lo_fail = 0.0, self.rmax, None
        if self.fits(0.0):  # the unpruned plan fits but its config is refused (a fixed ratio's plan)
            hi = 0.0
        else:
            lo_fail = 0.0
        while hi - lo > RESOLUTION:
            mid = (lo + hi) / 2
            if self.fits(mid):
                hi = mid
            else:
                lo = lo_fail = mid
        r = hi
        # skip plans whose pruned config transformers refuses; every more pruned plan fits as well
        while (err := self.saveable_error(r)) is not None:
            skipped.append({"ratio": r, "counts": _counts_dict(self.counts(r)), "error": err})
            nxt = self.next_plan(r)
            if nxt is None:
                raise ValueError(
                    f"budget {self.budget}: every plan that fits is refused by transformers' config validation "
                    f"({err}); try another round_to / gqa setting or layout"
                )
            lo, r = self.plan_end(r), nxt
        return (self.tidy(lo, r) if r > 0 else r), lo_fail, skipped


def _counts_dict(counts: Counts) -> dict[str, list[int]]:
    return {"heads": list(counts[0]), "kv_heads": list(counts[1]), "neurons": list(counts[2])}


def _placeholder_plan(shape: ModelShape, counts: Counts, selection: SelectionConfig) -> Plan:
    """What make_plan returns with `placeholder_scores`, from the counts: every layer keeps its lowest-index units
    (the first heads of every key/value group, or the first groups when whole groups go; the first neurons)."""
    heads, kv_heads = [], []
    for q, kv, dense_q, dense_kv in zip(*counts[:2], shape.heads, shape.kv_heads):
        size = dense_q // dense_kv
        groups, per_group = (dense_kv, q // dense_kv) if kv == dense_kv else (kv, size)
        heads.append([g * size + i for g in range(groups) for i in range(per_group)])
        kv_heads.append(list(range(groups)))
    return Plan(
        family=shape.family, layout=selection.layout, heads=heads, kv_heads=kv_heads,
        neurons=[list(range(n)) for n in counts[2]], dense_heads=list(shape.heads),
        dense_kv_heads=list(shape.kv_heads), dense_neurons=list(shape.intermediate),
        meta={"selection": asdict(selection), "scores": "placeholder"},
    )


def _below(s: _Searcher, ratio: float | None) -> dict | None:
    """The next less pruned plan (at the largest ratio known not to fit), as `BudgetResult.below` reports it."""
    if ratio is None:
        return None
    counts, selection = s.plan(ratio)
    return {"ratio": ratio, "heads": selection.heads, "mlp": selection.mlp, "value": s.measure(s.shape(counts))[0],
            "counts": _counts_dict(counts), "config_error": s.config_error(ratio)}


def _check_scores(shape: ModelShape, scores: Scores) -> None:
    if len(scores.heads) != shape.num_layers or len(scores.neurons) != shape.num_layers:
        raise ValueError(f"scores cover {len(scores.heads)} layers but the model has {shape.num_layers}")
    for i, (h, n, dense_h, dense_n) in enumerate(zip(scores.heads, scores.neurons, shape.heads, shape.intermediate)):
        if h.numel() != dense_h or n.numel() != dense_n:
            raise ValueError(
                f"layer {i}: scores have {h.numel()} heads / {n.numel()} neurons, the model {dense_h} / {dense_n}"
            )


def fit_to_budget(
    model: nn.Module | ModelShape,
    scores: Scores | None,
    base: SelectionConfig,
    setup: TrainingSetup,
    budget: Budget | str,
    *,
    search: Search = "both",
    headroom: float = 0.0,
    require_saveable: bool = True,
    config: PretrainedConfig | None = None,
) -> BudgetResult:
    """The least pruned plan (smallest fraction removed) whose training fits `budget`; see the module docstring.

    model: the dense (or already pruned) model, meta-device models included, or its `ModelShape` alone (then
    `scores` must be None and `config`, the model's config, checks saveability; no module is built or touched).
    scores: the criterion's scores, or None for placeholders (shape only). base: layout, round_to and gqa of the
    plan (and the fixed ratio with `search="heads"` / `"mlp"`; `target_params` must be unset: it is a budget of its
    own). setup: how the model trains; for a memory budget its `num_gpus` is replaced by the budget's. headroom:
    fraction of each GPU kept free (CUDA context, fragmentation, buffers the memory model leaves out;
    `DEFAULT_HEADROOM` is what the CLI and run configs use). Raises ValueError when no valid plan fits."""
    budget = Budget.parse(budget)
    if search not in ("both", "heads", "mlp"):
        raise ValueError(f"search={search!r}: choose 'both', 'heads' or 'mlp'")
    if base.target_params is not None:
        raise ValueError("SelectionConfig.target_params is a budget of its own: use a 'params<=N' budget instead")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom={headroom!r}: the fraction of GPU memory kept free must be in [0, 1)")
    if isinstance(model, ModelShape):
        if scores is not None:
            raise ValueError("scores rank the units of a model: pass the model with its scores, not its ModelShape")
        if require_saveable and config is None:
            raise ValueError("a search on a ModelShape checks plans against the model's config: pass config= "
                             "(e.g. AutoConfig.from_pretrained(folder)) or require_saveable=False")
        shape, module, source = model, None, config
    else:
        shape, module, source = ModelShape.from_model(model), model, model
    if scores is None and (module is not None or base.layout == "global"):  # the uniform shape search needs none
        scores = placeholder_scores(shape)
    if scores is not None:
        _check_scores(shape, scores)
    if budget.kind == "memory":
        setup = replace(setup, num_gpus=budget.num_gpus)
    s = _Searcher(shape, module, scores, base, setup, budget, search, headroom, source, require_saveable)
    r, lo_fail, skipped = s.run()
    counts, selection = s.plan(r)
    plan = s.full_plan(r)
    value, est = s.measure(s.shape(counts))
    if value > s.limit or plan.counts() != _counts_dict(counts):  # the final check: never an overshoot
        raise AssertionError(f"internal error: the chosen plan {plan.counts()} needs {value} > {s.limit}, or differs "
                             f"from the searched counts {_counts_dict(counts)}")
    removed = dict(zip(("heads", "mlp"), s.removed(counts)))
    plan.meta["budget"] = {"budget": str(budget), "kind": budget.kind, "limit": s.limit, "value": value, "ratio": r,
                           "search": search, "headroom": headroom}
    return BudgetResult(
        budget=budget, plan=plan, selection=selection, ratio=r, removed=removed, value=value,
        dense_value=s.measure(shape)[0], limit=s.limit, setup=setup, shape=s.shape(counts), dense_shape=shape,
        memory=est, below=_below(s, lo_fail), skipped_unsaveable=skipped, evaluations=s.evaluations,
    )


def _refusal(s: _Searcher) -> str:
    counts, sel = s.plan(s.rmax)
    shape = s.shape(counts)
    value, est = s.measure(shape)
    dense_value = s.measure(s.dense_shape)[0]
    most = (
        f"the most pruned valid plan (heads={sel.heads:.6g}, mlp={sel.mlp:.6g}: {counts[0][0]} heads, "
        f"{counts[2][0]} MLP neurons in layer 0, {shape.num_params():,} parameters)"
    )
    budget = s.budget
    if budget.kind != "memory":
        what = "parameters" if budget.kind == "params" else "training FLOPs per token"
        return (
            f"budget {budget} cannot be met: {most} still has {format_measure(budget.kind, value)} "
            f"(dense {format_measure(budget.kind, dense_value)}); embeddings, norms and the output layer are not "
            f"pruned, so fewer {what} need a smaller model"
        )
    st = s.setup
    parts = ", ".join(f"{k} {format_bytes(getattr(est, k))}" for k in ("weights", "gradients", "optimizer", "activations", "transient"))
    msg = (
        f"budget {budget} cannot be met: {most} needs {format_bytes(value)} per GPU ({parts}) under ZeRO-{st.zero_stage} "
        f"on {st.num_gpus} GPU(s) with micro batch {st.micro_batch} × {st.seq_len} tokens"
        f"{', checkpointing' if st.activation_checkpointing else ''}; the budget allows {format_bytes(s.limit)} per GPU"
        f" (dense needs {format_bytes(dense_value)})"
    )
    return msg + "; " + _suggestions(s, shape)


def _suggestions(s: _Searcher, shape: ModelShape) -> str:
    """Single changes to the setup under which the most pruned plan fits, each checked with the memory model."""
    st, gpu = s.setup, int(s.budget.limit)
    headroom = 1.0 - s.limit / gpu
    fits, tried = [], []

    def need(setup: TrainingSetup) -> float:
        return estimate_memory(shape, setup).total

    for stage in range(st.zero_stage, 4):
        try:
            staged = replace(st, zero_stage=stage)
        except ValueError:
            continue
        n = min_gpus(shape, staged, gpu, headroom=headroom)
        if n is not None and (stage != st.zero_stage or n > st.num_gpus):
            fits.append(f"ZeRO-{stage} on {n} GPU(s)")
    if not st.activation_checkpointing:
        v = need(replace(st, activation_checkpointing=True))
        (fits if v <= s.limit else tried).append(f"activation checkpointing ({format_bytes(v)})")
    if st.micro_batch > 1:
        v = need(replace(st, micro_batch=1))
        (fits if v <= s.limit else tried).append(f"micro batch 1 ({format_bytes(v)})")
        if not st.activation_checkpointing:
            v = need(replace(st, micro_batch=1, activation_checkpointing=True))
            (fits if v <= s.limit else tried).append(f"micro batch 1 with checkpointing ({format_bytes(v)})")
    if fits:
        out = "it would fit with " + ", or ".join(fits) + " (then prune less)"
    else:
        out = "no single change of ZeRO stage / GPU count, micro batch or checkpointing makes it fit"
    if tried:
        out += "; not enough alone: " + ", ".join(tried)
    return out + "; or a shorter sequence length / larger GPUs"


# --------------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class BudgetReport:
    """Dense vs pruned: parameters, training FLOPs per token, memory per GPU under `setup`, and the fewest GPUs of
    `gpu_bytes` each needs under ZeRO 0/1/2/3 (None: does not fit on `max_gpus`). `pruned_*` are None without a plan."""

    setup: TrainingSetup
    gpu_bytes: int | None
    headroom: float
    dense_params: int
    dense_flops: float
    dense_memory: MemoryEstimate
    dense_min_gpus: dict[int, int | None]
    pruned_params: int | None = None
    pruned_flops: float | None = None
    pruned_memory: MemoryEstimate | None = None
    pruned_min_gpus: dict[int, int | None] | None = None
    counts: dict | None = None

    @property
    def has_pruned(self) -> bool:
        return self.pruned_params is not None

    def to_dict(self) -> dict[str, float]:
        """Flat numbers for MLflow `log_metrics`: `dense.params`, `pruned.flops_per_token`,
        `dense.memory.total` (bytes per GPU; also weights / gradients / optimizer / activations / transient),
        `pruned.min_gpus.zero3`, ...; a stage that cannot fit on the GPUs tried is left out. Also `gpu_bytes` and
        `pruned.params_fraction` (pruned / dense)."""
        out: dict[str, float] = {}
        if self.gpu_bytes is not None:
            out["gpu_bytes"] = self.gpu_bytes
        for name in ("dense", "pruned") if self.has_pruned else ("dense",):
            est: MemoryEstimate = getattr(self, f"{name}_memory")
            out[f"{name}.params"] = getattr(self, f"{name}_params")
            out[f"{name}.flops_per_token"] = getattr(self, f"{name}_flops")
            for part in ("weights", "gradients", "optimizer", "activations", "transient", "total"):
                out[f"{name}.memory.{part}"] = getattr(est, part)
            for stage, n in (getattr(self, f"{name}_min_gpus") or {}).items():
                if n is not None:
                    out[f"{name}.min_gpus.zero{stage}"] = n
        if self.has_pruned:
            out["pruned.params_fraction"] = self.pruned_params / self.dense_params
            out["pruned.flops_fraction"] = self.pruned_flops / self.dense_flops
        return out

    def format(self) -> str:
        """The printed table."""
        st = self.setup
        cols = ["dense"] + (["pruned"] if self.has_pruned else [])
        rows: list[tuple[str, list[str]]] = []

        def row(label: str, values: list[str]) -> None:
            rows.append((label, values))

        row("parameters", [f"{getattr(self, f'{c}_params'):,}" for c in cols])
        row("training FLOPs / token", [_format_count(getattr(self, f"{c}_flops")) for c in cols])
        row(f"memory per GPU (ZeRO-{st.zero_stage}, {st.num_gpus} GPU{'s' if st.num_gpus > 1 else ''})", ["" for _ in cols])
        for part in ("weights", "gradients", "optimizer", "activations", "transient", "total"):
            row(f"  {part}", [format_bytes(getattr(getattr(self, f"{c}_memory"), part)) for c in cols])
        if self.gpu_bytes is not None:
            label = f"fewest GPUs of {format_bytes(self.gpu_bytes)}" + (
                f" ({self.headroom:.0%} kept free)" if self.headroom else ""
            )
            row(label, ["" for _ in cols])
            for stage in sorted(self.dense_min_gpus):
                values = []
                for c in cols:
                    n = (getattr(self, f"{c}_min_gpus") or {}).get(stage)
                    values.append("does not fit" if n is None else str(n))
                row(f"  ZeRO-{stage}", values)
        width = max(len(label) for label, _ in rows) + 2
        colw = max([14] + [len(v) + 2 for _, vs in rows for v in vs])
        lines = [
            f"{st.precision}, {st.optimizer}, micro batch {st.micro_batch} × {st.seq_len} tokens, {st.attention} "
            f"attention, activation checkpointing {'on' if st.activation_checkpointing else 'off'}",
            "".ljust(width) + "".join(c.rjust(colw) for c in cols),
        ]
        lines += [label.ljust(width) + "".join(v.rjust(colw) for v in vs) for label, vs in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def budget_report(
    model: nn.Module | ModelShape,
    plan: Plan | None,
    setup: TrainingSetup,
    gpu_bytes: int | str | None,
    *,
    headroom: float = 0.0,
    max_gpus: int = 1024,
) -> BudgetReport:
    """Dense vs pruned (`plan` applied to `model`'s shape; None: dense only) under `setup`; `gpu_bytes` (e.g.
    "24GB"; None: no GPU counts) is the GPU size for the fewest-GPUs rows (`min_gpus_per_stage`)."""
    dense = model_shape(model)
    gpu = parse_memory(gpu_bytes) if gpu_bytes is not None else None

    def numbers(shape: ModelShape) -> tuple[int, float, MemoryEstimate, dict]:
        gpus = min_gpus_per_stage(shape, setup, gpu, max_gpus=max_gpus, headroom=headroom) if gpu is not None else {}
        return shape.num_params(), shape.flops_per_token(setup.seq_len), estimate_memory(shape, setup), gpus

    d = numbers(dense)
    report = BudgetReport(setup, gpu, headroom, *d)
    if plan is not None:
        pruned = dense.with_counts(**plan.counts())
        report.pruned_params, report.pruned_flops, report.pruned_memory, report.pruned_min_gpus = numbers(pruned)
        report.counts = plan.counts()
    return report


__all__ = [
    "BUDGET_SYNTAX",
    "DEFAULT_HEADROOM",
    "Budget",
    "BudgetReport",
    "BudgetResult",
    "budget_report",
    "fit_to_budget",
    "format_measure",
    "model_shape",
    "model_skeleton",
    "placeholder_scores",
    "plan_config_error",
]
