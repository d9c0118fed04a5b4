"""Training-memory model: how many bytes per GPU a (pruned) transformer needs to train, and on how few GPUs it fits.

Three pieces:

- `ModelShape`: the sizes that decide memory and compute (vocabulary, hidden size, per-layer heads / key-value heads /
  intermediate width, which projections carry biases, norms, position and task heads). `ModelShape.from_model(model)`
  reads a real model (dense or pruned, any layout); `shape.with_counts(heads, kv_heads, neurons)` describes a pruned
  variant without building it (`shape.with_counts(**plan.counts())`). Its parameter count is exact: it equals
  `sum(p.numel() for p in model.parameters())` for every supported family and head.
- `TrainingSetup`: precision, optimizer, micro batch, sequence length, activation checkpointing, ZeRO stage, GPUs.
- `estimate_memory(shape, setup) -> MemoryEstimate`: bytes per GPU for weights, gradients, optimizer states,
  activations and short-lived buffers; `min_gpus(shape, setup, "80GiB")` the fewest GPUs that hold it.

Model states (per GPU; Ψ = parameters, N = GPUs, ⌈Ψ/N⌉ = one ZeRO partition, rounded up as ZeRO pads its flat
buffer):

    weights    = Ψ·w            (ZeRO-3: ⌈Ψ/N⌉·w)
    gradients  = Ψ·w            (ZeRO-2/3: ⌈Ψ/N⌉·w)
    optimizer  = Ψ·(m + k·s)    (ZeRO-1/2/3: ⌈Ψ/N⌉·(m + k·s)), + 4 bytes per parameter tensor for torch's
                                 `step` scalar (AdamW / Adafactor without ZeRO; DeepSpeed steps flat partitions)

w = bytes of a weight (4 fp32, 2 bf16/fp16); k = optimizer states per parameter (AdamW 2, SGD with momentum 1;
Adafactor keeps factored row/column statistics: r + c per matrix) of s bytes each (fp32, or the parameter dtype for a
pure-bf16 torch run: torch allocates states like the parameter); m = 4 when an fp32 master copy exists: always with
mixed precision (the ZeRO paper's 2Ψ + 2Ψ + 12Ψ for Adam), and with fp32 weights under ZeRO-1/2, whose DeepSpeed
optimizer clones its partition to an fp32 master (deepspeed/runtime/zero/stage_1_and_2.py); ZeRO-3 reuses fp32
weights. Not modelled: DeepSpeed's communication buckets (`reduce_bucket_size`, `allgather_bucket_size`,
prefetching beyond one layer), the fp32 gradient partition materialised during a ZeRO-1/2 step, the CUDA context and
allocator fragmentation (keep `headroom` in `min_gpus`), offloading.

Activations (bytes kept for backward, B = micro batch, T = sequence length, a = activation bytes (4 fp32,
2 bf16), H = hidden, d = head_dim, nh / I = the layer's heads / intermediate width, m = dropout-mask bytes (CUDA's fused
dropout keeps a 1-byte mask, the CPU kernel a mask in the activation dtype), σ = norm-statistics bytes (fp32 on CUDA,
the activation dtype for CPU LayerNorm)). Derived op by op from what autograd saves in the families' eager code (each
storage once, parameters excluded), and checked against `torch.autograd.graph.saved_tensors_hooks` in the tests:

    norm(rows)   RMSNorm:   rows·H·(4 + 2a) + 4·rows     (fp32 input, normalised product, output; 1/rms)
                 LayerNorm: rows·H·2a + 2σ·rows          (input, output; mean and 1/std)
    attention    depends on `TrainingSetup.attention` (below)
    mlp          B·T·I·a·(u + (3 if gated else 1))        u = tensors the activation saves (SiLU, GELU: 1, the
                                                           tanh-polynomial "gelu_new" of GPT-2: 4); gated: gate and up
                                                           outputs, the activation output, the product fed to down
    residual     B·T·H·m per residual dropout (2 per layer with hidden dropout)
    layer        2·norm(B·T) + attention + mlp + residual
    outside      token ids 8·B·T (+ 8·T per learned position / token-type lookup), embedding dropout mask B·T·H·m,
                 embedding norm (BERT), rotary cos/sin 2·T·d·a (shared by all layers), final norm, the BERT MLM
                 transform (B·T·H·a·u + norm), log-probabilities of the loss B·T·V·(4 if the loss upcasts logits
                 (HF causal LM) else a) + labels 8·B·T; classification heads: B·H (pooler) and B·C terms.

Attention (nh / kv = the layer's query / key-value heads; each formula checked against autograd on CPU in the tests):

    eager   B·T·nh·d·4a              q, k, v as the score/value matmuls see them (GQA key/value heads repeated
                                     to nh) and the merged output
          + B·nh·T²·(p + c + r)      scores/probabilities [B, nh, T, T]: p = softmax output (4 when the family
                                     upcasts the softmax to fp32, else a), c = a when an fp32 softmax is cast
                                     back to a 2-byte dtype, r = m + a with attention dropout (mask + dropped)
    sdpa    B·T·d·(2·nh + 2·kv)·a    the fused kernels (flash, memory-efficient, cuDNN): q and the output (also
    flash   + 4·B·nh·T               o_proj's input), k and v at their own head count (transformers passes
                                     `enable_gqa`; flash attention takes GQA natively), an fp32 log-sum-exp per
                                     head and token; no T×T tensor, and dropout is replayed from its RNG seed
    math    B·T·nh·d·(3·4 + a)       SDPA's math fallback: eager-like, but it computes 2-byte inputs in fp32, so
          + B·nh·T²·(p + c + r)|a=4  q, k, v and the score terms take 4 bytes (p = 4, c = 0, mask m' = m on
                                     CUDA, 4 on CPU); the merged output stays in a

`attention="sdpa"` is estimated as the fused kernels: what SDPA dispatches to for training without a padding mask
(transformers then passes `is_causal` and no mask) in bf16/fp16, and on CUDA in fp32 through the memory-efficient
kernel (older torch releases fall back to math there for GQA models). It is estimated as the math fallback on CPU
with attention dropout (the CPU fused kernel has no dropout). Other fallbacks to math (a custom or padding mask the
fused kernels refuse, GPUs without bf16 kernels, head_dim above the kernels' limit) are not detected: plan those
with `attention="eager"`, which equals math in fp32; in 2-byte precisions math keeps its fp32 copies on top.
`attention="flash"` (transformers' `flash_attention_2/3`) needs 2-byte activations.

With activation checkpointing (HF `activation_checkpointing_enable`, every layer checkpointed) only every layer's
input B·T·H·a is kept, plus one layer's activations recomputed during backward (the largest layer), plus everything
outside the layers, plus, for causal LMs with eager attention, the additive mask [B, 1, T, T] (B·T²·a) that every
checkpointed layer holds as an input (dense training frees it when the forward returns; SDPA and flash get no
mask). Encoders given a padding mask hold one too (not modelled). `MemoryEstimate.transient` adds what lives
briefly on top of the saved activations at the loss: the logits and the gradients of the log-probabilities and
logits, B·T·V·(a + 2·l) with l the loss dtype bytes, and under ZeRO-3 the one gathered full layer (or embedding
matrix) being computed. Gradients of activations during backward (about one layer's worth) are not modelled.

Training FLOPs per token (`ModelShape.flops_per_token`), the usual 6N rule plus the attention scores:

    6 · (matmul parameters: every Linear weight of the layers + the output projection, counted even when tied)
  + 12 · T · Σ_layers nh·d     (QKᵀ and PV: 2·2·T·nh·d forward, ×3 for forward + backward; the full T×T matrix, as
                                eager attention computes it)

Per-sequence heads (pooler, classifier) count once per sequence, i.e. divided by T.

Scoring (`ScoringSetup`, `estimate_scoring_memory`): the peak bytes of tensors per rank while a criterion scores the
DENSE model, one calibration batch (B sequences × T tokens) per forward, in eval mode (no dropout). Θ = the weight
matrices of the layers (what earlycrop / grasp differentiate and perturb; `ModelShape.matmul_shapes`), θ_max the
largest of them, w the weights' bytes, N the ranks holding partitions (N = 1 for one process and for DDP, where
every rank holds the whole model and scores its share of the batches; ZeRO-3 partitions every tensor over N ranks,
⌈numel/N⌉ each, as pipeline/sharded.py loads it):

    weights       Σ_tensors ⌈numel/N⌉ · w
    gradient      Σ_Θ ⌈numel/N⌉ · 4            g, float32 also for 2-byte weights (finite-difference criteria only)
    fd_buffers    the larger of the two passes' working sets beside g (finite-difference criteria only):
                  perturbed passes  ⌈θ_max/N⌉ · (2·4 + 1 (+ 2·2 for 2-byte weights))   two float32 shift buffers,
                                    the bool rounding mask, two roundings to the weights' dtype
                  gradient pass     θ_max · w (ZeRO-3: + θ_max·4 for 2-byte weights + ⌈θ_max/N⌉·4)   one weight's
                                    whole gradient (ZeRO-3: its float32 copy, this rank's partition of it)
    activations   the training formulas above for one calibration batch (eval mode), + B·T·w·Σ_layers (nh·d + I):
                  the gates (earlycrop.gates) multiply o_proj's and down's inputs, and autograd keeps both the
                  ungated and the gated tensor
    transient     B·T·V·(w + 2·l) at the loss (logits, gradients of log-probabilities and logits), + under ZeRO-3
                  the largest layer (or larger single tensor, e.g. the embedding) gathered: `gathered_params()`·w

By criterion: earlycrop / grasp (hvp finite_difference) take every term; snip and fisher (a backward to the gates)
weights, activations and transient; activation (forward without a graph) weights, the logits and one layer's
activations, an upper bound (measured 30-45% above the live tensors); magnitude and random the weights. hvp exact is
not modelled (its double backward keeps the backward graph and every weight's gradient) and ZeRO-3 refuses it.
Checked against the live tensors of `earlycrop.score_units` (torch profiler, CPU) in the tests, within 6% for snip
and finite-difference earlycrop in float32 and bfloat16; against peak RSS of `earlycrop prune` at 300M and 1.1B in
benchmarks/RESULTS.md ("Scoring with partitioned parameters"). Not modelled: the process runtime (Python, torch,
transformers, DeepSpeed: about 0.75 GB of CPU memory; on a GPU, the CUDA context), communication buffers, and what
a ZeRO-3 rank was measured to hold on CPU beyond these terms (0.5-1.3x the model's weights, cause not found: see
that section); keep headroom for them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch and transformers are imported where a model is read: a shape-only plan needs neither
    from torch import nn

    from .families import FamilyAdapter, LayerUnits

HeadKind = Literal["causal_lm", "masked_lm", "sequence_classification", "none"]
HEAD_KINDS = ("causal_lm", "masked_lm", "sequence_classification", "none")
NORMS = ("rms", "layer")

# Tensors of shape [B, T, I] that the activation function itself saves for backward, in HF's implementation
# (transformers.activations). Unknown activations count as 1 (an elementwise function saving its input).
ACTIVATION_SAVED: dict[str, int] = {
    "silu": 1,
    "swish": 1,
    "gelu": 1,
    "relu": 1,
    "gelu_pytorch_tanh": 1,
    "gelu_new": 4,  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): x, tanh, 0.5·x, 1 + tanh
    "quick_gelu": 2,  # x·sigmoid(1.702·x): x, sigmoid
}


# --------------------------------------------------------------------------------------------------------------------
# The shape


@dataclass
class ModelShape:
    """The sizes of a transformer that decide its training memory and compute.

    Per-layer lists (`heads`, `kv_heads`, `intermediate`) carry pruned layouts, uniform or not. `other_params`
    holds parameters `from_model` could not place in the structure (an unfamiliar head); it is zero for every
    supported family and head, and `from_model` warns when it is not.
    """

    family: str
    vocab_size: int
    hidden_size: int
    head_dim: int
    heads: list[int]
    kv_heads: list[int]
    intermediate: list[int]
    gated_mlp: bool = True  # SwiGLU: gate, up and down matrices; otherwise fc and down
    fused_qkv: bool = False  # one q/k/v matrix (GPT-2 c_attn) instead of three
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_in_bias: bool = False  # bias of up/gate (fc)
    mlp_out_bias: bool = False  # bias of down
    norm: Literal["rms", "layer"] = "rms"  # RMSNorm (weight) or LayerNorm (weight + bias); two per layer
    final_norm: bool = True
    embedding_norm: bool = False  # BERT: LayerNorm after the summed embeddings
    position_embeddings: int = 0  # rows of a learned position table (GPT-2, BERT); 0: rotary or none
    token_type_embeddings: int = 0  # BERT segment embeddings
    rotary: bool = True
    tied_embeddings: bool = False  # the output projection is the input embedding matrix
    head: HeadKind = "causal_lm"
    head_transform: bool = False  # BERT MLM: dense + activation + LayerNorm before the decoder
    output_bias: bool = False  # bias of the output projection (BERT MLM decoder, classifier)
    pooler: bool = False  # BERT pooler: dense + tanh on the first token
    num_labels: int = 0  # classifier width for sequence classification
    activation: str = "silu"
    softmax_fp32: bool = True  # the eager softmax upcasts scores to fp32 (Llama family)
    loss_fp32: bool = True  # the loss upcasts logits to fp32 (HF causal-LM loss)
    attention_dropout: bool = False
    hidden_dropout: bool = False  # dropout on the two residual branches of every layer
    embedding_dropout: bool = False
    classifier_dropout: bool = False
    other_params: int = 0

    def __post_init__(self) -> None:
        self.heads, self.kv_heads, self.intermediate = list(self.heads), list(self.kv_heads), list(self.intermediate)
        if not self.heads:
            raise ValueError("a ModelShape needs at least one layer")
        if not len(self.heads) == len(self.kv_heads) == len(self.intermediate):
            raise ValueError(
                f"heads ({len(self.heads)}), kv_heads ({len(self.kv_heads)}) and intermediate "
                f"({len(self.intermediate)}) must have one entry per layer"
            )
        for name in ("vocab_size", "hidden_size", "head_dim"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        for i, (h, kv, n) in enumerate(zip(self.heads, self.kv_heads, self.intermediate)):
            if not all(_is_int(x) and x > 0 for x in (h, kv, n)):
                raise ValueError(
                    f"layer {i}: heads={h!r}, kv_heads={kv!r}, intermediate={n!r} must be positive integers"
                )
            if h % kv:
                raise ValueError(f"layer {i}: {h} query heads do not split evenly over {kv} key/value heads")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: choose one of {NORMS}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head={self.head!r}: choose one of {HEAD_KINDS}")
        if self.head == "sequence_classification" and self.num_labels <= 0:
            raise ValueError("a sequence-classification head needs num_labels > 0")
        if self.other_params < 0 or self.position_embeddings < 0 or self.token_type_embeddings < 0:
            raise ValueError("other_params, position_embeddings and token_type_embeddings cannot be negative")

    # ---- constructors

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShape:
        """Read the shape of a real (dense or pruned) model: layers through the family adapter, the rest from the
        embedding / output modules and the config. The implied parameter count is exact (see `other_params`)."""
        from .families import get_adapter

        adapter = get_adapter(model)
        layers = adapter.layers(model)
        embed = model.get_input_embeddings()
        vocab, hidden = embed.weight.shape
        facts = _layer_facts(adapter, layers)
        facts.update(adapter.shape_facts(model, model.config))
        facts.update(_head_facts(model, facts.pop("head_transform_if_lm", False)))
        shape = cls(
            family=adapter.name,
            vocab_size=vocab,
            hidden_size=hidden,
            head_dim=layers[0].head_dim,
            heads=[l.num_heads for l in layers],
            kv_heads=[l.num_kv_heads for l in layers],
            intermediate=[l.intermediate_size for l in layers],
            **facts,
        )
        real = sum(p.numel() for p in model.parameters())
        missing = real - shape.num_params()
        if missing != 0:
            if missing < 0:
                raise ValueError(
                    f"the {adapter.name} shape implies {shape.num_params():,} parameters but the model has {real:,}: "
                    "the family adapter's shape_facts do not match this model"
                )
            warnings.warn(
                f"{missing:,} parameters of this {type(model).__name__} are not described structurally; "
                "they are counted in ModelShape.other_params (memory exact, FLOPs and activations ignore them)",
                stacklevel=2,
            )
            shape = replace(shape, other_params=missing)
        return shape

    def with_counts(
        self,
        heads: int | Sequence[int],
        kv_heads: int | Sequence[int],
        neurons: int | Sequence[int],
    ) -> ModelShape:
        """This shape with other per-layer head / key-value head / neuron counts (an int means every layer),
        e.g. `shape.with_counts(**plan.counts())` describes the pruned model without building it."""
        n = self.num_layers

        def per_layer(value: int | Sequence[int], name: str) -> list[int]:
            values = [value] * n if _is_int(value) else list(value)
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} counts for {n} layers")
            return values

        q, kv, i = per_layer(heads, "heads"), per_layer(kv_heads, "kv_heads"), per_layer(neurons, "neurons")
        if q != kv and (self.fused_qkv or (self.heads == self.kv_heads and not _groups_kv(self.family))):
            raise ValueError(f"{self.family} has one key/value head per query head: kv_heads must equal heads")
        return replace(self, heads=q, kv_heads=kv, intermediate=i)

    # ---- sizes

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def _norm_shapes(self, name: str) -> list[tuple[str, tuple[int, ...]]]:
        h = self.hidden_size
        out = [(f"{name}.weight", (h,))]
        if self.norm == "layer":
            out.append((f"{name}.bias", (h,)))
        return out

    def layer_parameter_shapes(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        """Parameter tensors of one transformer layer, as (name, shape); Linear weights as [out, in]."""
        h, d = self.hidden_size, self.head_dim
        q, kv, inter = self.heads[layer] * d, self.kv_heads[layer] * d, self.intermediate[layer]
        p = f"layers.{layer}"
        out = self._norm_shapes(f"{p}.norm1")
        if self.fused_qkv:
            out.append((f"{p}.qkv.weight", (q + 2 * kv, h)))
            if self.qkv_bias:
                out.append((f"{p}.qkv.bias", (q + 2 * kv,)))
        else:
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                out.append((f"{p}.{name}.weight", (rows, h)))
                if self.qkv_bias:
                    out.append((f"{p}.{name}.bias", (rows,)))
        out.append((f"{p}.o.weight", (h, q)))
        if self.o_bias:
            out.append((f"{p}.o.bias", (h,)))
        out += self._norm_shapes(f"{p}.norm2")
        for name in ("gate", "up") if self.gated_mlp else ("fc",):
            out.append((f"{p}.{name}.weight", (inter, h)))
            if self.mlp_in_bias:
                out.append((f"{p}.{name}.bias", (inter,)))
        out.append((f"{p}.down.weight", (h, inter)))
        if self.mlp_out_bias:
            out.append((f"{p}.down.bias", (h,)))
        return out

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter tensor as (name, shape), tied matrices once; sums to `num_params()`."""
        v, h = self.vocab_size, self.hidden_size
        out: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (v, h))]
        if self.position_embeddings:
            out.append(("position_embeddings.weight", (self.position_embeddings, h)))
        if self.token_type_embeddings:
            out.append(("token_type_embeddings.weight", (self.token_type_embeddings, h)))
        if self.embedding_norm:
            out += self._norm_shapes("embeddings.norm")
        for layer in range(self.num_layers):
            out += self.layer_parameter_shapes(layer)
        if self.final_norm:
            out += self._norm_shapes("final_norm")
        if self.pooler:
            out += [("pooler.weight", (h, h)), ("pooler.bias", (h,))]
        if self.head in ("causal_lm", "masked_lm"):
            if self.head_transform:
                out += [("head.transform.weight", (h, h)), ("head.transform.bias", (h,))]
                out += self._norm_shapes("head.transform.norm")
            if not self.tied_embeddings:
                out.append(("head.output.weight", (v, h)))
            if self.output_bias:
                out.append(("head.output.bias", (v,)))
        elif self.head == "sequence_classification":
            out.append(("head.classifier.weight", (self.num_labels, h)))
            if self.output_bias:
                out.append(("head.classifier.bias", (self.num_labels,)))
        if self.other_params:
            out.append(("other", (self.other_params,)))
        return out

    def num_params(self) -> int:
        """Exact parameter count (tied embeddings once), as `sum(p.numel() for p in model.parameters())`."""
        return sum(math.prod(s) for _, s in self.parameter_shapes())

    def num_tensors(self) -> int:
        """Number of parameter tensors (torch optimizers keep one `step` scalar per tensor)."""
        return len(self.parameter_shapes())

    def layer_params(self, layer: int) -> int:
        return sum(math.prod(s) for _, s in self.layer_parameter_shapes(layer))

    def layer_matmul_params(self, layer: int) -> int:
        """Weights of the layer's matrix multiplications (biases and norms excluded)."""
        return sum(math.prod(s) for _, s in self.layer_parameter_shapes(layer) if len(s) == 2)

    def matmul_shapes(self) -> list[tuple[int, ...]]:
        """Every weight matrix of the layers: θ, the weights a criterion differentiates and perturbs (the Linear /
        Conv1D weights of the attention and MLP blocks, `FamilyAdapter.prunable_weights`)."""
        return [s for l in range(self.num_layers) for _, s in self.layer_parameter_shapes(l) if len(s) == 2]

    def gathered_params(self) -> int:
        """The most parameters ZeRO-3 holds gathered at once: the largest layer, or a larger single tensor (the
        embedding matrix of a large vocabulary)."""
        return max([self.layer_params(l) for l in range(self.num_layers)]
                   + [math.prod(s) for _, s in self.parameter_shapes()])

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length `seq_len`; formula in the module doc."""
        if not _is_int(seq_len) or seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r}: must be a positive integer")
        h, v = self.hidden_size, self.vocab_size
        matmul = sum(self.layer_matmul_params(l) for l in range(self.num_layers))
        per_sequence = 0
        if self.head in ("causal_lm", "masked_lm"):
            matmul += v * h + (h * h if self.head_transform else 0)
        elif self.head == "sequence_classification":
            per_sequence += self.num_labels * h
        if self.pooler:
            per_sequence += h * h
        attention = 12 * seq_len * sum(n * self.head_dim for n in self.heads)
        return 6.0 * (matmul + per_sequence / seq_len) + attention

    def to_dict(self) -> dict:
        return asdict(self)


def _groups_kv(family: str) -> bool:
    """Whether `family` cuts key/value heads apart from query heads. Only a shape with one key/value head per query
    head asks (a GQA shape's family groups them), so a GQA search never imports the registry (torch)."""
    from .families import FAMILIES

    adapter = FAMILIES.get(family)
    return adapter is None or adapter.grouped_kv


# model_type → the causal-LM class whose config.json `shape_from_config` reads without transformers
_PLAIN_LLAMA_LIKE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size")


def shape_from_config(config: dict) -> ModelShape | None:
    """The shape of a Llama / Qwen2 / Mistral causal LM from its config.json, read as JSON: what `from_model` gives
    for the model transformers builds from it, without importing torch or transformers (a shape-only plan then
    answers in a second). None for anything else (other families or heads, a layout only earlycrop rebuilds, a
    config missing a size): read those with `earlycrop.budget.model_skeleton`."""
    family = config.get("model_type")
    layout = config.get("earlycrop_layout")  # earlycrop.surgery.LAYOUT_KEY (that module imports torch)
    if (_PLAIN_LLAMA_LIKE.get(family) is None or config.get("architectures") != [_PLAIN_LLAMA_LIKE[family]]
            or (layout is not None and not layout.get("plain_loadable"))
            or not all(_is_int(config.get(key)) for key in _REQUIRED_KEYS)):
        return None
    n, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    attention_bias = family == "qwen2" or bool(config.get("attention_bias"))  # Qwen2: q/k/v biases, none on o
    mlp_bias = family == "llama" and bool(config.get("mlp_bias"))
    return ModelShape(
        family=family, vocab_size=config["vocab_size"], hidden_size=hidden,
        head_dim=config.get("head_dim") or hidden // heads, heads=[heads] * n,
        kv_heads=[config["num_key_value_heads"]] * n, intermediate=[config["intermediate_size"]] * n,
        qkv_bias=attention_bias, o_bias=attention_bias and family == "llama", mlp_in_bias=mlp_bias,
        mlp_out_bias=mlp_bias, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        activation=config.get("hidden_act", "silu"), attention_dropout=(config.get("attention_dropout") or 0) > 0,
    )


def _check_fields(owner: object, choices: dict[str, Sequence[str]], counts: Sequence[str]) -> None:
    """ValueError naming the first field of `owner` outside its choices, or a count that is not a positive int."""
    for name, allowed in choices.items():
        if getattr(owner, name) not in allowed:
            raise ValueError(f"{name}={getattr(owner, name)!r}: choose one of {', '.join(allowed)}")
    for name in counts:
        value = getattr(owner, name)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be a positive integer")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _layer_facts(adapter: FamilyAdapter, layers: list[LayerUnits]) -> dict:
    """Bias / fusion / gating facts of the layers, read from the modules through the adapter's slices."""
    seen = []
    for layer in layers:
        attn = adapter.attention_slices(layer, list(range(layer.num_heads)), list(range(layer.num_kv_heads)))
        mlp = adapter.mlp_slices(layer, list(range(layer.intermediate_size)))
        qkv_modules = {id(s.module) for s in attn if s.module is not layer.head_out}
        mlp_in_modules = {id(s.module) for s in mlp if s.module is not layer.mlp_out}
        seen.append(
            dict(
                fused_qkv=len(qkv_modules) == 1,
                gated_mlp=len(mlp_in_modules) == 2,
                qkv_bias=any(s.name == "bias" for s in attn),
                o_bias=getattr(layer.head_out, "bias", None) is not None,
                mlp_in_bias=any(s.name == "bias" for s in mlp),
                mlp_out_bias=getattr(layer.mlp_out, "bias", None) is not None,
            )
        )
    if any(f != seen[0] for f in seen):
        raise ValueError("layers differ in biases, fusion or gating; ModelShape describes them with one set of flags")
    return seen[0]


_HEAD_MAPPINGS: tuple[tuple[str, str], ...] = (
    ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING"),
    ("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING"),
    ("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"),
    ("none", "MODEL_MAPPING"),
)


def _head_kind(model: nn.Module) -> str | None:
    """The task head, from transformers' own auto-class registries (config type → model class)."""
    from transformers.models.auto import modeling_auto

    for kind, mapping_name in _HEAD_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name)
        try:
            cls = mapping[type(model.config)]
        except KeyError:
            continue
        if isinstance(model, cls):
            return kind
    return None


