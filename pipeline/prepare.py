"""Text → tensors for a run: documents, the train/validation split, the tokenizer, blocks and the
calibration batches, identical on every rank (docs/DESIGN.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from . import data as data_lib
from .config import RunConfig
from .modeling import load_model_tokenizer


@dataclass
class Prepared:
    """Text turned into tensors, identical on every rank."""

    tokenizer: object
    train_blocks: dict[str, torch.Tensor]
    val_blocks: dict[str, torch.Tensor]
    calibration: list[dict[str, torch.Tensor]]


def to_tensors(ds: datasets.Dataset) -> dict[str, torch.Tensor]:
    cols = [c for c in ("input_ids", "attention_mask", "labels") if c in ds.column_names]
    return {c: torch.tensor(list(ds[c])) for c in cols}


def split(cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and validation documents: a given validation source as it is, or a seeded split of the source."""
    d = cfg.data
    docs = data_lib.load_documents(d.source, text_field=d.text_field, label_field=d.label_field)
    if d.validation_source is None:
        return data_lib.split_documents(docs, d.validation_fraction, cfg.seed)
    return docs, data_lib.load_documents(d.validation_source, text_field=d.text_field, label_field=d.label_field)


def blocks(cfg: RunConfig, docs: datasets.Dataset, tokenizer, seed: int) -> datasets.Dataset:
    """Documents as the task's fixed-size blocks (packed text, statically masked text, or labelled rows)."""
    seq_len = cfg.data.seq_len
    if cfg.model.task == "causal_lm":
        return data_lib.pack_causal_lm(docs, tokenizer, seq_len)
    if cfg.model.task == "masked_lm":
        masked = data_lib.mask_for_mlm(to_tensors(data_lib.pack_causal_lm(docs, tokenizer, seq_len)), tokenizer,
                                       cfg.data.mlm_probability, seed)
        return datasets.Dataset.from_dict({k: v.tolist() for k, v in masked.items()})
    return data_lib.tokenize_classification(docs, tokenizer, seq_len)


def prepare_data(cfg: RunConfig, accelerator: Accelerator) -> Prepared:
    """Documents → split → tokenizer → blocks → calibration batches (drawn from the training split)."""
    train_docs, val_docs = split(cfg)
    tokenizer = load_tokenizer(cfg, accelerator, train_docs)
    train_ds = blocks(cfg, train_docs, tokenizer, cfg.seed)
    val_ds = blocks(cfg, val_docs, tokenizer, cfg.seed + 1)
    calibration = data_lib.calibration_batches(
        train_ds, num_batches=cfg.prune.calibration_batches, batch_size=cfg.prune.calibration_batch_size, seed=cfg.seed
    )
    if accelerator.num_processes > len(calibration) and cfg.prune.prune_at != "never":
        raise ValueError(
            f"{accelerator.num_processes} ranks but only {len(calibration)} calibration batches: "
            f"set prune.calibration_batches >= {accelerator.num_processes}"
        )
    prepared = Prepared(tokenizer, to_tensors(train_ds), to_tensors(val_ds), calibration)
    global_batch = cfg.train.micro_batch_size * accelerator.num_processes
    for name, tensors in (("training", prepared.train_blocks), ("validation", prepared.val_blocks)):
        count = tensors["input_ids"].shape[0]
        if count < global_batch:
            raise ValueError(
                f"{count} {name} blocks are fewer than one batch on every rank ({cfg.train.micro_batch_size} × "
                f"{accelerator.num_processes}): use more text, a smaller train.micro_batch_size or data.seq_len"
                + (", or a larger data.validation_fraction" if name == "validation" else "")
            )
    return prepared


def load_tokenizer(cfg: RunConfig, accelerator: Accelerator, train_docs: datasets.Dataset):
    """The configured tokenizer, the model folder's own, or (from scratch) one trained on the training split."""
    if cfg.data.tokenizer:
        tok = load_model_tokenizer(cfg.data.tokenizer)
        if tok is None:
            raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer} holds no tokenizer files")
        return tok
    if cfg.model.name_or_path:
        tok = load_model_tokenizer(cfg.model.name_or_path)
        if tok is None:
            raise FileNotFoundError(f"{cfg.model.name_or_path} has no tokenizer: set data.tokenizer to a tokenizer folder")
        return tok
    # from scratch: rank 0 trains a byte-level BPE on the training split, the others load it
    folder = Path(cfg.output_dir) / "tokenizer"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            tokenizer = data_lib.train_tokenizer(list(train_docs["text"]), cfg.data.vocab_size,
                                                 mask_token=cfg.model.task == "masked_lm")
            tokenizer.save_pretrained(folder)
        return load_model_tokenizer(str(folder))


def check_tokenizer(model, tokenizer) -> None:
    """A tokenizer whose ids run past the embedding table fails here, not as an index error mid-training."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
            "use the model's own tokenizer (data.tokenizer) or a larger vocab_size"
        )


def check_labels(model, prepared: Prepared) -> None:
    """Class ids beyond the classifier's outputs fail here, not as an index error mid-training."""
    if prepared.train_blocks["labels"].dim() != 1:
        return
    top = max(int(b["labels"].max()) for b in (prepared.train_blocks, prepared.val_blocks))
    if top >= model.config.num_labels:
        raise ValueError(f"the data has labels up to {top} but model.num_labels={model.config.num_labels}: set model.num_labels={top + 1}")
