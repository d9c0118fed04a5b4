"""Offline-first data: documents, a locally trained tokenizer, packed blocks and calibration shards.

The machine has no hub access, so every source that matters loads from local files or from the
real English text that ships inside gensim's test data (docs/DESIGN.md §6). Document granularity:

- ``.txt`` files: one document per blank-line-separated paragraph block (``sample_by="paragraph"``),
  so a paragraph wrapped over several lines stays one document;
- ``gensim:wiki``: one document per Wikipedia article (its clean prose paragraphs joined by a blank
  line), so a train/validation split by document never puts two paragraphs of one article on both sides;
- ``gensim:lee``: one document per line of ``lee_background.cor`` (one news story per line).

Two small LABELLED sets ship there too (columns ``text`` and ``label``, a ``ClassLabel``; load them with
``label_field="label"`` for classification, or without it to use their text only):

- ``gensim:polarity``: ``pang_lee_polarity.cor``, 200 movie-review sentences (100 ``neg``, 100 ``pos``) in
  fastText format (``__label__neg <lower-cased, tokenized sentence>``, Windows-1252), a sample of Pang & Lee's sentence
  polarity dataset v1.0 (rt-polarity, Pang & Lee, ACL 2005);
- ``gensim:newsgroups``: ``mini_newsgroup``, 200 posts of the 20 Newsgroups corpus (100 ``alt.atheism``,
  100 ``sci.space``), a zlib-compressed pickle of a scikit-learn ``Bunch``. It is read with an unpickler that
  admits only the handful of classes that file needs (never arbitrary code), and headers, quoted lines and
  signature blocks are stripped as scikit-learn's ``remove=("headers", "footers", "quotes")`` does: the
  ``Newsgroups:`` header names the class outright.

Splitting happens on documents *before* tokenisation and packing, so no text leaks across the split.
"""

from __future__ import annotations

import bz2
import codecs
import copyreg
import functools
import io
import json
import os
import pickle
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "load_documents",
    "train_tokenizer",
    "split_documents",
    "pack_causal_lm",
    "tokenize_classification",
    "mask_for_mlm",
    "calibration_batches",
    "shard_batches",
]

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"

GENSIM_WIKI = "gensim:wiki"
GENSIM_LEE = "gensim:lee"
GENSIM_POLARITY = "gensim:polarity"
GENSIM_NEWSGROUPS = "gensim:newsgroups"
GENSIM_SOURCES = (GENSIM_WIKI, GENSIM_LEE, GENSIM_POLARITY, GENSIM_NEWSGROUPS)
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILE = "lee_background.cor"
_POLARITY_FILE = "pang_lee_polarity.cor"
_NEWSGROUPS_FILE = "mini_newsgroup"

# Extension -> `datasets` packaged builder.
_BUILDERS: dict[str, str] = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
# Missing sources with these suffixes are paths, never hub names.
_PATH_SUFFIXES = {*_BUILDERS, ".csv", ".tsv", ".arrow", ".gz", ".bz2", ".zip"}

T = TypeVar("T")