def _head_facts(model: nn.Module, transform_if_lm: bool) -> dict:
    kind = _head_kind(model)
    embed = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if kind in ("causal_lm", "masked_lm") and output is not None:
        return dict(
            head=kind,
            head_transform=transform_if_lm,
            # on the meta device every data_ptr() is 0: only identity can tell tied from untied there
            tied_embeddings=output.weight is embed.weight
            or (not output.weight.is_meta and output.weight.data_ptr() == embed.weight.data_ptr()),
            output_bias=getattr(output, "bias", None) is not None,
            loss_fp32=kind == "causal_lm",
        )
    if kind == "sequence_classification":
        base = {id(p) for p in model.base_model.parameters()}
        head_params = sum(p.numel() for p in model.parameters() if id(p) not in base)
        labels, hidden = model.config.num_labels, embed.weight.shape[1]
        return dict(
            head=kind, num_labels=labels, output_bias=head_params == labels * (hidden + 1), loss_fp32=False
        )
    # base model or an unfamiliar head: anything outside the base model ends up in other_params
    return dict(head="none", loss_fp32=False, classifier_dropout=False)


# --------------------------------------------------------------------------------------------------------------------
# The training setup

Precision = Literal["fp32", "bf16", "bf16_mixed", "fp16_mixed"]
PRECISIONS = ("fp32", "bf16", "bf16_mixed", "fp16_mixed")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
DEVICES = ("cuda", "cpu")
Attention = Literal["eager", "sdpa", "flash"]
ATTENTIONS = ("eager", "sdpa", "flash")


