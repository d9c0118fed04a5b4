"""Memory benchmark: earlycrop.memory's estimate against what a real training step allocates.

For small real-shaped models (Llama-style GQA, GPT-2, BERT MLM; dense and pruned 50% heads / 50% MLP neurons with
magnitude scores, layout uniform), fp32 and pure bf16, with and without activation checkpointing, eager attention,
AdamW, one run measures per case:

- exact parts: the estimate's weight, gradient and AdamW-state bytes against the real tensors (`p`, `p.grad`,
  every tensor in `optimizer.state`, including torch's scalar `step`);
- activations: `estimate_memory(...).activations` against the bytes autograd keeps for backward, seen through
  `torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded). With checkpointing (reentrant,
  so the hooks see the recomputation): what the forward saves + the tensors the checkpointed layers hold as keyword
  inputs + the largest single layer's recomputation during backward;
- the whole training step (forward, backward, `AdamW.step()`, `zero_grad`) in steady state (optimizer states
  already allocated): peak tensor bytes against `estimate_memory(...).total`. Measured peak = the bytes of every
  tensor of the job alive when the step starts (parameters, buffers, gradients, optimizer states, the batch) + the
  highest running sum of the allocations and frees the step makes. On CPU the allocations and frees come from
  `torch.profiler.profile(profile_memory=True)` (every CPU-allocator event, in order); on CUDA from
  `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()`, minus what was allocated when
  the step began. Two loops: "all live" keeps the gradients between steps (`zero_grad(set_to_none=False)`, as under
  gradient accumulation) and the model outputs (logits) through backward (`out = model(**batch);
  out.loss.backward()`), so every term of the estimate is live at once; "lean" is torch's default `zero_grad()`
  (`set_to_none=True`: gradients only appear as backward frees activations) and keeps only the loss
  (`model(**batch).loss.backward()`, as the HF Trainer does), so the logits are freed after the forward.

    python benchmarks/bench_memory.py                 # full run on CPU (~2-3 min with 1 thread), writes RESULTS.md
    python benchmarks/bench_memory.py --quick         # tiny models, smoke check, prints only
    python benchmarks/bench_memory.py --device cuda   # on a GPU: estimate device="cuda", CUDA allocator peak

The CPU run replaces the section `## Memory model vs measurement (bench_memory.py)` of benchmarks/RESULTS.md, a
CUDA run the section `## Memory model vs measurement on CUDA (bench_memory.py --device cuda)`; other sections are
left untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import earlycrop  # noqa: E402
from earlycrop.memory import ModelShape, TrainingSetup, estimate_memory  # noqa: E402
from results_file import write_section  # noqa: E402

SECTIONS = {
    "cpu": "## Memory model vs measurement (bench_memory.py)",
    "cuda": "## Memory model vs measurement on CUDA (bench_memory.py --device cuda)",
}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

FULL_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, use_cache=False)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=8192, n_embd=256, n_layer=6, n_head=4, n_inner=1024, n_positions=256, use_cache=False,
        bos_token_id=0, eos_token_id=0)),
    "bert": lambda: BertForMaskedLM(BertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=256)),
}
QUICK_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0)),
    "bert": lambda: BertForMaskedLM(BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)),
}
# micro batch × sequence length per precision. On CPU, bf16 runs at a smaller shape: torch has no fast bf16 matmul
# on a CPU without AVX512-BF16/AMX (this one: AVX2 only), where a bf16 step is ~20× slower than an fp32 one.
FULL_SHAPES = {"cpu": {"fp32": (4, 256), "bf16": (1, 128)}, "cuda": {"fp32": (4, 256), "bf16": (4, 256)}}
QUICK_SHAPES = {"cpu": {"fp32": (2, 32), "bf16": (2, 32)}, "cuda": {"fp32": (2, 32), "bf16": (2, 32)}}


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_simd() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(have) or "no AVX2"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def rel(est: float, measured: float) -> str:
    return f"{(est - measured) / measured:+.2%}" if measured else "n/a"


def storages_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
    return sum(seen.values())


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


# ----------------------------------------------------------------------------- measuring


class SavedTensors:
    """Bytes autograd keeps for backward, each storage once, parameters excluded; with reentrant checkpointing also
    what every layer's recomputation saves during backward (per layer) and the tensors the checkpointed layers hold
    as keyword inputs. No tensor is kept alive by the measurement itself (so it can run inside the profiled step):
    forward-saved tensors stay alive until backward anyway, and one layer's recomputed tensors until its backward."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.forward: dict[int, int] = {}
        self.recomputed: dict[int, dict[int, int]] = {}
        self.kwargs: dict[int, int] = {}
        self.phase = "forward"
        self.layer = -1
        self.checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
        self.blocks = earlycrop.get_adapter(model).blocks(model)
        self.handles = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.params:
            bucket = self.forward if self.phase == "forward" else self.recomputed.setdefault(self.layer, {})
            bucket.setdefault(ptr, s.nbytes())
        return t

    def _block_hook(self, module, args, kwargs):
        if self.phase == "forward":
            for value in kwargs.values():
                if torch.is_tensor(value):
                    self.kwargs.setdefault(value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())

    def _child_hook(self, index: int):
        # transformers 5 checkpoints a layer's `forward`, not its `__call__`: the block's own hooks do not run during
        # the recomputation, its children's do, and tell which layer is being recomputed
        def hook(module, args):
            self.layer = index
        return hook

    def __enter__(self):
        self.handles = [b.register_forward_pre_hook(self._block_hook, with_kwargs=True) for b in self.blocks]
        self.handles += [child.register_forward_pre_hook(self._child_hook(i))
                         for i, b in enumerate(self.blocks) for child in b.children()]
        self.hooks = saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def backward_starts(self) -> None:
        self.phase = "backward"

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def result(self) -> dict:
        forward = sum(self.forward.values())
        held = sum(n for ptr, n in self.kwargs.items() if ptr not in self.forward) if self.checkpointing else 0
        per_layer = [sum(b.values()) for b in self.recomputed.values()]
        largest = max(per_layer, default=0)
        return dict(forward=forward, held=held, recomputed_max=largest, recomputed_layers=len(per_layer),
                    total=forward + held + largest)


