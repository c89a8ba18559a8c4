"""Mixture-of-experts blocks: fused expert tensors seen as one Linear per expert.

transformers keeps the experts of a mixture-of-experts block as two 3-D parameters,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), applied in a loop over the experts that
received tokens. While a block is compressed, each such module is swapped for ``LinearExperts``:
one gate/up/down ``nn.Linear`` per expert computing the same function, so statistics are
collected per expert from exactly the tokens routed to it and every stage sees ordinary
Linears (named ``...experts.<e>.gate_proj``). Afterwards the (compressed) weights are written
back into the fused tensors and the original module is put back, so the saved checkpoint has
the model's own layout.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding experts as 3-D ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)
    without biases, with an activation ``act_fn``: the layout this file knows how to unfuse."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3):
        return False
    E, two_i, H = gu.shape
    if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2) or not hasattr(module, "act_fn"):
        return False
    return not any(n.endswith("bias") for n, _ in module.named_parameters(recurse=False))


class _Expert(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        I, H = gate.shape  # noqa: E741
        kw = dict(bias=False, device=gate.device, dtype=gate.dtype)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(H, I, **kw), nn.Linear(H, I, **kw), nn.Linear(I, H, **kw)
        self.gate_proj.weight.data.copy_(gate)
        self.up_proj.weight.data.copy_(up)
        self.down_proj.weight.data.copy_(down)
        self.requires_grad_(False)


class LinearExperts(nn.ModuleList):
    """The experts of ``fused`` as one Linear triple each; ``forward`` is the reference loop of
    transformers' experts modules (route, act(gate) * up, down, weight, accumulate)."""

    def __init__(self, fused: nn.Module):
        E, two_i, _ = fused.gate_up_proj.shape
        I = two_i // 2  # noqa: E741
        gu, down = fused.gate_up_proj.data, fused.down_proj.data
        super().__init__([_Expert(gu[e, :I], gu[e, I:], down[e]) for e in range(E)])
        self.num_experts = E
        self.__dict__["act_fn"] = fused.act_fn  # not registered: the list holds only the experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)  # (tokens, H)
        for e, expert in enumerate(self):
            token, pos = torch.where(top_k_index == e)  # (hits,) each: which token, which of its top-k slots
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            y = y * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def write_back(self, fused: nn.Module) -> None:
        I = fused.down_proj.shape[2]  # noqa: E741
        for e, expert in enumerate(self):
            fused.gate_up_proj.data[e, :I].copy_(expert.gate_proj.weight.data)
            fused.gate_up_proj.data[e, I:].copy_(expert.up_proj.weight.data)
            fused.down_proj.data[e].copy_(expert.down_proj.weight.data)


class UnfusedExperts:
    """Context for one block: swap every fused experts module for ``LinearExperts`` (``unfuse``)
    and, once the block is compressed, write the weights back and restore it (``refuse``)."""

    def __init__(self, block: nn.Module):
        self.swaps: list[tuple[nn.Module, str, nn.Module, LinearExperts]] = []
        for name, mod in list(block.named_modules()):
            if name and is_fused_experts(mod):
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                linear = LinearExperts(mod)
                setattr(parent, attr, linear)
                self.swaps.append((parent, attr, mod, linear))

    @property
    def linears(self) -> set[int]:
        """ids of the per-expert Linears (a Linear of an expert may see few or no tokens)."""
        return {id(m) for *_, le in self.swaps for m in le.modules() if isinstance(m, nn.Linear)}

    def refuse(self) -> None:
        for parent, attr, fused, linear in self.swaps:
            linear.write_back(fused)
            setattr(parent, attr, fused)
        self.swaps.clear()