def attention_kind(implementation: str | None) -> Attention:
    """The memory model's attention for a transformers `attn_implementation` name, so a config's own setting
    decides the estimate: None (transformers' default) and "sdpa" → "sdpa", "flash_attention_2" / "_3" or a flash
    kernel from the hub → "flash", "eager" → "eager"."""
    if implementation is None or implementation == "sdpa":
        return "sdpa"
    if implementation == "eager":
        return "eager"
    if "flash" in implementation:
        return "flash"
    raise ValueError(
        f"attn_implementation={implementation!r}: the memory model knows eager, sdpa and flash attention "
        "(flash_attention_2 / flash_attention_3)"
    )


@dataclass
class TrainingSetup:
    """How the model is trained, as far as memory is concerned.

    precision: `fp32`; `bf16` = a pure-bf16 torch run (`model.to(torch.bfloat16)`, torch optimizer: states in
    bf16, no master copy); `bf16_mixed` / `fp16_mixed` = 2-byte weights, gradients and activations with fp32
    master weights and fp32 optimizer states (DeepSpeed `bf16` / `fp16`, Megatron). optimizer: `adamw` (2 states),
    `sgd` (with momentum: 1 state), `adafactor` (torch.optim.Adafactor: factored second moment, no first moment;
    not under ZeRO, which flattens the matrices it factors). `device` only decides kernel details of the activation
    estimate (dropout-mask and LayerNorm-statistics dtypes, SDPA's CPU fallback); keep `cuda` for GPU planning.
    `attention`: `sdpa` (transformers' default; fused kernels, no T×T tensors kept), `flash` (flash_attention_2/3)
    or `eager` (keeps the [B, heads, T, T] probabilities); the formulas are in the module docstring.
    """

    precision: Precision = "bf16_mixed"
    optimizer: Literal["adamw", "sgd", "adafactor"] = "adamw"
    micro_batch: int = 1
    seq_len: int = 2048
    activation_checkpointing: bool = False
    zero_stage: int = 0
    num_gpus: int = 1
    device: Literal["cuda", "cpu"] = "cuda"
    attention: Attention = "sdpa"

    def __post_init__(self) -> None:
        _check_fields(self, {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "device": DEVICES,
                             "attention": ATTENTIONS}, ("micro_batch", "seq_len", "num_gpus"))
        if self.attention == "flash" and self.precision == "fp32":
            raise ValueError("attention='flash' runs in fp16/bf16 only: use a 2-byte precision, or attention='sdpa'")
        if not _is_int(self.zero_stage) or not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage={self.zero_stage!r}: must be 0, 1, 2 or 3")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing={self.activation_checkpointing!r}: must be True or False")
        if self.precision == "bf16" and self.zero_stage > 0:
            raise ValueError(
                "precision='bf16' is a pure-bf16 torch run; DeepSpeed ZeRO keeps fp32 master weights and states "
                "for bf16 weights: use precision='bf16_mixed' with ZeRO"
            )
        if self.optimizer == "adafactor" and self.zero_stage > 0:
            raise ValueError("optimizer='adafactor' factors each weight matrix; ZeRO flattens them: use zero_stage=0")

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def activation_bytes(self) -> int:
        return self.weight_bytes

    @property
    def state_bytes(self) -> int:
        """Bytes of one optimizer-state element: torch allocates states like the parameter in a pure-bf16 run."""
        return 2 if self.precision == "bf16" else 4

    @property
    def master_bytes(self) -> int:
        """Bytes per parameter of an fp32 master copy held in the optimizer partition (0 when there is none)."""
        if self.precision in ("bf16_mixed", "fp16_mixed"):
            return 4
        if self.precision == "fp32" and self.zero_stage in (1, 2):
            return 4  # DeepSpeed ZeRO-1/2 clones its partition to fp32 even when the weights are fp32
        return 0


