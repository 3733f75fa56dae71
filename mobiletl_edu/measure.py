"""Measured memory: what autograd really keeps for backward.

``saved_activations`` runs one forward pass under ``torch.autograd.graph.saved_tensors_hooks``
and records every tensor autograd saves. Each storage is counted once (ReLU's output and the
next conv's input are one tensor), and parameters and buffers are left out: they live in
memory whether or not we train. Each storage is charged to the innermost module running when
it was first saved.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SavedActivations:
    total_bytes: int = 0
    per_module: dict = field(default_factory=lambda: defaultdict(int))  # module name -> bytes

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 1e6


def saved_activations(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                      backward: bool = True) -> SavedActivations:
    """Bytes saved for backward by one training step of ``model`` on ``inputs``.

    With ``targets`` the cross-entropy loss is included (charged to ``"loss"``); with
    ``backward`` the step is completed, so the graph is used and freed as in training.
    """
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen, result, stack = set(), SavedActivations(), ["(top level)"]

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in seen:
            seen.add(key)
            result.total_bytes += storage.nbytes()
            result.per_module[stack[-1]] += storage.nbytes()
        return t

    def enter(name):
        return lambda module, args: stack.append(name or "(model)") and None

    def leave(module, args, output):
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs)
            stack.append("loss")
            loss = F.cross_entropy(out, targets) if targets is not None else out.float().mean()
            stack.pop()
    finally:
        for h in handles:
            h.remove()
    if backward and loss.requires_grad:
        loss.backward()
    result.per_module = dict(result.per_module)
    return result
