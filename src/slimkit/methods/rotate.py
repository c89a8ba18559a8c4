"""``rotate``: incoherence processing by orthogonal rotations fused into the weights (QuaRot's R1
on the residual stream, SpinQuant's per-head R2 on values), applied to the whole model before
calibration so that every later stage compresses rotated weights.

The saved model is an ordinary checkpoint of the same architecture: every RMSNorm's weight is
folded into the Linears that read it (and reset to the identity), the embedding, every Linear that
reads or writes the residual stream and the head are multiplied by the seeded rotation Q, and each
value head's rows and the matching output-projection columns by R2. The rotated dense model
computes the same logits (up to rounding of the storage dtype).

A tied head stays tied when the final norm's weight is a constant (then the constant moves into
the final norm); otherwise no rotation can keep one matrix for both (the head would need
E diag(g) Q and the embedding E Q), and the head is untied into its own weight, which is logged.

Supported blocks: llama-style pre-norm decoders (input_layernorm -> self_attn.{q,k,v,o}_proj,
post_attention_layernorm -> mlp.{gate,up,down}_proj; llama, mistral, qwen2, qwen3, gemma and their
kin). Others (sandwich norms, fused projections, experts, LayerNorm with a mean) are refused by name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError, RecipeError, require_bools
from ..models.layout import replace_output_head
from ..ops.rotate import (hadamard_exists, rotate_head_inputs, rotate_head_outputs, rotate_inputs, rotate_outputs,
                          rotation)
from .base import LinearState, LinearStats, Stage, register

log = logging.getLogger(__name__)

KINDS = ("hadamard", "orthogonal")
ATTN_IN, MLP_IN = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)


@torch.no_grad()
def _probe(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x.to(norm.weight.dtype)).to(torch.float64)


@torch.no_grad()
def norm_scale(norm: nn.Module, name: str) -> tuple[torch.Tensor, float]:
    """The per-channel scale g (float64) an RMSNorm applies after normalising (g = w, or 1 + w for
    gemma's norms), and the weight value that makes it the identity; ModelError for a norm that is
    not x / rms(x) * g. The form is found by probing the module; g is read from its weight exactly."""
    if getattr(norm, "bias", None) is not None:
        raise ModelError(f"{name} has a bias (a LayerNorm): rotation needs RMSNorm blocks")
    w = norm.weight
    rtol = 1e-3 if w.dtype in (torch.float32, torch.float64) else 3e-2  # probes computed in the norm's dtype
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(w.device)
    out = _probe(norm, x)
    saved = w.detach().clone()
    try:
        for ident in (1.0, 0.0):
            w.fill_(ident)
            base = _probe(norm, x)  # the normalised x alone, when this weight value is the identity
            ratio = base / x
            if not torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=rtol, atol=0):
                continue
            g = saved.to(torch.float64) + (1.0 - ident)
            if torch.allclose(out, base * g[None, :], rtol=rtol, atol=1e-6):
                return g.cpu(), ident
    finally:
        w.copy_(saved)
    raise ModelError(f"{name} ({type(norm).__name__}) is not an RMSNorm x / rms(x) * g (it subtracts a mean "
                     "or scales differently): rotation cannot fold it")


@dataclass
class Transformed:
    """What a model-level stage did: ``info`` for the report, and ``head_map`` M (d, d) float64 when
    the output head's weight became W M (so a dense reference's head moments can follow it)."""
    info: dict
    head_map: torch.Tensor | None = None


@dataclass
class ShellParts:
    embed: nn.Embedding
    head: nn.Linear
    final_norm: nn.Module
    head_dim: int


def _refuser(model_type: str):
    def refuse(why: str):
        raise ModelError(f"cannot rotate this {model_type} model: {why}")
    return refuse


def shell_parts(model: nn.Module, model_type: str) -> ShellParts:
    """The modules outside the blocks that a rotation touches, or ModelError naming what this model lacks."""
    refuse = _refuser(model_type)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        refuse("it has no nn.Embedding input and nn.Linear head")
    if head.bias is not None:
        refuse("its head has a bias")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    final = getattr(decoder, "norm", None)
    if final is None or not _is_norm(final):
        refuse("no final norm at get_decoder().norm")
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    if not head_dim:
        refuse("its head width is unknown")
    return ShellParts(embed, head, final, int(head_dim))


def block_parts(blk: nn.Module, i: int, model_type: str, head_dim: int) -> dict[str, nn.Module]:
    """Block ``i``'s norms and projections (input_norm, post_norm, q/k/v/o_proj, gate/up/down_proj),
    or ModelError naming what it lacks; works on a block built on the meta device too."""
    refuse = _refuser(model_type)
    attn, mlp = getattr(blk, "self_attn", None), getattr(blk, "mlp", None)
    d = {"input_norm": getattr(blk, "input_layernorm", None), "post_norm": getattr(blk, "post_attention_layernorm", None)}
    for p in (*ATTN_IN, "o_proj"):
        d[p] = getattr(attn, p, None)
    for p in (*MLP_IN, "down_proj"):
        d[p] = getattr(mlp, p, None)
    missing = [k for k, v in d.items() if v is None]
    if missing:
        refuse(f"block {i} has no {missing[0]} (rotation knows llama-style blocks: input_layernorm, "
               "self_attn.q/k/v/o_proj, post_attention_layernorm, mlp.gate/up/down_proj)")
    other = [n for n, m in blk.named_children() if _is_norm(m) and n not in ("input_layernorm", "post_attention_layernorm")]
    if other:
        refuse(f"block {i} has another norm on the residual path ({other[0]}), a sandwich-norm block")
    if not all(isinstance(d[p], nn.Linear) for p in (*ATTN_IN, "o_proj", *MLP_IN, "down_proj")):
        refuse(f"block {i}'s projections are not all nn.Linear")
    if d["o_proj"].in_features % head_dim or d["v_proj"].out_features % head_dim:
        refuse(f"its head width {head_dim} does not divide v_proj / o_proj")
    return d


def _materialized(module: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in module.parameters())


def _tied(model: nn.Module, parts: ShellParts) -> bool:
    return parts.head.weight is parts.embed.weight


@register
@dataclass
class Rotate(Stage):
    """Rotate the residual stream by a seeded random Hadamard (or orthogonal) matrix and each value
    head by a second one, fused into the weights; the first stage of a recipe."""

    name = "rotate"
    model_level = True
    examples = ({}, {"kind": "orthogonal", "heads": False})
    kind: str = "hadamard"
    seed: int = 0
    heads: bool = True  # also R2 on v_proj rows / o_proj columns per head

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RecipeError(f"rotate: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RecipeError(f"rotate: seed must be an integer, got {self.seed!r}")
        require_bools(self, ("heads",), prefix="rotate: ")

    def apply(self, state: LinearState, stats: LinearStats | None) -> LinearState:
        return state  # the work is done on the whole model, before calibration (transform)

    def check_model(self, model: nn.Module, blocks, model_type: str) -> ShellParts:
        """Everything the transform needs, checked before any work (ModelError / RecipeError).
        ``blocks``: the block source (models.layout.ResidentBlocks, or streaming.StreamedModel whose
        blocks are unfilled structures on the meta device until read: those are checked by structure,
        their norms when they are filled)."""
        parts = shell_parts(model, model_type)
        norm_scale(parts.final_norm, "the final norm")  # each norm is an RMSNorm this can fold
        for i in range(len(blocks)):
            d = block_parts(blocks.peek(i), i, model_type, parts.head_dim)
            for key in ("input_norm", "post_norm"):
                if _materialized(d[key]):
                    norm_scale(d[key], f"block {i} {key}")
        if self.kind == "hadamard":
            for n, what in ((parts.embed.weight.shape[1], "hidden width"), (parts.head_dim, "head width")):
                if not hadamard_exists(n):
                    raise RecipeError(f"rotate: no Hadamard matrix of order {n} (the model's {what}) is known; "
                                      "use kind: orthogonal")
        return parts

    @torch.no_grad()
    def transform(self, model: nn.Module, blocks, model_type: str,
                  device: torch.device | None = None) -> Transformed:
        """Rotate ``model`` in place (each tensor computed in float64 on ``device``, stored back in
        its own dtype and place). ``blocks``: the block source (``transform_blocks(fn)``: resident
        blocks now, streamed ones as each is read)."""
        parts = self.check_model(model, blocks, model_type)
        hidden = parts.embed.weight.shape[1]
        Q = rotation(self.kind, hidden, self.seed)
        R2 = rotation(self.kind, parts.head_dim, self.seed + 1) if self.heads else None

        def set_(p: torch.Tensor, value: torch.Tensor) -> None:
            p.copy_(value.to(p.device, p.dtype))

        def on(t: torch.Tensor) -> torch.Tensor:
            return t.to(device) if device is not None else t

        tied = _tied(model, parts)
        g_final, ident_final = norm_scale(parts.final_norm, "the final norm")
        untied = False
        head_scale = g_final
        if tied:
            if torch.allclose(g_final, g_final.mean().expand_as(g_final), rtol=1e-6, atol=0):
                head_scale = None  # the constant stays in the final norm, the head stays the embedding
            else:
                log.info("rotate: the final norm's weight is not constant, so the head is untied from the embedding")
                head = nn.Linear(hidden, parts.head.out_features, bias=False, device=parts.head.weight.device,
                                 dtype=parts.head.weight.dtype)
                head.weight.copy_(parts.embed.weight)
                replace_output_head(model, head)
                parts.head = head
                untied = True
        set_(parts.embed.weight, rotate_inputs(on(parts.embed.weight), Q))
        if not tied or untied:
            set_(parts.head.weight, rotate_inputs(on(parts.head.weight), Q, head_scale))
        if head_scale is not None:
            parts.final_norm.weight.fill_(ident_final)

        @torch.no_grad()
        def rotate_block(i: int, block: nn.Module) -> None:
            d = block_parts(block, i, model_type, parts.head_dim)
            for norm_key, readers in (("input_norm", ATTN_IN), ("post_norm", MLP_IN)):
                g, ident = norm_scale(d[norm_key], f"block {i} {norm_key}")
                for p in readers:
                    set_(d[p].weight, rotate_inputs(on(d[p].weight), Q, g))
                d[norm_key].weight.fill_(ident)
            for p in ("o_proj", "down_proj"):
                set_(d[p].weight, rotate_outputs(on(d[p].weight), Q))
                if d[p].bias is not None:
                    set_(d[p].bias, rotate_outputs(on(d[p].bias), Q))
            if R2 is not None:
                set_(d["v_proj"].weight, rotate_head_outputs(on(d["v_proj"].weight), R2))
                if d["v_proj"].bias is not None:
                    set_(d["v_proj"].bias, rotate_head_outputs(on(d["v_proj"].bias), R2))
                set_(d["o_proj"].weight, rotate_head_inputs(on(d["o_proj"].weight), R2))

        blocks.transform_blocks(rotate_block)
        M = Q if head_scale is None else head_scale.to(torch.float64)[:, None] * Q  # head W -> W diag(g) Q
        return Transformed({"kind": self.kind, "seed": self.seed, "heads": self.heads, "hidden": hidden,
                            "head_dim": parts.head_dim, "untied_head": untied}, M)