# --------------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class MemoryEstimate:
    """Bytes per GPU. `activations` is what autograd keeps for backward; `transient` what lives on top of it
    around the loss (logits and their gradients) and, under ZeRO-3, the one gathered layer."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    num_params: int
    setup: TrainingSetup
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    def fits(self, gpu_bytes: int | str, headroom: float = 0.0) -> bool:
        return self.total <= _usable(gpu_bytes, headroom)

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "total": self.total,
            "num_params": self.num_params,
            "setup": asdict(self.setup),
            "breakdown": dict(self.breakdown),
        }

    def __str__(self) -> str:
        parts = ", ".join(
            f"{k} {format_bytes(getattr(self, k))}"
            for k in ("weights", "gradients", "optimizer", "activations", "transient")
        )
        s = self.setup
        return (
            f"{format_bytes(self.total)} per GPU ({parts}); {self.num_params:,} params, {s.precision}, {s.optimizer}, "
            f"ZeRO-{s.zero_stage} on {s.num_gpus} GPU(s), micro batch {s.micro_batch} × {s.seq_len} tokens, "
            f"{s.attention} attention" + (", checkpointing" if s.activation_checkpointing else "")
        )


def optimizer_state_elements(shape: ModelShape, optimizer: str) -> int:
    """Optimizer-state elements for the whole model (without a master copy and without step counters)."""
    if optimizer == "adamw":
        return 2 * shape.num_params()
    if optimizer == "sgd":
        return shape.num_params()
    if optimizer == "adafactor":
        total = 0
        for _, s in shape.parameter_shapes():
            if len(s) >= 2:
                total += math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]  # row and column statistics
            else:
                total += math.prod(s)
        return total
    raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def attention_kernel(shape: ModelShape, setup: TrainingSetup) -> Literal["eager", "fused", "math"]:
    """Whose saved tensors the attention estimate counts: eager code, a fused kernel (SDPA's flash / memory-efficient
    kernels, flash attention: no T×T tensor) or SDPA's math fallback (on CPU with attention dropout)."""
    if setup.attention == "eager":
        return "eager"
    if setup.attention == "sdpa" and setup.device == "cpu" and shape.attention_dropout:
        return "math"
    return "fused"


