"""ReALLM's decoder variant: a residual is cut into t x t tiles, each tile is summarised by a
compact latent of ``e`` values quantized to ``latent_bits`` each, and a small decoder network
(shared by all tiles of the matrix, stored in fp16) maps a latent back to its tile.

The paper uses a convolutional decoder on 512 x 512 tiles of 7B matrices; on CPU and on the
small matrices of the default model we use small tiles and a two-layer MLP decoder. An encoder
(a linear map, not stored) is trained jointly with a straight-through rounding of the latents,
then frozen while the decoder is tuned on the quantized latents it will actually see.

Stored (bits counted exactly): latents packed at ``latent_bits`` each, one fp16 scale per tile,
the decoder's parameters in fp16.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RecipeError, require_positive_ints
from .vq import FP16, pack_bits, packed_bytes, unpack_bits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderConfig:
    tile: int = 8  # tiles are tile x tile
    latent_bits: int = 4
    hidden: int = 64
    steps: int = 300  # Adam steps (joint) + steps // 3 (decoder on frozen latents)
    seconds: float = 30.0  # wall-clock cap on training; hitting it is logged
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        require_positive_ints(self, ("tile", "latent_bits", "hidden", "steps"), prefix="decoder ")
        if self.latent_bits > 8:
            raise RecipeError(f"decoder latent_bits must be at most 8, got {self.latent_bits}")


class TileDecoder(nn.Module):
    """latent (T, e) -> tiles (T, tile * tile)."""

    def __init__(self, e: int, hidden: int, tile: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(e, hidden), nn.GELU(), nn.Linear(hidden, tile * tile))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def decoder_params(e: int, hidden: int, tile: int) -> int:
    return e * hidden + hidden + hidden * tile * tile + tile * tile


def storage_bits(shape: tuple[int, int], cfg: DecoderConfig, e: int) -> dict[str, int]:
    T = _ntiles(shape, cfg.tile)
    return {"latents": packed_bytes(T * e, cfg.latent_bits) * 8, "tile_scales": T * FP16,
            "decoder": decoder_params(e, cfg.hidden, cfg.tile) * FP16}


def latent_dim(shape: tuple[int, int], cfg: DecoderConfig, budget_bits: int) -> int:
    """The largest latent size whose storage fits ``budget_bits`` (0 when none does)."""
    e = 0
    while e < cfg.tile * cfg.tile and sum(storage_bits(shape, cfg, e + 1).values()) <= budget_bits:
        e += 1
    return e


def _ntiles(shape, t):
    return -(-shape[0] // t) * -(-shape[1] // t)


def to_tiles(X: torch.Tensor, t: int) -> torch.Tensor:
    """(out, in) -> (T, t*t), zero-padded to multiples of t."""
    out, k = X.shape
    Xp = torch.nn.functional.pad(X, (0, -k % t, 0, -out % t))
    P, Qn = Xp.shape[0] // t, Xp.shape[1] // t
    return Xp.view(P, t, Qn, t).permute(0, 2, 1, 3).reshape(P * Qn, t * t)


def from_tiles(tiles: torch.Tensor, shape: tuple[int, int], t: int) -> torch.Tensor:
    out, k = shape
    P, Qn = -(-out // t), -(-k // t)
    return tiles.view(P, Qn, t, t).permute(0, 2, 1, 3).reshape(P * t, Qn * t)[:out, :k]


@dataclass
class DecoderFit:
    shape: tuple[int, int]
    config: DecoderConfig
    e: int
    latents: torch.Tensor  # uint8, packed latent_bits per value
    tile_scale: torch.Tensor  # (T,) fp16
    decoder: dict[str, torch.Tensor]  # fp16 parameters
    X_hat: torch.Tensor  # (out, in) decoded
    steps: int

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"dec_latents": self.latents, "dec_tile_scale": self.tile_scale}
        t.update({f"dec_{k.replace('.', '_')}": v for k, v in self.decoder.items()})
        return t

    def bits(self) -> dict[str, int]:
        return storage_bits(self.shape, self.config, self.e)


def _levels(bits: int) -> int:
    return 2**bits - 1


def _quantize_latent(z: torch.Tensor, bits: int) -> torch.Tensor:
    """tanh-bounded latent -> integer level in [0, 2^b - 1] (as float), straight-through."""
    u = (torch.tanh(z) + 1) / 2 * _levels(bits)
    return u + (u.round() - u).detach()


def _latent_value(q: torch.Tensor, bits: int) -> torch.Tensor:
    return q / _levels(bits) * 2 - 1  # levels -> [-1, 1]


def fit_decoder(X: torch.Tensor, cfg: DecoderConfig, e: int, col_weight: torch.Tensor | None = None) -> DecoderFit:
    """Train encoder + decoder on the tiles of X (out, in), minimising the column-weighted error."""
    t = cfg.tile
    shape = tuple(X.shape)
    tiles = to_tiles(X, t)  # (T, t*t)
    scale = tiles.abs().amax(1).clamp_min(1e-12).half().float()  # (T,) fp16-exact
    Y = tiles / scale[:, None]
    cw = torch.ones(X.shape[1], device=X.device) if col_weight is None else col_weight.float()
    Wt = to_tiles(cw.expand(shape).contiguous(), t) * scale[:, None].square()  # true-error weights
    Wt = Wt / Wt.mean().clamp_min(1e-30)
    with torch.random.fork_rng(devices=[]):  # initialised on the CPU (seeded, reproducible), then moved
        torch.random.default_generator.manual_seed(cfg.seed)  # the CPU generator only: CUDA RNG untouched
        enc = nn.Linear(t * t, e)
        dec = TileDecoder(e, cfg.hidden, t)
    enc, dec = enc.to(X.device), dec.to(X.device)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=cfg.lr)
    t0, steps = time.perf_counter(), 0
    with torch.enable_grad():
        for phase, nsteps in (("joint", cfg.steps), ("decoder", max(1, cfg.steps // 3))):
            if phase == "decoder":
                with torch.no_grad():
                    q = _quantize_latent(enc(Y), cfg.latent_bits)
                z = _latent_value(q, cfg.latent_bits)
                opt = torch.optim.Adam(dec.parameters(), lr=cfg.lr / 3)
            for _ in range(nsteps):
                if time.perf_counter() - t0 > cfg.seconds:
                    log.info("decoder training hit its %.0f s cap after %d steps", cfg.seconds, steps)
                    break
                if phase == "joint":
                    z = _latent_value(_quantize_latent(enc(Y), cfg.latent_bits), cfg.latent_bits)
                loss = (Wt * (dec(z) - Y).square()).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
    with torch.no_grad():
        q = _quantize_latent(enc(Y), cfg.latent_bits).round()  # (T, e)
        params = {k: v.detach().half() for k, v in dec.state_dict().items()}
        fit = DecoderFit(shape, cfg, e, pack_bits(q.reshape(-1).long(), cfg.latent_bits), scale.half(), params,
                         X_hat=X.new_empty(0), steps=steps)
        fit.X_hat = decode(fit)
    return fit


def decode(fit: DecoderFit) -> torch.Tensor:
    """The (out, in) matrix a stored decoder fit represents, from its stored tensors only."""
    cfg, t = fit.config, fit.config.tile
    T = fit.tile_scale.numel()
    q = unpack_bits(fit.latents, cfg.latent_bits, T * fit.e).view(T, fit.e).float()
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten; keep the global RNG intact
        dec = TileDecoder(fit.e, cfg.hidden, t)
    dec = dec.to(q.device)
    dec.load_state_dict({k: v.float() for k, v in fit.decoder.items()})
    with torch.no_grad():
        tiles = dec(_latent_value(q, cfg.latent_bits)) * fit.tile_scale.float()[:, None]
    return from_tiles(tiles, fit.shape, t)