# A wiki line that still carries markup, is a heading/list/table line, or is a link: not prose.
_WIKI_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\||<|>|&[a-z]+;|^\s*[=*#:;!]|https?://")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?$")
_MIN_PARAGRAPH_WORDS = 8
# 20 Newsgroups: lines that quote another post, or introduce a quote (as scikit-learn strips them).
_NEWS_QUOTE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


def load_documents(
    source: str,
    *,
    text_field: str = "text",
    label_field: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
    """Load documents as a Dataset with a ``text`` column (and ``label`` when ``label_field`` is set).

    ``source`` is a local file or folder (``.txt``, ``.jsonl``/``.json``, ``.parquet``), ``gensim:wiki``,
    ``gensim:lee``, the labelled ``gensim:polarity`` / ``gensim:newsgroups`` (fields ``text``, ``label``),
    or a hub dataset name (which only works where the hub is reachable or cached).
    String labels are encoded to class ids here, before any split, so train and validation share
    one label mapping.
    """
    if source in (GENSIM_WIKI, GENSIM_LEE):
        if label_field is not None:
            raise ValueError(
                f"{source!r} has no labels; drop label_field={label_field!r}, or use a labelled local file "
                f"or {GENSIM_POLARITY!r} / {GENSIM_NEWSGROUPS!r}"
            )
        texts = _wiki_articles() if source == GENSIM_WIKI else _lee_documents()
        return _from_texts(list(texts), source)
    if source == GENSIM_POLARITY:
        return _select_fields(_polarity_documents(), source, text_field=text_field, label_field=label_field)
    if source == GENSIM_NEWSGROUPS:
        return _select_fields(_newsgroups_documents(), source, text_field=text_field, label_field=label_field)
    if source.startswith("gensim:"):
        raise ValueError(f"unknown gensim corpus {source!r}; use one of {', '.join(map(repr, GENSIM_SOURCES))}")

    path = Path(source).expanduser()
    if path.exists():
        ds = _load_local(path, cache_dir=cache_dir)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"data source {source!r} does not exist; pass an existing file or folder")
    else:
        ds = _load_hub(source, cache_dir=cache_dir)
    return _select_fields(ds, source, text_field=text_field, label_field=label_field)


def _looks_like_path(source: str) -> bool:
    """A missing source that is clearly meant as a path must not be sent to the hub."""
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _PATH_SUFFIXES


def _load_local(path: Path, *, cache_dir: str | None) -> Dataset:
    """Load a local file or a folder of same-type files through the matching `datasets` builder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        kinds = {p.suffix.lower() for p in files if p.suffix.lower() in _BUILDERS}
        if not kinds:
            raise ValueError(
                f"folder {str(path)!r} holds no supported data files; add {sorted(_BUILDERS)} files"
            )
        builders = {_BUILDERS[k] for k in kinds}
        if len(builders) > 1:
            raise ValueError(
                f"folder {str(path)!r} mixes file types {sorted(kinds)}; keep one format per folder"
            )
        files = [p for p in files if p.suffix.lower() in kinds]
    else:
        suffix = path.suffix.lower()
        if suffix not in _BUILDERS:
            raise ValueError(
                f"unsupported data file {str(path)!r} (extension {suffix or 'none'!r}); "
                f"use one of {sorted(_BUILDERS)}"
            )
        files = [path]
    builder = _BUILDERS[files[0].suffix.lower()]
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"data file {str(f)!r} is empty; add documents or remove it")
        if builder != "parquet":
            _check_utf8(f)
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as exc:  # datasets wraps parse errors in its own types; name the file instead.
        if builder == "json":
            for f in files:
                _check_json_records(f)
        raise ValueError(f"could not read {str(path)!r} as {builder}: {exc}") from exc
    assert isinstance(ds, Dataset)
    return ds


def _check_json_records(path: Path) -> None:
    """Name the file and line of the first malformed record: `datasets` only says that "an error occurred"."""
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        json.loads(next((line for line in lines if line.strip()), ""))
    except json.JSONDecodeError:  # not JSON Lines: one JSON document (an array of records) over many lines
        try:
            json.loads("\n".join(lines))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} line {exc.lineno} is not valid JSON ({exc.msg}); fix the syntax there") from None
        return
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{str(path)!r} line {number} is a JSON {type(record).__name__}, not an object with fields; "
                             "fix or remove that line")


def _check_utf8(path: Path) -> None:
    """Fail early with the file name: `datasets` reports decode errors deep inside a worker."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"data file {str(path)!r} is not UTF-8 (bad byte at offset {offset + exc.start}); "
                    "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from exc
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise ValueError(f"data file {str(path)!r} is not UTF-8 (truncated sequence at end); re-encode it") from exc


def _load_hub(name: str, *, cache_dir: str | None) -> Dataset:
    """Try the hub (or its local cache); offline, say so and point at local files."""
    try:
        ds = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
    except Exception as exc:
        raise ValueError(
            f"{name!r} is not a local file or folder, and loading it as a hub dataset failed ({exc}). "
            "This machine is offline: pass a local .txt/.jsonl/.json/.parquet file or folder, "
            f"or one of {' / '.join(map(repr, GENSIM_SOURCES))}"
        ) from exc
    assert isinstance(ds, Dataset)
    return ds


def _select_fields(ds: Dataset, source: str, *, text_field: str, label_field: str | None) -> Dataset:
    """Keep only text (and label), renamed to the canonical names, dropping blank documents."""
    missing = [f for f in (text_field, label_field) if f is not None and f not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source!r} has no field {missing[0]!r} (fields: {ds.column_names}); "
            "set text_field/label_field to one of those"
        )
    text_type = ds.features[text_field]
    mixed = isinstance(text_type, datasets.Json)  # text in some rows, numbers or lists in others
    if not mixed and getattr(text_type, "dtype", None) not in ("string", "large_string", "null"):  # null: no row has text
        raise ValueError(f"field {text_field!r} in {source!r} is {text_type}, not text; choose a string field")
    keep = [text_field] + ([label_field] if label_field is not None else [])
    ds = ds.select_columns(keep)
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    if label_field is not None and label_field != "label":
        ds = ds.rename_column(label_field, "label")
    rows = len(ds)
    ds = ds.filter(lambda t: isinstance(t, str) and t.strip() != "", input_columns="text")
    if len(ds) == 0:
        raise ValueError(f"{source!r} holds no non-empty documents in field {text_field!r} (none of its {rows} rows "
                         "has text); add text")
    if len(ds) < rows:  # null, missing, blank or not a string: say so instead of training on less without a word
        print(f"dropped {rows - len(ds)} of {rows} rows without text in {source}", file=sys.stderr)
    if mixed:
        features = ds.features.copy()
        features["text"] = datasets.Value("string")
        ds = ds.map(lambda t: {"text": t}, input_columns="text", features=features)
    if label_field is not None:
        ds = _encode_labels(ds, source, label_field)
    return ds