def _attention_bytes(shape: ModelShape, setup: TrainingSetup, heads: int, kv_heads: int) -> int:
    """Bytes one layer's attention keeps for backward (formulas in the module docstring)."""
    b, t, d, a = setup.micro_batch, setup.seq_len, shape.head_dim, setup.activation_bytes
    kernel = attention_kernel(shape, setup)
    if kernel == "fused":
        return b * t * d * (2 * heads + 2 * kv_heads) * a + 4 * b * heads * t
    core = 4 if kernel == "math" else a  # SDPA's math kernel computes 2-byte inputs in fp32
    mask = 1 if setup.device == "cuda" else core
    score_bytes = (4 if shape.softmax_fp32 else core) + (core if shape.softmax_fp32 and core != 4 else 0)
    if shape.attention_dropout:
        score_bytes += mask + core
    return b * t * heads * d * (3 * core + a) + b * heads * t * t * score_bytes


def activation_breakdown(shape: ModelShape, setup: TrainingSetup) -> dict[str, int]:
    """Activation bytes kept for backward, by part (`layer.<i>`, `embeddings`, `final_norm`, `head`, ...);
    the formulas are in the module docstring."""
    b, t, h, d, v = setup.micro_batch, setup.seq_len, shape.hidden_size, shape.head_dim, shape.vocab_size
    a = setup.activation_bytes
    cuda = setup.device == "cuda"
    mask = 1 if cuda else a
    stats = 4 if cuda else a
    rows = b * t

    def norm(n_rows: int) -> int:
        if shape.norm == "rms":
            return n_rows * h * (4 + 2 * a) + 4 * n_rows
        return n_rows * h * 2 * a + 2 * stats * n_rows

    act_saved = ACTIVATION_SAVED.get(shape.activation, 1)
    out: dict[str, int] = {}
    for l, (nh, kv, inter) in enumerate(zip(shape.heads, shape.kv_heads, shape.intermediate)):
        attention = _attention_bytes(shape, setup, nh, kv)
        mlp = rows * inter * a * (act_saved + (3 if shape.gated_mlp else 1))
        residual = 2 * rows * h * mask if shape.hidden_dropout else 0
        out[f"layer.{l}"] = 2 * norm(rows) + attention + mlp + residual
    lookups = (1 if shape.position_embeddings else 0) + (1 if shape.token_type_embeddings else 0)
    embeddings = 8 * rows + 8 * t * lookups
    if shape.embedding_norm:
        embeddings += norm(rows)
    if shape.embedding_dropout:
        embeddings += rows * h * mask
    out["embeddings"] = embeddings
    if shape.rotary:
        out["rotary"] = 2 * t * d * a
    if shape.final_norm:
        out["final_norm"] = norm(rows)
    if shape.head in ("causal_lm", "masked_lm"):
        head = 0
        if shape.head_transform:
            head += rows * h * a * act_saved + norm(rows)
        head += rows * v * (4 if shape.loss_fp32 else a) + 8 * rows + 4
        out["head"] = head
    elif shape.head == "sequence_classification":
        head = b * h * a if shape.pooler else 0
        if shape.classifier_dropout:
            head += b * h * (mask + a)
        head += b * shape.num_labels * (4 if shape.loss_fp32 else a) + 8 * b + 4
        out["head"] = head
    return out


