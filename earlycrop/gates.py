"""Gates c: one scalar per attention head and per MLP neuron, multiplying that unit's output.

At c = 1 the forward pass is bit-for-bit unchanged; gradients with respect to c are the
unit-level signals every data-based criterion is built from. Gates live in forward pre-hooks
on the output projections, so removing them leaves no trace in the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import FamilyAdapter, LayerUnits, get_adapter


def _head_gate_hook(gate: torch.Tensor, head_dim: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        gated = (x.unflatten(-1, (-1, head_dim)) * gate.to(x.dtype)[:, None]).flatten(-2)
        return (gated, *args[1:])

    return hook


def _neuron_gate_hook(gate: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * gate.to(args[0].dtype), *args[1:])

    return hook


@dataclass
class Gates:
    """Per-layer gate tensors, heads [H_l] and neurons [I_l], attached to a model."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: list[LayerUnits]
    _handles: list = field(default_factory=list, repr=False)

    def parameters(self) -> list[torch.Tensor]:
        return [*self.heads, *self.neurons]

    def split(self, flat: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Split a list shaped like `parameters()` back into (heads, neurons)."""
        n = len(self.heads)
        return list(flat[:n]), list(flat[n:])

    def zeros_like(self) -> list[torch.Tensor]:
        """Accumulators in at least float32: sums over batches and ranks must not round in bf16."""
        return [torch.zeros_like(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in self.parameters()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attach_gates(model: nn.Module, adapter: FamilyAdapter | None = None, requires_grad: bool = True) -> Gates:
    """Install a gate on every head and every MLP neuron of `model`; call `Gates.remove()` to undo."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    param = next(model.parameters())
    heads, neurons, handles = [], [], []
    for layer in layers:
        hg = torch.ones(layer.num_heads, device=param.device, dtype=param.dtype, requires_grad=requires_grad)
        ng = torch.ones(layer.intermediate_size, device=param.device, dtype=param.dtype, requires_grad=requires_grad)
        handles.append(layer.head_out.register_forward_pre_hook(_head_gate_hook(hg, layer.head_dim)))
        handles.append(layer.mlp_out.register_forward_pre_hook(_neuron_gate_hook(ng)))
        heads.append(hg)
        neurons.append(ng)
    return Gates(heads=heads, neurons=neurons, layers=layers, _handles=handles)


@contextmanager
def gated(model: nn.Module, adapter: FamilyAdapter | None = None, requires_grad: bool = True) -> Iterator[Gates]:
    """Context manager form of `attach_gates`."""
    gates = attach_gates(model, adapter, requires_grad)
    try:
        yield gates
    finally:
        gates.remove()