NODE = "autograd::engine::evaluate_function: "


def cpu_peak(prof, phases: list[str]) -> tuple[int, str]:
    """Highest running sum of the profiler's CPU memory events (allocations +, frees −) and where it falls: the
    phase and, in backward, the innermost autograd node running at that moment.
    Frees of blocks allocated before profiling started are not reported by the profiler; the loops here never free
    such a block during the step (pre-existing gradients are zeroed in place, not freed; the batch stays)."""
    events = prof.profiler.kineto_results.events()
    mem = sorted(((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU))
    spans = [(e.start_ns(), e.end_ns(), e.name()) for e in events if e.name() in phases]
    running = peak = 0
    at = None
    for ts, _, n in mem:
        running += n
        if running > peak:
            peak, at = running, ts
    phase = next((name for start, end, name in spans if at is not None and start <= at <= end), "-")
    nodes = [(e.end_ns() - e.start_ns(), e.name()[len(NODE):]) for e in events
             if at is not None and e.name().startswith(NODE) and e.start_ns() <= at <= e.end_ns()]
    if nodes:
        phase += f": {min(nodes)[1]}"
    return peak, phase


@dataclass
class Case:
    family: str
    layout: str
    precision: str
    checkpointing: bool
    micro_batch: int
    seq_len: int
    params: int = 0
    est: dict = field(default_factory=dict)
    real: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)
    seconds: float = 0.0


def make_batch(model, micro_batch: int, seq_len: int, device: str, seed: int = 1234) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


