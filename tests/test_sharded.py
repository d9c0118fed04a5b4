"""Scoring a model that does not fit on one device (issue 14): peak memory per rank in `earlycrop prune`."""

from __future__ import annotations

import re
import resource

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launch.cli import main
from pipeline import data as data_lib
from pipeline.distributed import describe_peak_memory, peak_memory_per_rank

from . import launching

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