def _activations(shape: ModelShape, setup: TrainingSetup) -> tuple[int, dict[str, int]]:
    parts = activation_breakdown(shape, setup)
    if not setup.activation_checkpointing:
        return sum(parts.values()), parts
    layer_keys = [k for k in parts if k.startswith("layer.")]
    rows_h = setup.micro_batch * setup.seq_len * shape.hidden_size * setup.activation_bytes
    ckpt = {k: v for k, v in parts.items() if k not in layer_keys}
    # BERT's embedding norm/dropout output (already counted in `embeddings`) is the first layer's input
    ckpt["layer_inputs"] = (shape.num_layers - (1 if shape.embedding_norm else 0)) * rows_h
    if not shape.final_norm:
        ckpt["last_hidden"] = rows_h  # post-norm models: the head saves the last layer's output
    if shape.head == "causal_lm" and setup.attention == "eager":
        # the additive causal mask [B, 1, T, T] that eager attention receives is a checkpoint input: kept until backward
        ckpt["attention_mask"] = setup.micro_batch * setup.seq_len**2 * setup.activation_bytes
    ckpt["recomputed_layer"] = max(parts[k] for k in layer_keys)
    return sum(ckpt.values()), ckpt


def estimate_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Bytes per GPU to train `shape` with `setup`; formulas and what is not modelled are in the module docstring."""
    n_params = shape.num_params()
    n = setup.num_gpus
    part = -(-n_params // n)  # ceil: ZeRO pads its flat buffer to a multiple of the data-parallel size
    stage = setup.zero_stage
    w = setup.weight_bytes
    weights = (part if stage >= 3 else n_params) * w
    gradients = (part if stage >= 2 else n_params) * w
    if stage == 0:
        states = optimizer_state_elements(shape, setup.optimizer) * setup.state_bytes
        optimizer = n_params * setup.master_bytes + states
        if setup.optimizer in ("adamw", "adafactor"):
            optimizer += 4 * shape.num_tensors()  # torch's fp32 `step` scalar per parameter tensor
    else:
        per_param_states = {"adamw": 2, "sgd": 1}[setup.optimizer]
        optimizer = part * (setup.master_bytes + per_param_states * setup.state_bytes)
    activations, breakdown = _activations(shape, setup)
    a = setup.activation_bytes
    transient = 0
    if shape.head in ("causal_lm", "masked_lm"):
        loss_bytes = 4 if shape.loss_fp32 else a
        transient += setup.micro_batch * setup.seq_len * shape.vocab_size * (a + 2 * loss_bytes)
    if stage >= 3:
        transient += shape.gathered_params() * w
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        transient=transient,
        num_params=n_params,
        setup=setup,
        breakdown=breakdown,
    )


def _usable(gpu_bytes: int | str, headroom: float) -> float:
    total = parse_memory(gpu_bytes)
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom={headroom!r}: the fraction of GPU memory kept free must be in [0, 1)")
    return total * (1.0 - headroom)


def min_gpus(
    shape: ModelShape,
    setup: TrainingSetup,
    gpu_bytes: int | str,
    *,
    max_gpus: int = 1024,
    headroom: float = 0.0,
) -> int | None:
    """The fewest GPUs (at `setup.zero_stage`, ignoring `setup.num_gpus`) on which the estimate fits in `gpu_bytes`
    (bytes or a string like "80GiB") minus a `headroom` fraction; None when even `max_gpus` do not suffice
    (activations and, without ZeRO-3, weights do not shrink with more GPUs)."""
    usable = _usable(gpu_bytes, headroom)
    return _fewest(lambda count: estimate_memory(shape, replace(setup, num_gpus=count)).total <= usable, max_gpus)


def _fewest(fits: Callable[[int], bool], max_gpus: int) -> int | None:
    """The smallest count in [1, max_gpus] for which `fits` holds, or None; `fits` must never turn false with more
    GPUs (the estimates never grow with them), so bisection is exact."""
    if not fits(max_gpus):
        return None
    lo, hi = 1, max_gpus
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def min_gpus_per_stage(
    shape: ModelShape,
    setup: TrainingSetup,
    gpu_bytes: int | str,
    *,
    max_gpus: int = 1024,
    headroom: float = 0.0,
) -> dict[int, int | None]:
    """`min_gpus` for every ZeRO stage the setup allows (stage → GPUs, or None when it cannot fit)."""
    out: dict[int, int | None] = {}
    for stage in range(4):
        try:
            staged = replace(setup, zero_stage=stage)
        except ValueError:
            continue
        out[stage] = min_gpus(shape, staged, gpu_bytes, max_gpus=max_gpus, headroom=headroom)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Scoring

Engine = Literal["one", "ddp", "zero3"]
ENGINES = ("one", "ddp", "zero3")
SCORE_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
# what each built-in criterion runs: `hessian` = the weight gradient g, then two perturbed gate passes per batch
# (earlycrop / grasp, hvp finite_difference); `gates` = a backward to the gates; `forward` = forward passes without
# gradients; `none` = the weights alone (no calibration data)
CRITERION_PASSES: dict[str, str] = {"earlycrop": "hessian", "grasp": "hessian", "snip": "gates", "fisher": "gates",
                                    "activation": "forward", "magnitude": "none", "random": "none"}


@dataclass
class ScoringSetup:
    """How a model is scored, as far as memory is concerned (formulas in the module docstring, "Scoring").

    criterion: a built-in criterion (`CRITERION_PASSES`); hvp: only `finite_difference` is modelled (an exact double
    backward keeps the backward graph and every weight's gradient; ZeRO-3 refuses it). dtype: the weights' dtype
    while scoring (g and the perturbation stay float32 for 2-byte weights). batch_size × seq_len: one calibration
    batch, the unit of every forward. engine: `one` process; `ddp`, every rank holding the whole model and scoring
    its share of the batches; `zero3`, parameters and g partitioned over `num_gpus` ranks (pipeline/sharded.py).
    attention: `earlycrop prune` and ZeRO-3 scoring load the model with eager attention, `earlycrop run` scores
    with the config's."""

    criterion: str = "earlycrop"
    hvp: Literal["finite_difference", "exact"] = "finite_difference"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 1
    seq_len: int = 256
    engine: Engine = "one"
    num_gpus: int = 1
    attention: Attention = "eager"
    device: Literal["cuda", "cpu"] = "cuda"

    def __post_init__(self) -> None:
        _check_fields(self, {"criterion": CRITERION_PASSES, "dtype": SCORE_DTYPES, "engine": ENGINES,
                             "hvp": ("finite_difference", "exact")}, ("batch_size", "seq_len", "num_gpus"))
        if self.engine == "one" and self.num_gpus != 1:
            raise ValueError(f"engine='one' scores in one process: num_gpus={self.num_gpus} needs 'ddp' or 'zero3'")
        if self.passes == "hessian" and self.hvp == "exact":
            if self.engine == "zero3":
                raise ValueError("hvp exact needs a double backward, which ZeRO-3 scoring refuses (pipeline/sharded.py)")
            raise ValueError("hvp exact is not modelled (its double backward keeps the backward graph and every "
                             "weight's gradient): plan with hvp finite_difference")
        self.activation_setup()  # attention / device / dtype combinations the activation estimate refuses

    @property
    def passes(self) -> str:
        return CRITERION_PASSES[self.criterion]

    @property
    def weight_bytes(self) -> int:
        return SCORE_DTYPES[self.dtype]

    @property
    def ranks(self) -> int:
        """Ranks the parameters are partitioned over (1 unless ZeRO-3)."""
        return self.num_gpus if self.engine == "zero3" else 1

    def activation_setup(self) -> TrainingSetup:
        """One calibration batch in the weights' dtype, for the training activation formulas."""
        return TrainingSetup(precision="fp32" if self.weight_bytes == 4 else "bf16", micro_batch=self.batch_size,
                             seq_len=self.seq_len, device=self.device, attention=self.attention)


@dataclass
class ScoringEstimate:
    """Peak bytes of tensors per rank to score. `weights`: the parameters (ZeRO-3: this rank's partitions);
    `gradient`: the weight gradient g of the finite-difference criteria; `fd_buffers`: what those add beside g while a
    pass runs; `activations`: what one calibration batch keeps for the backward; `transient`: the logits and their
    gradients and, under ZeRO-3, the gathered parameters."""

    weights: int
    gradient: int
    fd_buffers: int
    activations: int
    transient: int
    setup: ScoringSetup

    PARTS = ("weights", "gradient", "fd_buffers", "activations", "transient")

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in self.PARTS)

    def fits(self, gpu_bytes: int | str, headroom: float = 0.0) -> bool:
        return self.total <= _usable(gpu_bytes, headroom)