def _encode_labels(ds: Dataset, source: str, label_field: str) -> Dataset:
    """Integer labels pass through; string labels become class ids (sorted names)."""
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return ds
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        if any(v is None for v in ds["label"]):
            raise ValueError(f"field {label_field!r} in {source!r} has missing labels; give every document a label")
        return ds.class_encode_column("label")
    if dtype is None or not (dtype.startswith("int") or dtype.startswith("uint") or dtype == "bool"):
        raise ValueError(
            f"field {label_field!r} in {source!r} is {feature}; labels must be integers or class-name strings"
        )
    if any(v is None for v in ds["label"]):
        raise ValueError(f"field {label_field!r} in {source!r} has missing labels; give every document a label")
    return ds


def _from_texts(texts: list[str], source: str) -> Dataset:
    if not texts:
        raise ValueError(f"{source!r} produced no documents; the gensim test data may be missing or corrupt")
    return Dataset.from_dict({"text": texts})


def _gensim_file(name: str) -> str:
    from gensim.test.utils import datapath

    path = datapath(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gensim test data file {path!r} is missing; reinstall gensim==4.4.0")
    return path


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    """Plain-text articles of gensim's shortened enwiki dump (cached: markup stripping takes seconds)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles: list[str] = []
    with bz2.open(_gensim_file(_WIKI_FILE), "rb") as fh:
        for _title, raw, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            paragraphs = [p for line in filter_wiki(raw).splitlines() if (p := _clean_wiki_line(line))]
            if paragraphs:
                articles.append("\n\n".join(paragraphs))
    return tuple(articles)


def _clean_wiki_line(line: str) -> str | None:
    """Return a prose paragraph, or None for headings, lists, tables, captions and leftover markup."""
    line = re.sub(r"'{2,}", "", line)  # bold/italic quotes
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by template removal
    line = re.sub(r"\s+", " ", line).strip()
    if not line or _WIKI_MARKUP.search(line):
        return None
    if len(line.split()) < _MIN_PARAGRAPH_WORDS or not _SENTENCE_END.search(line):
        return None
    return line


def _lee_documents() -> list[str]:
    """One Lee news story per line."""
    text = Path(_gensim_file(_LEE_FILE)).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _labelled(texts: list[str], labels: list[int], names: list[str], source: str) -> Dataset:
    if not texts:
        raise ValueError(f"{source!r} produced no documents; the gensim test data may be missing or corrupt")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _polarity_documents() -> Dataset:
    """One review sentence per line, ``__label__neg`` / ``__label__pos`` first (fastText format)."""
    texts, names = [], []
    raw = Path(_gensim_file(_POLARITY_FILE)).read_text(encoding="cp1252")  # the rt-polarity files are Windows-1252
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        tag, _, text = line.strip().partition(" ")
        if not tag.startswith("__label__") or not text.strip():
            raise ValueError(f"{_POLARITY_FILE} line {number} is not '__label__NAME text'; reinstall gensim==4.4.0")
        texts.append(text.strip())
        names.append(tag.removeprefix("__label__"))
    classes = sorted(set(names))
    return _labelled(texts, [classes.index(n) for n in names], classes, GENSIM_POLARITY)


class _NewsgroupsUnpickler(pickle.Unpickler):
    """Admits exactly the classes of gensim's ``mini_newsgroup`` pickle; anything else is refused."""

    def find_class(self, module: str, name: str):
        import numpy

        allowed = {
            ("copy_reg", "_reconstructor"): copyreg._reconstructor,
            ("sklearn.datasets.base", "Bunch"): dict,  # scikit-learn's dict with attribute access
            ("__builtin__", "dict"): dict,
            ("numpy.core.multiarray", "_reconstruct"): numpy._core.multiarray._reconstruct,
            ("numpy", "ndarray"): numpy.ndarray,
            ("numpy", "dtype"): numpy.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{_NEWSGROUPS_FILE}: refusing to load {module}.{name}")
        return allowed[module, name]


def _newsgroups_documents() -> Dataset:
    """Message bodies without headers, quotes and signatures; labels are the newsgroup names."""
    with open(_gensim_file(_NEWSGROUPS_FILE), "rb") as fh:
        raw = zlib.decompress(fh.read())
    try:
        bunch = _NewsgroupsUnpickler(io.BytesIO(raw), encoding="latin1").load()
        posts, targets, names = bunch["data"], [int(t) for t in bunch["target"]], [str(n) for n in bunch["target_names"]]
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"gensim test data {_NEWSGROUPS_FILE!r} is not the expected pickle ({exc}); reinstall gensim==4.4.0") from exc
    texts = [_strip_news_post(post) for post in posts]
    return _labelled(texts, targets, names, GENSIM_NEWSGROUPS)


def _strip_news_post(post: str) -> str:
    """Drop the header (up to the first blank line), quoted lines and the signature block."""
    body = post.partition("\n\n")[2]
    body = "\n".join(line for line in body.split("\n") if not _NEWS_QUOTE.search(line))
    lines = body.strip().split("\n")
    cut = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].strip().strip("-") == ""), 0)
    return "\n".join(lines[:cut]).strip() if cut > 0 else body.strip()


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, mask_token: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on local text (no hub needed; any byte is encodable).

    ``<|endoftext|>`` is eos/bos/unk and ``<|pad|>`` pads; with ``mask_token``, ``<|mask|>`` is the
    masked-LM mask. Encoding adds no special tokens, so ``decode(encode(text)) == text``; packing
    appends eos itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, PAD_TOKEN] + ([MASK_TOKEN] if mask_token else [])
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below {minimum} (256 bytes + special tokens); raise it")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterable[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError("train_tokenizer got no texts; pass the training documents")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        **({"mask_token": MASK_TOKEN} if mask_token else {}),
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------
# Splitting, packing, classification
# --------------------------------------------------------------------------------------------------