def train_step(model, opt, batch, all_live: bool, saved: SavedTensors | None = None, grads_out: list | None = None):
    """forward, backward, AdamW step, zero_grad. all_live: the outputs stay referenced through backward and
    `zero_grad(set_to_none=False)`; otherwise only the loss is kept and `zero_grad()` frees the gradients."""
    with saved if saved is not None else contextlib.nullcontext():
        with record_function("forward"):
            outputs = model(**batch)
            loss = outputs.loss
            if not all_live:
                del outputs
        if saved is not None:
            saved.backward_starts()
        with record_function("backward"):
            loss.backward()
        if all_live:
            del outputs
    if grads_out is not None:
        grads_out.extend(p.grad for p in model.parameters())
    with record_function("optimizer"):
        opt.step()
    with record_function("zero_grad"):
        opt.zero_grad(set_to_none=not all_live)
    if not torch.isfinite(loss.detach()).item():
        raise FloatingPointError("non-finite loss")


def measured_step(model, opt, batch, device: str, all_live: bool, **kw) -> tuple[int, str]:
    """Peak tensor bytes of one training step: live bytes at its start + the highest net allocation during it."""
    live = storages_bytes([*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()),
                           *optimizer_tensors(opt), *batch.values()])
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, opt, batch, all_live, **kw)
        torch.cuda.synchronize()
        return live + torch.cuda.max_memory_allocated() - start, "-"
    phases = ["forward", "backward", "optimizer", "zero_grad"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, opt, batch, all_live, **kw)
    peak, phase = cpu_peak(prof, phases)
    return live + peak, phase


