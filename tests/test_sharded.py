"""Scoring a model that does not fit on one device (issue 14): peak memory per rank in `earlycrop prune`, and
scoring under DeepSpeed ZeRO-3 with the parameters partitioned (pipeline/sharded.py, docs/DESIGN.md §8)."""

from __future__ import annotations

import json
import re
import resource
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import earlycrop
from launch.cli import main
from pipeline import data as data_lib
from pipeline.distributed import describe_peak_memory, peak_memory_per_rank
from pipeline.sharded import full_shapes, load_partitioned, score_partitioned

from . import launching
from .tiny_models import batches, build

PEAK_LINE = re.compile(r"^peak memory per rank: (.*)$", re.M)


def test_peak_memory_of_one_process_is_its_peak_rss():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = peak_memory_per_rank()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert len(peaks) == 1 and before <= peaks[0] <= after


def test_peak_memory_line_names_every_rank():
    assert describe_peak_memory([1_230_000_000, 1_080_000_000]) == "peak memory per rank: 0: 1.2 GB, 1: 1.1 GB"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Llama saved with a tokenizer trained on real text."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"]), 300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _peaks(stdout: str) -> list[tuple[int, float]]:
    lines = PEAK_LINE.findall(stdout)
    assert len(lines) == 1, stdout
    return [(int(rank), float(gb)) for rank, gb in re.findall(r"(\d+): (\d+\.\d) GB", lines[0])]


ARGS = ["--data", "gensim:lee", "--criterion", "snip", "--mlp", "0.5", "--batches", "2", "--batch-size", "2", "--seq-len", "16"]


def test_prune_prints_its_peak_memory(tmp_path, model_folder, capsys):
    """One process: one entry, rank 0, its peak RSS (> 0.1 GB: Python with torch and transformers alone holds more)."""
    assert main(["prune", "--model", str(model_folder), *ARGS, "--out", str(tmp_path / "out")]) == 0
    peaks = _peaks(capsys.readouterr().out)
    assert [rank for rank, _ in peaks] == [0] and peaks[0][1] > 0.1


@pytest.mark.slow
def test_prune_prints_the_peak_memory_of_every_rank(tmp_path, model_folder):
    """Under torchrun, once, from rank 0: one entry per rank, in rank order."""
    two = launching.torchrun(2, "-m", "launch.cli", "prune", "--model", str(model_folder), *ARGS, "--out", str(tmp_path / "two"))
    peaks = _peaks(two.stdout)
    assert [rank for rank, _ in peaks] == [0, 1] and all(gb > 0.1 for _, gb in peaks)


# ---------------------------------------------------------------- scoring under ZeRO-3 with partitioned parameters

ZERO3_CRITERIA = ["snip", "fisher", "activation", "magnitude", "earlycrop:finite_difference", "grasp:finite_difference"]
# float32, 2 gloo ranks vs one process holding the whole model, max |difference| relative to the layer's largest
# score. Measured: gate criteria ≤ 4.3e-7 (summation order), magnitude 0 (float64 sums of squares), earlycrop / grasp
# 4.8e-4 (float32 round-off in g and the gate gradients, divided by the step 2ε). float64 cannot be compared:
# DeepSpeed 0.19.8's zero.Init partitions only float32 / bfloat16 / float16 parameters.
ZERO3_TOLERANCE = {"magnitude": 1e-6, "earlycrop:finite_difference": 2e-3, "grasp:finite_difference": 2e-3}


def test_zero3_refuses_double_backward_and_criteria_that_need_whole_weights():
    with pytest.raises(ValueError, match="hvp: exact needs a double backward.*use hvp: finite_difference"):
        score_partitioned(None, earlycrop.make_criterion("earlycrop"), [])
    with pytest.raises(ValueError, match="criterion 'grasp' with hvp: exact"):
        score_partitioned(None, earlycrop.make_criterion("grasp", hvp="exact"), [])

    @earlycrop.register_criterion
    class WholeWeights(earlycrop.Criterion):
        name = "whole-weights"

        def score(self, ctx):
            raise AssertionError("never reached")

    try:
        with pytest.raises(ValueError, match="'whole-weights' cannot score a ZeRO-3-partitioned model; these can: earlycrop"):
            score_partitioned(None, "whole-weights", [])
    finally:
        earlycrop.unregister_criterion("whole-weights")


def test_zero3_refuses_float64_instead_of_silently_casting():
    with pytest.raises(ValueError, match="partitions only float32, bfloat16 and float16 parameters"):
        load_partitioned("unused", dtype=torch.float64)