def _fd_buffers(shape: ModelShape, setup: ScoringSetup) -> tuple[int, int]:
    """(g, the larger of the two working sets beside it). Perturbed passes (`earlycrop.criteria.perturbed`): two
    float32 shift buffers the size of the largest θ tensor (ZeRO-3: partition), the rounding check's bool mask and,
    for 2-byte weights, the two roundings to their dtype. Gradient pass: one weight's whole gradient (ZeRO-3: plus
    its float32 copy for 2-byte weights and this rank's partition of it)."""
    n, w = setup.ranks, setup.weight_bytes
    theta = [math.prod(s) for s in shape.matmul_shapes()]
    gradient = sum(-(-t // n) for t in theta) * 4
    largest = max(theta)
    scratch = -(-largest // n) * (2 * 4 + 1 + (2 * w if w != 4 else 0))
    whole = largest * w
    if setup.engine == "zero3":  # pipeline/sharded.py `_local_gradient`
        whole += (largest * 4 if w != 4 else 0) + -(-largest // n) * 4
    return gradient, max(scratch, whole)


def estimate_scoring_memory(shape: ModelShape, setup: ScoringSetup) -> ScoringEstimate:
    """Peak bytes per rank to score `shape` with `setup`; formulas and what is not modelled are in the module
    docstring ("Scoring")."""
    n, w, passes = setup.ranks, setup.weight_bytes, setup.passes
    weights = sum(-(-math.prod(s) // n) for _, s in shape.parameter_shapes()) * w  # ZeRO-3 pads each partition
    gradient, fd_buffers = _fd_buffers(shape, setup) if passes == "hessian" else (0, 0)
    act = setup.activation_setup()
    # scored in eval mode: no dropout masks
    scored = replace(shape, attention_dropout=False, hidden_dropout=False, embedding_dropout=False,
                     classifier_dropout=False)
    parts = activation_breakdown(scored, act) if passes != "none" else {}
    a, loss_bytes = act.activation_bytes, 4 if shape.loss_fp32 else act.activation_bytes
    logit_rows = setup.batch_size * setup.seq_len * shape.vocab_size if shape.head in ("causal_lm", "masked_lm") else 0
    activations = transient = 0
    if passes in ("hessian", "gates"):
        # the gates' products keep their ungated inputs too (earlycrop.gates: o_proj's and down's inputs, twice)
        gate_inputs = setup.batch_size * setup.seq_len * a * sum(
            h * shape.head_dim + i for h, i in zip(shape.heads, shape.intermediate))
        activations = sum(parts.values()) + gate_inputs
        transient = logit_rows * (a + 2 * loss_bytes)  # as in training: logits, gradients of log-probs and logits
    elif passes == "forward":  # no graph: the logits and one layer's tensors at a time
        transient = logit_rows * a + max(v for k, v in parts.items() if k.startswith("layer."))
    if setup.engine == "zero3" and passes != "none":
        transient += shape.gathered_params() * w
    return ScoringEstimate(weights=weights, gradient=gradient, fd_buffers=fd_buffers, activations=activations,
                           transient=transient, setup=setup)


def min_scoring_gpus(shape: ModelShape, setup: ScoringSetup, gpu_bytes: int | str, *, max_gpus: int = 1024,
                     headroom: float = 0.0) -> int | None:
    """The fewest ZeRO-3 ranks on which scoring fits in `gpu_bytes` (bytes or e.g. "80GiB") minus a `headroom`
    fraction per rank; None when even `max_gpus` do not suffice."""
    usable = _usable(gpu_bytes, headroom)

    def fits(count: int) -> bool:
        return estimate_scoring_memory(shape, replace(setup, engine="zero3", num_gpus=count)).total <= usable

    return _fewest(fits, max_gpus)


# --------------------------------------------------------------------------------------------------------------------
# Units

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20, "mi": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40,
}  # fmt: skip
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string: "24GB" = 24·10⁹ (SI), "80GiB" = 80·2³⁰ (binary), "512MiB", "1.5TB", "4096".
    Bare K/M/G/T are SI like KB/MB/GB/TB; Ki/Mi/Gi/Ti are binary. Case-insensitive."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a memory size")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value!r}: memory size must be a finite non-negative number of bytes")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a memory size")
    match = _MEMORY_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read memory size {value!r}: use a number with a unit such as '24GB' (10^9 bytes) "
            "or '80GiB' (2^30 bytes)"
        )
    return int(round(float(match.group(1)) * _UNITS[unit]))


def format_bytes(n: int | float) -> str:
    """Binary units, e.g. 1.50 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


__all__ = [
    "ACTIVATION_SAVED",
    "ATTENTIONS",
    "CRITERION_PASSES",
    "ENGINES",
    "MemoryEstimate",
    "ModelShape",
    "SCORE_DTYPES",
    "ScoringEstimate",
    "ScoringSetup",
    "TrainingSetup",
    "activation_breakdown",
    "attention_kernel",
    "attention_kind",
    "estimate_memory",
    "estimate_scoring_memory",
    "format_bytes",
    "min_gpus",
    "min_gpus_per_stage",
    "min_scoring_gpus",
    "optimizer_state_elements",
    "parse_memory",
    "shape_from_config",
]