def run_case(base: torch.nn.Module, case: Case, device: str) -> Case:
    t0 = time.perf_counter()
    model = copy.deepcopy(base).to(device=device, dtype=DTYPES[case.precision]).train()
    if case.checkpointing:
        # reentrant: the layer recomputation runs under the outer saved_tensors_hooks, so the measurement sees it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    shape = ModelShape.from_model(model)
    setup = TrainingSetup(precision=case.precision, optimizer="adamw", micro_batch=case.micro_batch,
                          seq_len=case.seq_len, activation_checkpointing=case.checkpointing, device=device,
                          attention="eager")  # build_base's models run eager attention
    est = estimate_memory(shape, setup)
    case.params = sum(p.numel() for p in model.parameters())
    case.est = dict(weights=est.weights, gradients=est.gradients, optimizer=est.optimizer,
                    activations=est.activations, transient=est.transient, total=est.total,
                    recomputed_layer=est.breakdown.get("recomputed_layer", 0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # steady state without an extra (slow) forward: zero gradients + one step allocates every AdamW state tensor
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    batch = make_batch(model, case.micro_batch, case.seq_len, device)

    # step 1, all live: gradients allocated before the step and zeroed in place after it, outputs held through
    # backward; the saved-tensor measurement runs inside it
    saved = SavedTensors(model)
    case.peaks["all_live"] = measured_step(model, opt, batch, device, all_live=True, saved=saved)
    case.saved = saved.result()
    if case.checkpointing and case.saved["recomputed_layers"] != shape.num_layers:
        raise AssertionError(f"saw {case.saved['recomputed_layers']} recomputed layers, expected {shape.num_layers}")
    if not case.checkpointing and case.saved["recomputed_layers"]:
        raise AssertionError("tensors saved during backward without checkpointing")
    # step 2, lean: gradients freed before it (torch's default zero_grad), so autograd allocates them (measured
    # for the exact parts), only the loss held through backward
    opt.zero_grad(set_to_none=True)
    grads: list[torch.Tensor] = []
    case.peaks["lean"] = measured_step(model, opt, batch, device, all_live=False, grads_out=grads)
    if any(g is None for g in grads):
        raise AssertionError("a parameter got no gradient")
    case.real = dict(weights=nbytes(model.parameters()), gradients=nbytes(grads),
                     optimizer=nbytes(optimizer_tensors(opt)),
                     buffers=storages_bytes(model.buffers()))
    del model, opt, batch, grads, saved
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    case.seconds = time.perf_counter() - t0
    return case


def build_base(make, layout: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = make().float()
    model.config._attn_implementation = "eager"
    info = {}
    if layout != "dense":
        scores = earlycrop.score_units(model, "magnitude")
        plan = earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.5, layout=layout))
        result = earlycrop.prune(model, plan)
        info = dict(counts=plan.counts(), before=result.params_before, after=result.params_after)
    return model.eval(), info


# ----------------------------------------------------------------------------- main


def run(args) -> str:
    device = args.device
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    models = QUICK_MODELS if args.quick else FULL_MODELS
    shapes = dict((QUICK_SHAPES if args.quick else FULL_SHAPES)[device])
    for spec in args.shape or []:
        prec, _, bt = spec.partition("=")
        b, _, t = bt.partition("x")
        shapes[prec] = (int(b), int(t))
    families = args.families or list(models)
    layouts = ["dense", "uniform"]
    precisions = args.precisions or ["fp32", "bf16"]
    load_start = loadavg()
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"cpu {cpu_model()} ({cpu_simd()}), device {gpu or 'cpu'}, load {load_start}")

    if device == "cuda":
        # create the cuBLAS handles and workspaces before any measured step, so no case pays for them
        for dtype in DTYPES.values():
            x = torch.ones(64, 64, device="cuda", dtype=dtype, requires_grad=True)
            torch.nn.functional.linear(x, x, x[0]).sum().backward()
        torch.cuda.synchronize()
    cases: list[Case] = []
    prune_info: dict[str, dict] = {}
    for family in families:
        for layout in layouts:
            base, info = build_base(models[family], layout)
            if info:
                prune_info[family] = info
            for precision in precisions:
                b, t = shapes[precision]
                for ckpt in (False, True):
                    case = run_case(base, Case(family, layout, precision, ckpt, b, t), device)
                    cases.append(case)
                    log(f"{family}/{layout}/{precision}/{'ckpt' if ckpt else 'no ckpt'} {b}x{t}: "
                        f"act est {mib(case.est['activations'])} vs {mib(case.saved['total'])} MiB "
                        f"({rel(case.est['activations'], case.saved['total'])}); peak est {mib(case.est['total'])} vs "
                        f"all live {mib(case.peaks['all_live'][0])} ({rel(case.est['total'], case.peaks['all_live'][0])}, "
                        f"{case.peaks['all_live'][1]}), lean {mib(case.peaks['lean'][0])} "
                        f"({rel(case.est['total'], case.peaks['lean'][0])}, {case.peaks['lean'][1]}); "
                        f"{case.seconds:.1f}s; load {loadavg()}")
            del base
            gc.collect()

    elapsed = time.perf_counter() - started
    load_end = loadavg()
    log(f"done in {elapsed:.0f}s, load {load_end}")
    return report(args, device, cases, prune_info, shapes, threads, elapsed, load_start, load_end, gpu)


