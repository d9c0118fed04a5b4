"""Typed run configuration: one YAML file in `configs/`, overridable as `key.sub=value` on the CLI.

Validated before any heavy work; unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

import earlycrop
from earlycrop.budget import DEFAULT_HEADROOM

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Either a local model folder (`name_or_path`) or a family built from scratch with `init` kwargs."""

    name_or_path: str | None = None
    # one of the families registered in earlycrop.FAMILIES (one adapter each)
    family: str | None = None
    # masked_lm: BERT-style pre-training (static masking, data.mlm_probability); families whose adapter lists
    # it in `tasks` (e.g. bert)
    task: Literal["causal_lm", "masked_lm", "sequence_classification"] = "causal_lm"
    num_labels: int = Field(2, ge=2)
    init: dict[str, Any] = Field(default_factory=dict)
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        # the choices come from the adapter registry; the error reads like pydantic's own Literal error
        if value is not None and value not in earlycrop.FAMILIES:
            names = [repr(name) for name in earlycrop.FAMILIES]
            expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.family is None):
            raise ValueError("set exactly one of model.name_or_path (a model folder) or model.family (from scratch)")
        if self.family is not None:
            _check_init(self.family, self.init)
        if self.family is not None and self.task not in earlycrop.FAMILIES[self.family].tasks:
            able = ", ".join(name for name, adapter in earlycrop.FAMILIES.items() if self.task in adapter.tasks)
            raise ValueError(f"model.task={self.task} needs a family that supports it (model.family: {able}), not {self.family}")
        return self


def _check_init(family: str, init: dict[str, Any]) -> None:
    """transformers configs swallow unknown kwargs and check shapes only when the model is built: check both now."""
    config_class = earlycrop.FAMILIES[family].config_class
    defaults = config_class()
    try:
        built = config_class(**init)
    except Exception as exc:  # transformers' strict-dataclass validation errors are not ValueErrors
        raise ValueError(f"model.init is not a valid {type(defaults).__name__}: {' '.join(str(exc).split())}") from None
    # a kwarg the config stores but does not define is a typo; one it consumes (rope_theta) is known
    unknown = [k for k in init if not hasattr(defaults, k) and hasattr(built, k)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults.to_dict()) + list(defaults.attribute_map), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.init.{unknown[0]} is not a {type(defaults).__name__} field{hint}")
    heads, kv = getattr(built, "num_attention_heads", None), getattr(built, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ValueError(
            f"model.init: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; "
            "use a divisor of num_attention_heads"
        )


class DataConfig(_Strict):
    """Where text comes from and how it becomes blocks; `source` is a file, folder, `gensim:wiki|lee|newsgroups|polarity` or a hub name."""

    source: str
    text_field: str = "text"
    label_field: str | None = None
    tokenizer: str | None = None
    vocab_size: int = Field(4096, ge=256)
    seq_len: int = Field(128, ge=8)
    validation_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    # a given held-out set (a published test split), used as it is: then `source` is all training text
    # and validation_fraction is ignored
    validation_source: str | None = None
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)


class ScoringSettings(_Strict):
    """How units are scored; declared once for a run's `prune:` section and the `earlycrop prune` command."""

    # auto: earlycrop (for a pretrained model with a new head too: benchmarks/recovery.py on the real MiniLM;
    # see pipeline/scoring.py)
    criterion: str = Field("auto", description="auto, or a registered criterion (earlycrop, grasp, snip, fisher, "
                                               "magnitude, activation, random)")
    hvp: Literal["exact", "finite_difference"] = Field("exact", description="how earlycrop/grasp compute H·g")
    fd_step: float = Field(1e-4, gt=0.0, description="finite-difference step h (ε = h/‖g‖); check it against exact scores")

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        if value not in earlycrop.CRITERIA and value != "auto":
            raise ValueError(f"unknown criterion {value!r}; choose one of: {', '.join(sorted(earlycrop.CRITERIA))}, or auto")
        return value