def test_full_shapes_shows_a_partitioned_parameter_whole_and_restores_it():
    model = build("llama")
    p = model.model.layers[0].self_attn.q_proj.weight
    p.ds_shape = p.shape
    p.data = torch.empty(0)
    with full_shapes(model):
        assert p.shape == p.ds_shape and p.untyped_storage().nbytes() == 4  # one element, stride 0
        assert earlycrop.get_adapter(model).layers(model)[0].num_heads == 8
    assert p.shape == torch.Size([0])


@pytest.fixture(scope="module")
def zero3_scores(tmp_path_factory):
    """ZERO3_CRITERIA scored by 2 ZeRO-3 ranks on the partitions of a saved model (tests/workers/score_zero3.py),
    and here by one process holding it whole, on the same batches."""
    out = tmp_path_factory.mktemp("zero3")
    model = build("llama")
    model.save_pretrained(out / "model")
    launching.torchrun(2, "tests/workers/score_zero3.py", str(out), str(out / "model"), "float32", *ZERO3_CRITERIA)
    whole = {}
    for name in ZERO3_CRITERIA:
        base, _, hvp = name.partition(":")
        criterion = earlycrop.make_criterion(base, **({"hvp": hvp} if hvp else {}))
        whole[name] = earlycrop.score_units(model, criterion, batches("llama", n=4)).to_tensors()
    return out, whole


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO3_CRITERIA)
def test_zero3_two_ranks_score_like_one_process(zero3_scores, name):
    out, whole = zero3_scores
    whole = whole[name]
    for rank in (0, 1):
        sharded = load_file(out / f"{name.replace(':', '-')}_scores_2_{rank}.safetensors")
        for key in ("heads", "neurons"):
            err = ((sharded[key] - whole[key]).abs().amax(1) / whole[key].abs().amax(1)).max()
            assert err <= ZERO3_TOLERANCE.get(name, 1e-5), (key, float(err))


@pytest.mark.slow
def test_zero3_ranks_never_hold_the_model_whole(zero3_scores):
    for rank in (0, 1):
        checks = json.loads((zero3_scores[0] / f"checks_{rank}.json").read_text())
        assert checks["numel_held"] == 0  # every parameter partitioned again after every pass
        assert checks["partition_numel"] * 2 == checks["full_numel"]  # each rank holds its half
        assert checks["restored"]  # the finite differences left every partition bit-identical
        exact, uneven = checks["refusals"]
        assert "use hvp: finite_difference" in exact
        assert "divide evenly over the 2 ranks" in uneven and "got 3" in uneven


# ------------------------------------------------ `earlycrop prune` under accelerate launch with ZeRO-3

ZERO3_PRUNES = {
    # family, arguments: GQA Llama with finite-difference earlycrop (uniform: plain transformers loads it) and
    # GPT-2 (tied embeddings, fused q/k/v) with snip and a global layout (earlycrop.from_pretrained loads it)
    "llama-earlycrop": ("llama", ["--criterion", "earlycrop", "--hvp", "finite_difference", "--layout", "uniform"]),
    "gpt2-snip": ("gpt2", ["--criterion", "snip", "--layout", "global"]),
}


def _saved_with_tokenizer(folder, family: str, tokenizer) -> None:
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                           n_positions=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ZERO3_PRUNES))
def test_prune_under_zero3_gives_the_outputs_of_one_process(tmp_path, case):
    """Two ZeRO-3 ranks (the model partitioned while it loads, cut block by block) save the model, plan and scores
    one process saves; the pruned model loads and computes the same logits."""
    family, extra = ZERO3_PRUNES[case]
    tokenizer = data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"]), 300)
    _saved_with_tokenizer(tmp_path / "model", family, tokenizer)
    args = ["prune", "--model", str(tmp_path / "model"), "--data", "gensim:lee", "--heads", "0.5", "--mlp", "0.5",
            "--batches", "2", "--batch-size", "2", "--seq-len", "16", *extra]
    two = launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", *args, "--out", str(tmp_path / "z3"))
    assert "DeepSpeed ZeRO-3: parameters partitioned" in two.stdout
    assert [rank for rank, _ in _peaks(two.stdout)] == [0, 1]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    z3, one = tmp_path / "z3", tmp_path / "one"
    assert json.loads((z3 / "plan.json").read_text()) == json.loads((one / "plan.json").read_text())
    weights_z3, weights_one = load_file(z3 / "model.safetensors"), load_file(one / "model.safetensors")
    assert weights_z3.keys() == weights_one.keys()
    assert all(torch.equal(weights_z3[k], weights_one[k]) for k in weights_one)  # the same slices of the same weights
    scores_z3, scores_one = load_file(z3 / "scores.safetensors"), load_file(one / "scores.safetensors")
    for key, whole in scores_one.items():
        err = ((scores_z3[key] - whole).abs().amax(1) / whole.abs().amax(1)).max()
        assert err <= ZERO3_TOLERANCE.get("earlycrop:finite_difference" if family == "llama" else "snip", 1e-5)
    ids = torch.tensor([tokenizer.encode("the market rallied after the report")])
    assert torch.equal(earlycrop.from_pretrained(z3)(ids).logits, earlycrop.from_pretrained(one)(ids).logits)
    if family == "llama":
        assert torch.equal(LlamaForCausalLM.from_pretrained(z3)(ids).logits, earlycrop.from_pretrained(one)(ids).logits)