def split_documents(ds: Dataset, validation_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split by document before tokenisation, so no text leaks from train into validation."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1); e.g. 0.1")
    n = len(ds)
    n_val = round(n * validation_fraction)
    if n_val == 0 or n_val == n:
        side = "validation" if n_val == 0 else "train"
        raise ValueError(
            f"splitting {n} documents with validation_fraction={validation_fraction} leaves the {side} side "
            "empty; add documents or change validation_fraction"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
    return ds.select(train_idx), ds.select(val_idx)


def pack_causal_lm(ds: Dataset, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> Dataset:
    """Tokenize, append eos after each document, concatenate and cut into ``seq_len`` blocks.

    The tail shorter than one block is dropped. Blocks come from one global stream (not per map
    batch), so their concatenation is exactly a prefix of the tokenized stream.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; packing needs one to separate documents")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")
    total = sum(len(x) for x in tokens["input_ids"])
    if total < seq_len:
        raise ValueError(
            f"the dataset ({len(ds)} documents, {total} tokens) is too short for one block of "
            f"seq_len={seq_len}; add text or lower seq_len"
        )

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) - len(stream) % seq_len
        blocks = [stream[i : i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    # batch_size=None: one batch over the whole dataset, so documents are concatenated globally.
    return tokens.map(group, batched=True, batch_size=None, remove_columns=["input_ids"], desc="pack")


def tokenize_classification(ds: Dataset, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> Dataset:
    """Tokenize labelled documents to fixed ``seq_len`` (truncate, pad) with ``labels``.

    The tokenizer's own special tokens are added: a pretrained BERT's pooler and classification head
    read ``[CLS]`` at position 0 (and saw ``[SEP]`` at the end) in pre-training; without them it
    would classify from the first word piece. A tokenizer from :func:`train_tokenizer` adds none.
    """
    if "label" not in ds.column_names:
        raise ValueError(
            f"classification needs a 'label' column (columns: {ds.column_names}); load with label_field=..."
        )
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before tokenizing")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(
            batch["text"], padding="max_length", truncation=True, max_length=seq_len, add_special_tokens=True
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")


def mask_for_mlm(
    blocks: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast, probability: float, seed: int
) -> dict[str, torch.Tensor]:
    """Static BERT masking of token blocks (``probability`` of the non-special tokens; of those 80% become
    the mask token, 10% a random token, 10% stay), ``labels`` -100 elsewhere.

    Static (drawn once, seeded) rather than per step, so every rank and every restart sees the same
    masked blocks, and 1-rank and N-rank scores stay equal.
    """
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise ValueError("masked-LM needs a tokenizer with a mask token (train one with the pipeline, or use the model's own)")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
    collator.generator = torch.Generator().manual_seed(seed)  # its own seed= only takes effect inside __call__
    ids = blocks["input_ids"].clone()
    special = torch.tensor([tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in ids.tolist()],
                           dtype=torch.bool)
    masked, labels = collator.torch_mask_tokens(ids, special_tokens_mask=special)
    return {**blocks, "input_ids": masked, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Calibration batches and data-parallel shards
# --------------------------------------------------------------------------------------------------


def calibration_batches(
    blocks: Dataset, *, num_batches: int, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Draw ``num_batches`` equal-shape batches from the training blocks, without replacement.

    Deterministic for a seed and independent of the number of ranks: every rank draws the same list,
    then scores only its shard (see :func:`shard_batches`).
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches={num_batches} and batch_size={batch_size} must both be positive")
    need = num_batches * batch_size
    if len(blocks) < need:
        raise ValueError(
            f"calibration needs {num_batches} batches x {batch_size} = {need} blocks but the training set has "
            f"only {len(blocks)}; lower num_batches/batch_size or seq_len, or add training text"
        )
    columns = [c for c in _MODEL_COLUMNS if c in blocks.column_names]
    if "input_ids" not in columns:
        raise ValueError(f"blocks have no 'input_ids' column (columns: {blocks.column_names}); pack them first")
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:need].tolist()
    drawn = blocks.select(perm).with_format("torch", columns=columns)
    return [drawn[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


def shard_batches(batches: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The batches this data-parallel rank scores: ``batches[rank::world_size]``.

    Each batch lands on exactly one rank, so all-reducing per-rank sums gives the exact full-data score.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1} for world_size={world_size}")
    if world_size > len(batches):
        raise ValueError(
            f"a launch with more ranks than calibration batches: {len(batches)} batches for {world_size} ranks "
            f"would leave a rank idle; raise the number of calibration batches to at least {world_size}"
        )
    return list(batches[rank::world_size])