class SelectionSettings(_Strict):
    """How much to remove and how to spread it (earlycrop.SelectionConfig); declared once for a run's
    `prune:` section and the `prune` and `plan` commands."""

    heads: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of attention heads REMOVED")
    mlp: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of MLP neurons REMOVED")
    layout: Literal["uniform", "global"] = Field("uniform", description="the same count in every layer, or one ranking across layers")
    round_to: int = Field(1, ge=1, description="round kept neuron counts to a multiple (e.g. 8)")
    gqa: Literal["per_group", "group"] = Field("per_group", description="GQA: equal query heads per group, or whole groups")
    target_params: int | None = Field(None, gt=0, description="instead of the ratios: the smallest equal ratio within this many parameters")

    def selection(self) -> earlycrop.SelectionConfig:
        return earlycrop.SelectionConfig(self.heads, self.mlp, self.layout, self.round_to, self.gqa, self.target_params)


class PruneConfig(ScoringSettings, SelectionSettings):
    """What to score, how much to remove and when (`prune_at`: a step, 0 = before training, `auto`, or `never`)."""

    prune_at: int | Literal["auto", "never"] = 0
    auto_interval: int = Field(10, ge=1)
    auto_cap: int = Field(200, ge=1)
    calibration_batches: int = Field(4, ge=1)
    calibration_batch_size: int = Field(8, ge=1)
    schedule_after_prune: Literal["restart", "continue"] = "restart"
    # the loss the criterion differentiates. task: the model's own loss. pretraining: the checkpoint's
    # pre-training loss through its own trained head (masked or causal LM on the task's text), because
    # gradients through a NEW random task head say little about the pretrained features. auto: pretraining
    # when model.name_or_path gets a new task head and was saved with a pre-training head, task otherwise.
    objective: Literal["auto", "task", "pretraining"] = "auto"

    @field_validator("prune_at")
    @classmethod
    def _non_negative(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("prune_at must be >= 0, 'auto' or 'never'")
        return value


class DistillConfig(_Strict):
    """Distillation from the dense model, frozen, taken just before the cut (earlycrop.distill): the model as
    built for `prune_at: 0`, the dense model as trained so far for a later cut (distillation then starts at the
    cut). Each term has its weight; `logits` applies only where the teacher's head is trained (a causal or
    masked LM, a classifier saved with its head, or any head after dense training steps), never through a new
    random head."""

    enabled: bool = False
    task: float = Field(1.0, ge=0.0)
    logits: float = Field(1.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    hidden: float = Field(0.0, ge=0.0)
    hidden_loss: Literal["mse", "cosine"] = "mse"
    # auto: bfloat16 on a GPU that has it (the teacher only runs forwards), else the model's dtype
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    # a local folder with the dense model already fine-tuned on this task (e.g. a dense run's model/): its
    # trained head makes the logit term usable for a new-head task; None: the dense model as built
    teacher: str | None = None


class TrainConfig(_Strict):
    """The Accelerate loop; `max_steps` counts optimizer steps."""

    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    scheduler: Literal["cosine", "one_cycle", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    # None: whatever the accelerate launch config says (its `mixed_precision`), else full precision
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    # train only the parameters that are new in a pretrained model (a new task head) for this many steps
    # before scoring and fine-tuning (linear probing first), the encoder frozen
    head_warmup_steps: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # after a cut before training: this many steps of hidden-state distillation toward the dense model on
    # unlabelled text (the task's own, or `recovery_source`), before the task loss or a new head is used
    recovery_steps: int = Field(0, ge=0)
    recovery_source: str | None = None
    recovery_lr: float | None = Field(None, gt=0.0)


class TargetConfig(_Strict):
    """Prune to a hardware budget instead of fixed ratios: `24GB x 1`, `80GiB x 8`, `params<=50M`, `flops<=2G`.

    The smallest fraction removed whose plan trains within the budget is chosen (earlycrop.budget);
    `search: heads|mlp` keeps the other kind at its configured ratio.
    """

    budget: str
    search: Literal["both", "heads", "mlp"] = "both"
    headroom: float = Field(DEFAULT_HEADROOM, ge=0.0, lt=1.0)
    activation_checkpointing: bool = False

    @field_validator("budget")
    @classmethod
    def _parses(cls, value: str) -> str:
        from earlycrop.budget import Budget

        Budget.parse(value)
        return value


class RunConfig(_Strict):
    """A whole experiment: model, data, pruning, training and tracking."""

    seed: int = 0
    output_dir: str = "runs/default"
    experiment: str = "earlycrop"
    run_name: str | None = None
    tracking: bool = True
    tracking_uri: str | None = None
    tracking_fallback_local: bool = False
    # a name in the MLflow Model Registry: the final model (an MLflow Logged Model either way) becomes a new version of it
    register_model: str | None = None
    # how long a rank waits in a collective (scoring all-reduce, a DDP step) before failing: a hung or stopped
    # peer then ends the job with an error instead of the 30-minute default
    collective_timeout_s: int = Field(600, ge=10)
    model: ModelConfig
    data: DataConfig
    prune: PruneConfig = Field(default_factory=PruneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    target: TargetConfig | None = None

    @field_validator("output_dir")
    @classmethod
    def _not_a_file(cls, value: str) -> str:
        if Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"output_dir={value} is an existing file; point output_dir at a folder")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.model.task == "sequence_classification" and self.data.label_field is None:
            raise ValueError("model.task is sequence_classification: set data.label_field")
        if self.prune.objective == "pretraining" and self.model.name_or_path is None:
            raise ValueError("prune.objective=pretraining scores through a pretrained checkpoint's own head: set "
                             "model.name_or_path (a model built from scratch has no pre-training head)")
        if self.train.head_warmup_steps and self.model.name_or_path is None:
            raise ValueError("train.head_warmup_steps trains the new head of a pretrained model: set model.name_or_path "
                             "or train.head_warmup_steps=0")
        if self.train.recovery_steps and self.prune.prune_at != 0:
            raise ValueError("train.recovery_steps needs prune.prune_at: 0 (recovery runs between the cut and the first "
                             f"training step), not {self.prune.prune_at!r}")
        if self.train.distill.enabled and self.prune.prune_at == "never":
            raise ValueError("train.distill distils the pruned model from the dense one: it needs a cut (prune.prune_at "
                             "is 'never')")
        if self.target is not None and self.prune.target_params is not None:
            raise ValueError("set target.budget or prune.target_params, not both (a params<=N budget does the same)")
        if self.prune.prune_at == "auto" and self.prune.auto_cap >= self.train.max_steps:
            raise ValueError(
                f"prune.auto_cap={self.prune.auto_cap} is not before train.max_steps={self.train.max_steps}: "
                "the model might never be pruned; lower prune.auto_cap"
            )
        if isinstance(self.prune.prune_at, int) and self.prune.prune_at >= self.train.max_steps:
            raise ValueError(
                f"prune.prune_at={self.prune.prune_at} is not before train.max_steps={self.train.max_steps}: "
                "lower prune.prune_at (0 prunes before training) or raise train.max_steps"
            )
        if self.model.family is not None:  # a model folder's limit is in its config.json, checked when it is loaded
            check_seq_len(earlycrop.FAMILIES[self.model.family].config_class(**self.model.init), self.data.seq_len, "data.seq_len")
        return self


def _section_keys(loc: tuple) -> list[str]:
    """The valid keys of the section that holds `loc` (for did-you-mean hints)."""
    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        info = section.model_fields.get(str(part))
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _section_keys(e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            msg = f"unknown key; did you mean {close[0]!r}?" if close else f"unknown key; valid keys: {', '.join(valid)}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] != "value_error" and not isinstance(e.get("input"), (dict, list, type(None))):
                msg += f" (got {e['input']!r})"
        # our own validators name the full key already
        lines.append(f"{key}: {msg}" if key and key not in msg else msg)
    return f"invalid config {origin}: " + "; ".join(lines)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. output_dir=/tmp/run or train.lr=1e-3)")
        key, raw = item.split("=", 1)
        if not all(key.strip().split(".")):
            raise ValueError(f"override {item!r} has no key: write key=value, e.g. train.lr=1e-3" if not key.strip() else
                             f"override {item!r}: {key.strip()!r} has an empty part between dots")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML (quote strings with special characters)") from None
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, validate; raise ValueError naming each bad key."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"config file {path} is a directory: pass a YAML file such as configs/quickstart.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config {path} is not valid YAML{where}: {problem}; fix the syntax there") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of keys to values")
    data = apply_overrides(data, list(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_error(err, str(path))) from None


class PruneCommandConfig(ScoringSettings, SelectionSettings):
    """`earlycrop prune`: score a local model folder on calibration text and save the pruned model, its
    plan and its scores. Built from the command's arguments (launch/cli.py generates them from these fields)."""

    model: str = Field(description="local model folder (config.json, *.safetensors, tokenizer)")
    data: str = Field(description="calibration text: .txt / .jsonl / .parquet file or folder, or gensim:wiki / lee / newsgroups / polarity")
    out: str = Field(description="output folder for the pruned model, plan.json and scores.safetensors")
    overwrite: bool = Field(False, description="replace the model folder already in --out")
    batches: int = Field(5, ge=1, description="calibration batches (sharded over ranks)")
    batch_size: int = Field(8, ge=1, description="sequences per calibration batch")
    seq_len: int = Field(128, ge=1, description="tokens per calibration sequence")
    text_field: str = Field("text", description="text column of .jsonl / .parquet data")
    label_field: str | None = Field(None, description="label column, for sequence-classification models")
    objective: Literal["auto", "task", "self"] = Field(
        "auto", description="loss the criterion differentiates: task (the labels; a language model's own text), self (a "
                            "classifier's own predictions on the text as labels: unlabelled text is enough), auto "
                            "(self for a classifier without --label-field, task otherwise)")
    score_dtype: Literal["float32", "float64"] = Field(
        "float32", description="precision of scoring (float64 makes N-rank and 1-rank scores agree to round-off)")
    seed: int = Field(0, description="seed of the calibration draw (and of random)")


def validation_message(err: ValidationError, flags: bool = False) -> str:
    """One line for a ValidationError; with `flags`, keys read as command-line flags (`--batch-size`)."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        name = f"--{key.replace('_', '-')}" if flags else key
        ctx = e.get("ctx") or {}
        if e["type"] == "greater_than_equal":
            parts.append(f"{name} must be at least {ctx['ge']}")
        elif e["type"] == "greater_than" and ctx.get("gt") == 0:
            parts.append(f"{name} must be a positive number (got {e['input']!r})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(msg if key in msg or e["type"] == "value_error" else f"{name}: {msg}")
    return "; ".join(parts)


def read_config_json(path: Path) -> dict:
    """config.json as a dict, read here so a broken file is named before transformers reports it deep in a load."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"'{path}' is not a valid JSON file ({exc}); re-save it with save_pretrained") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{path}' is not a valid JSON file (not an object); re-save it with save_pretrained")
    return config


def check_seq_len(config_or_folder: str | Path | dict | PretrainedConfig, seq_len: int, key: str) -> None:
    """Refuse a sequence length past the model's position limit: GPT-2 would crash mid-scoring with an
    IndexError and RoPE models would run silently outside the lengths they were trained on."""
    folder = isinstance(config_or_folder, (str, Path))
    if folder and not (Path(config_or_folder) / "config.json").is_file():
        return  # not a model folder: check_model_folder says what is missing
    if folder:
        config = read_config_json(Path(config_or_folder) / "config.json")
    else:
        config = config_or_folder if isinstance(config_or_folder, dict) else config_or_folder.to_dict()
    name = next((k for k in ("n_positions", "max_position_embeddings") if isinstance(config.get(k), int)), None)
    if name is not None and seq_len > config[name]:
        where, fix = (f" in {Path(config_or_folder) / 'config.json'}", "") if folder else ("", f" or raise {name}")
        raise ValueError(f"{key}={seq_len} is above the model's position limit ({name}={config[name]}{where}); "
                         f"lower {key} to at most {config[name]}{fix}")