def test_prune_refuses_float64_scoring_under_zero3(tmp_path, model_folder, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(launching.REPO / "launch/deepspeed/zero3.json"))
    assert main(["prune", "--model", str(model_folder), *ARGS, "--score-dtype", "float64", "--out", str(tmp_path / "o")]) != 0
    assert "--score-dtype float64 cannot be partitioned" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_model_pruned_under_zero3_trains_partitioned(tmp_path):
    """The two-step path for a dense model no rank can hold: `earlycrop prune` under ZeRO-3, then `earlycrop run`
    under ZeRO-3 on what it saved (never pruned again); the partitioned pruned model learns."""
    tokenizer = data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"]), 300)
    _saved_with_tokenizer(tmp_path / "model", "llama", tokenizer)
    launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "prune", "--model", str(tmp_path / "model"),
                         "--data", "gensim:lee", "--heads", "0.5", "--mlp", "0.5", "--batches", "2", "--batch-size", "2",
                         "--seq-len", "16", "--criterion", "earlycrop", "--hvp", "finite_difference", "--out", str(tmp_path / "pruned"))
    out = tmp_path / "run"
    launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", "configs/ci_tiny.yaml",
                         f"output_dir={out}", f"model.name_or_path={tmp_path / 'pruned'}", "model.family=null",
                         "prune.prune_at=never", "train.max_steps=8", "tracking=false")
    result = json.loads((out / "summary.json").read_text())
    pruned = sum(p.numel() for p in earlycrop.from_pretrained(tmp_path / "pruned").parameters())
    assert result["params_dense"] == result["params_final"] == pruned
    assert result["val_loss"] < result["val_loss_at_start"]


@pytest.mark.slow
def test_run_under_zero3_scores_and_cuts_the_dense_model_partitioned(tmp_path):
    """`earlycrop run` under ZeRO-3, cut before training: the dense model loads partitioned, is scored on its
    partitions, cut block by block, and stays partitioned as the teacher of recovery and distillation. The run
    ends where the same run under ZeRO-2 (dense model whole on every rank) ends, also when resumed."""
    tokenizer = data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"]), 300)
    _saved_with_tokenizer(tmp_path / "model", "llama", tokenizer)
    common = [f"model.name_or_path={tmp_path / 'model'}", "model.family=null", "prune.hvp=finite_difference",
              "train.max_steps=8", "train.checkpoint_every=4", "train.recovery_steps=2", "train.distill.enabled=true",
              "train.distill.hidden=1.0", "tracking=false"]
    whole, parts = tmp_path / "zero2", tmp_path / "zero3"
    launching.accelerate("launch/accelerate/cpu_2proc_zero2.yaml", "-m", "launch.cli", "run", "configs/ci_tiny.yaml",
                         f"output_dir={whole}", *common)
    out = launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", "configs/ci_tiny.yaml",
                               f"output_dir={parts}", *common).stdout
    assert "the dense model is partitioned over the 2 ranks as it loads" in out
    assert json.loads((parts / "plan.json").read_text()) == json.loads((whole / "plan.json").read_text())
    expected = json.loads((whole / "summary.json").read_text())
    result = json.loads((parts / "summary.json").read_text())
    assert result["params_dense"] == expected["params_dense"] and result["params_final"] == expected["params_final"]
    assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-4)
    for later in sorted((parts / "checkpoints").glob("step_*"))[1:]:  # as if killed after the step-4 checkpoint
        shutil.rmtree(later)
    (parts / "model").rename(parts / "model.first")
    launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", "configs/ci_tiny.yaml",
                         f"output_dir={parts}", *common, "--resume")
    assert json.loads((parts / "summary.json").read_text())["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-4)