def report(args, device, cases, prune_info, shapes, threads, elapsed, load_start, load_end, gpu) -> str:
    cmd = shlex.join(["python", "benchmarks/bench_memory.py", *sys.argv[1:]])
    exact_ok = all(c.est[k] == c.real[k] for c in cases for k in ("weights", "gradients", "optimizer"))
    L = [SECTIONS[device], ""]
    L.append(f"Command: `{cmd}` (run from the repository root; {'quick smoke preset' if args.quick else 'full preset'}; "
             f"wall time {elapsed:.0f} s).")
    L.append("")
    L.append(f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    machine = f"{cpu_model()} ({cpu_simd()}), {os.cpu_count()} logical cores visible, shared with other jobs " \
              f"(1-min load average {load_start.split()[0]} at start, {load_end.split()[0]} at end)"
    L.append(f"- Machine: {machine}; " + (f"GPU {gpu}." if gpu else "no GPU."))
    L.append(f"- Code: earlycrop at `{git_rev()}` (working tree as run).")
    L.append(f"- Software: Python {platform.python_version()}, torch {torch.__version__} "
             f"(`torch.set_num_threads({threads})`), transformers {transformers.__version__}.")
    if args.note:
        L.append(f"- Note: {args.note}")
    names = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}
    keys = {"llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads"),
            "gpt2": ("vocab_size", "n_embd", "n_inner", "n_layer", "n_head", "n_positions"),
            "bert": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings")}
    models = QUICK_MODELS if args.quick else FULL_MODELS
    descr = []
    for fam in dict.fromkeys(c.family for c in cases):
        cfg = models[fam]().config
        dense_params = next(c.params for c in cases if c.family == fam and c.layout == "dense")
        text = f"`{names[fam]}({', '.join(f'{k}={getattr(cfg, k)}' for k in keys[fam])})` ({dense_params:,} params"
        if fam in prune_info:
            i = prune_info[fam]
            text += f"; pruned {i['after']:,}: {i['counts']['heads'][0]} heads, {i['counts']['kv_heads'][0]} kv heads, " \
                    f"{i['counts']['neurons'][0]} neurons per layer"
        descr.append(text + ")")
    L.append("- Models (random init, attention `eager`, HF defaults otherwise, so GPT-2 and BERT train with dropout 0.1): "
             + "; ".join(descr) + ".")
    L.append("- Pruned (`uniform`): `score_units(model, \"magnitude\")` → `make_plan(..., SelectionConfig(heads=0.5, "
             "mlp=0.5, layout=\"uniform\"))` → `prune(model, plan)`, then `.to(dtype)`. fp32 = fp32 weights; bf16 = pure "
             "bf16 (`model.to(torch.bfloat16)`, AdamW states in bf16, `TrainingSetup(precision=\"bf16\")`). AdamW "
             "(torch defaults, single-tensor implementation on CPU).")
    L.append("- Batch: micro batch × sequence length " + ", ".join(f"{p} {b} × {t}" for p, (b, t) in shapes.items())
             + ", random tokens, labels = inputs" + (
                 "; bf16 runs smaller on this CPU because it has no AVX512-BF16/AMX, so torch's bf16 matmul is a slow "
                 "fallback (a bf16 forward + backward of the GPT-2 at 4 × 256 took ~41 s against ~2 s in fp32)."
                 if device == "cpu" and shapes.get("bf16") != shapes.get("fp32") else "."))
    L.append(f"- Estimate: `estimate_memory(ModelShape.from_model(model), TrainingSetup(precision, \"adamw\", micro_batch, "
             f"seq_len, activation_checkpointing, device=\"{device}\", attention=\"eager\"))`. ckpt = "
             "`model.activation_checkpointing_enable(activation_checkpointing_kwargs={\"use_reentrant\": True})`, every "
             "layer checkpointed (`gradient_checkpointing_enable` is its deprecated alias in transformers 5; reentrant "
             "so that the saved-tensor hooks see the recomputation; the peaks are measured with it too; HF's default, "
             "non-reentrant checkpointing, is not measured here).")
    L.append("- Exact parts: Δ = estimate − real bytes of the parameters, of the gradients autograd allocated, and of "
             "every AdamW state tensor (`exp_avg`, `exp_avg_sq`, the fp32 `step` scalar). "
             + ("**0 in every case.**" if exact_ok else "**NOT all 0**, see the table."))
    L.append("- Activations: estimate vs bytes saved for backward (`saved_tensors_hooks`, each storage once, parameters "
             "excluded); with ckpt: what the forward saves + tensors held as the checkpointed layers' keyword inputs + "
             "the largest layer's recomputation during backward.")
    peak_how = ("`torch.profiler.profile(profile_memory=True)`: bytes of the job's tensors alive at the start of the "
                "step (parameters, buffers, gradients, AdamW states, batch) + the highest running sum of the CPU "
                "allocator's allocation (+) and free (−) events during the step, in time order (requested bytes: "
                "malloc overhead and fragmentation are not seen)"
                if device == "cpu" else
                "bytes of the job's tensors alive at the start of the step + `torch.cuda.max_memory_allocated()` (after "
                "`reset_peak_memory_stats()`) − `memory_allocated()` at the start (allocated, not reserved, bytes)")
    L.append(f"- Peak: one steady-state training step (forward, backward, `AdamW.step()`, `zero_grad`; AdamW states "
             f"allocated beforehand by one step on zero gradients), measured as {peak_how}. **all live**: "
             "`out = model(**batch); out.loss.backward()` with gradients kept between steps "
             "(`zero_grad(set_to_none=False)`, as under gradient accumulation): every term of the estimate exists "
             "at once. **lean**: `model(**batch).loss.backward()` (only the loss held, as HF Trainer's `training_step`) "
             "and torch's default `zero_grad()` (set_to_none=True). Where = phase of the peak"
             + (" and, in backward, the autograd node running at that moment." if device == "cpu" else "."))
    L.append("")
    L.append("| model | layout | dtype | B × T | ckpt | params | Δ weights / grads / AdamW (B) | activations est / measured MiB | act. err | "
             "peak est MiB | peak all live MiB | err | where | peak lean MiB | err | where |")
    L.append("|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for c in cases:
        d = " / ".join(str(c.est[k] - c.real[k]) for k in ("weights", "gradients", "optimizer"))
        live, lwhere = c.peaks["all_live"]
        lean, nwhere = c.peaks["lean"]
        L.append(f"| {c.family} | {c.layout} | {c.precision} | {c.micro_batch} × {c.seq_len} | {'yes' if c.checkpointing else 'no'} | "
                 f"{c.params:,} | {d} | {mib(c.est['activations'])} / {mib(c.saved['total'])} | "
                 f"{rel(c.est['activations'], c.saved['total'])} | {mib(c.est['total'])} | {mib(live)} | "
                 f"{rel(c.est['total'], live)} | {lwhere} | {mib(lean)} | {rel(c.est['total'], lean)} | {nwhere} |")
    L.append("")
    act_errs = [abs(c.est["activations"] - c.saved["total"]) / c.saved["total"] for c in cases]
    live_errs = [(c.est["total"] - c.peaks["all_live"][0]) / c.peaks["all_live"][0] for c in cases]
    lean_errs = [(c.est["total"] - c.peaks["lean"][0]) / c.peaks["lean"][0] for c in cases]
    L.append(f"Summary over {len(cases)} cases: exact parts {'all 0' if exact_ok else 'NOT all 0'}; activation error "
             f"at most {max(act_errs):.2%} in absolute value; whole-step peak error (estimate − measured) / measured "
             f"{min(live_errs):+.1%} to {max(live_errs):+.1%} for \"all live\", {min(lean_errs):+.1%} to "
             f"{max(lean_errs):+.1%} for \"lean\" (positive = the estimate is above the measurement).")
    L.append("")
    L.append("Where the peak difference sits (\"all live\"): the model states are exact, so all of it is in what lives "
             "on top of them. dynamic = peak − weights − gradients − AdamW states − model buffers (the batch stays in: "
             "the estimate counts token ids and labels among the activations); est = `activations + transient` of the "
             "estimate; recomputed layer = the estimate's `recomputed_layer` term.")
    L.append("")
    L.append("| model | layout | dtype | ckpt | weights + grads + AdamW MiB | buffers MiB (not estimated) | est act. + transient MiB | "
             "dynamic measured MiB | est − measured MiB | recomputed layer MiB |")
    L.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    gaps = {}
    for c in cases:
        states = c.real["weights"] + c.real["gradients"] + c.real["optimizer"]
        dyn_est = c.est["activations"] + c.est["transient"]
        dyn = c.peaks["all_live"][0] - states - c.real["buffers"]
        gaps[id(c)] = dyn_est - dyn
        L.append(f"| {c.family} | {c.layout} | {c.precision} | {'yes' if c.checkpointing else 'no'} | {mib(states)} | "
                 f"{mib(c.real['buffers'])} | {mib(dyn_est)} | {mib(dyn)} | {mib(dyn_est - dyn)} | "
                 f"{mib(c.est['recomputed_layer']) if c.checkpointing else '-'} |")
    L.append("")
    located = device == "cpu"  # the CUDA measurement does not record where the peak falls
    at_loss = [c for c in cases if "LogSoftmax" in c.peaks["all_live"][1] or not located]
    where = "peak at the loss backward" if located else "where the peak falls is not recorded on CUDA"
    plain = [c for c in at_loss if not c.checkpointing]
    ckpt = [c for c in at_loss if c.checkpointing]
    elsewhere = [c for c in cases if c not in at_loss]
    L.append("What the estimate leaves out or over-counts (read off the tables above; \"all live\" unless said):")
    L.append("")
    if plain:
        worst = max(plain, key=lambda c: abs(gaps[id(c)]) / c.peaks["all_live"][0])
        L.append(f"- Without checkpointing, {where} ({len(plain)} of "
                 f"{sum(not c.checkpointing for c in cases)} cases): the estimate is within "
                 f"{max(abs(gaps[id(c)]) for c in plain) / 2**10:.0f} KiB of the measured peak (at most "
                 f"{abs(gaps[id(worst)]) / worst.peaks['all_live'][0]:.3%})" + (". That moment is the one the estimate "
                 "describes: every saved activation, the logits, and the gradients of the log-probabilities and "
                 "logits." if located else "."))
    if ckpt:
        ratios = [gaps[id(c)] / c.est["recomputed_layer"] for c in ckpt]
        ckpt_errs = [(c.est["total"] - c.peaks["all_live"][0]) / c.peaks["all_live"][0] for c in ckpt]
        L.append(f"- With checkpointing, {where} ({len(ckpt)} of {sum(c.checkpointing for c in cases)} "
                 "cases): the estimate adds one recomputed layer on top of the loss-time tensors"
                 + (", but the real step never holds both, as the logits' gradients are freed before the first layer "
                    "is recomputed" if located else "")
                 + f". est − measured = {min(ratios):.3f}–{max(ratios):.3f} × the recomputed-layer term"
                 + (", so the estimate is an upper bound by one layer's activations" if located else "")
                 + f" ({min(ckpt_errs):+.1%} to {max(ckpt_errs):+.1%} of the peak here).")
    if elsewhere:
        L.append("- Peak elsewhere (" + ", ".join(
            f"{c.family}/{c.layout}/{c.precision}/{'ckpt' if c.checkpointing else 'no ckpt'}: estimate "
            f"{mib(abs(gaps[id(c)]))} MiB {'under' if gaps[id(c)] < 0 else 'over'}, at {c.peaks['all_live'][1]}"
            for c in elsewhere) + "). Not modelled: temporaries of backward"
            + (". Where the activations are small next to the [V, H] embedding the peak moves to the end of backward: "
               "with tied embeddings autograd holds the output projection's weight gradient until the input "
               "embedding's gradient arrives, then sums the two into a third [V, H] tensor before adding it to "
               "`.grad` (3·V·H·w at once; traced with the profiler while writing this benchmark: one [V, H] "
               "allocation in the decoder's `mm`, two in `EmbeddingBackward0`)"
               if any("EmbeddingBackward" in c.peaks["all_live"][1] for c in elsewhere) else "")
            + ". Gradients of activations (about one layer's worth) are not modelled either; at the loss-time peak "
              "they do not matter.")
    else:
        L.append("- Not modelled" + (" (no case here peaked elsewhere than the loss backward)" if located else "")
                 + ": temporaries of backward — a "
                 "parameter's gradient before it is added into `.grad` (for tied embeddings autograd holds the output "
                 "projection's [V, H] weight gradient until the input embedding's arrives, then sums them), gradients "
                 "of activations (about one layer's worth).")
    lean_err = lambda c: (c.est["total"] - c.peaks["lean"][0]) / c.peaks["lean"][0]  # noqa: E731
    L.append("- \"lean\" loop: two terms of the estimate are never live at its peak: the logits (B·T·V·a, freed after "
             "the forward when only the loss is kept) and the parameter gradients (Ψ·w, allocated during backward "
             "as activations are freed; the estimate counts all of them on top of all activations). The estimate is "
             f"above the lean peak by {min(map(lean_err, cases)):+.1%} to {max(map(lean_err, cases)):+.1%}"
             + ("; in that loop it is an upper bound, not a prediction." if min(map(lean_err, cases)) >= 0 else "."))
    in_opt = [c for c in cases if any(c.peaks[k][1].startswith("optimizer") for k in c.peaks)]
    L.append("- Also outside the estimate: model buffers (≤ "
             f"{max(c.real['buffers'] for c in cases) / 2**10:.0f} KiB here: rotary frequencies, position / token-type "
             "id tables); optimizer-step temporaries (torch "
             "picks the single-tensor AdamW on CPU: temporaries per parameter, at most the largest matrix"
             + (f"; the peak fell in `optimizer.step()` in {len(in_opt)} of {2 * len(cases)} measured steps" if located
                else "")
             + (", all in the \"lean\" loop" if located and in_opt and all(
                 c.peaks["lean"][1].startswith("optimizer") and not c.peaks["all_live"][1].startswith("optimizer")
                 for c in in_opt) else "")
             + "; on CUDA the default foreach AdamW allocates temporaries for all parameters at once); and "
             "everything a tensor-bytes measure does not see: allocator overhead and fragmentation (glibc arenas, the "
             "CUDA caching allocator's reserved-but-unallocated memory), the CUDA context, cuBLAS/cuDNN workspaces.")
    if device == "cpu":
        L.append("")
        L.append("**Not checked: the default `device=\"cuda\"` mode** of the estimate (1-byte dropout masks, fp32 "
                 "LayerNorm statistics; `TrainingSetup`'s default, and what `pipeline/run.py` uses when CUDA is "
                 "available) has NOT been compared with `torch.cuda.max_memory_allocated` — no GPU was available for "
                 "this run. Nor are `bf16_mixed` / `fp16_mixed` (fp32 master copies), ZeRO, SDPA/flash attention or "
                 "the other optimizers exercised here. On a machine with a GPU run "
                 "`python benchmarks/bench_memory.py --device cuda` (same models, fp32 and bf16 at 4 × 256, estimate "
                 "with `device=\"cuda\"`, peak from `torch.cuda.max_memory_allocated()` after "
                 "`torch.cuda.reset_peak_memory_stats()`); it writes its own section, "
                 f"`{SECTIONS['cuda']}`, and leaves this one alone.")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and batches: a smoke check (prints, does not write)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: estimate device='cpu', profiler peak; cuda: estimate device='cuda', CUDA allocator peak")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--families", nargs="+", choices=list(FULL_MODELS), default=None, help="subset of the models")
    ap.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=None, help="subset of fp32, bf16")
    ap.add_argument("--shape", action="append", metavar="PREC=BxT",
                    help="micro batch × sequence length for a precision, e.g. --shape bf16=4x256 (repeatable)")
    ap.add_argument("--note", default="", help="free text added to the report")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is replaced")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write the section into --results (default: yes for the full run, no for --quick)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():  # before any model is built: one line, status 1
        why = "a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        raise SystemExit(f"bench_memory.py: error: --device cuda needs a CUDA GPU and torch {torch.__version__} sees "
                         f"none ({why}); run it on a GPU machine or use --device cpu")
    section = run(args)
    print()
    print(section)
    write = (not args.quick) if args.write is None else args.write
    if write:
        write_section(args.results, SECTIONS[args.device], section)
        log(f"wrote section to {args.results}")


if __name__ == "__main__":
    main()
