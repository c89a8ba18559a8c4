"""Orthogonal rotations for incoherence processing (QuaRot / SpinQuant style), as pure tensor math.

A seeded random Hadamard rotation is ``Q = H diag(s) / sqrt(n)`` with H a Hadamard matrix of
order n (entries +-1, H H^T = n I) and s random signs. H is built as a Kronecker product of a
Sylvester factor (order 2^a) and Paley factors (order q + 1 for a prime q = 3 mod 4, order
2(q + 1) for a prime q = 1 mod 4), which covers the widths of the common model families (576 =
12 * 12 * 4, 896 = 28 * 32, 3584 = 28 * 128, 5120 = 20 * 256, ...). ``random_orthogonal`` (QR of
a Gaussian matrix) covers every width.

A Linear y = x W^T that reads a rotated stream x' = x Q becomes W Q; one whose output is rotated,
y' = y Q, becomes Q^T W (and its bias b Q).
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import RecipeError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), chi the quadratic character (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] (skew)."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime = 1 mod 4: C = [[0, 1^T], [1, Q]] (symmetric conference matrix),
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def _paley_orders(limit: int) -> dict[int, tuple[int, int]]:
    """Order -> (kind, q) of every Paley matrix of order <= limit that is not a power of two."""
    out: dict[int, tuple[int, int]] = {}
    for q in range(3, limit):
        if not _is_prime(q):
            continue
        n = q + 1 if q % 4 == 3 else 2 * (q + 1)
        if n <= limit and n & (n - 1) and n not in out:
            out[n] = (1 if q % 4 == 3 else 2, q)
    return out


@functools.lru_cache(maxsize=None)
def _plan(n: int) -> tuple[tuple[int, int], ...] | None:
    """Paley factors (kind, q) whose orders times a power of two make n; None when there are none."""
    if n >= 1 and n & (n - 1) == 0:
        return ()
    for order, kq in sorted(_paley_orders(n).items(), reverse=True):
        if n % order == 0:
            rest = _plan(n // order)
            if rest is not None:
                return (kq, *rest)
    return None


def hadamard_exists(n: int) -> bool:
    return _plan(n) is not None


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    plan = _plan(n)
    if plan is None:
        raise RecipeError(f"no Hadamard matrix of order {n} is known to this tool (it builds 2^a times Paley "
                          "orders q+1 and 2(q+1)); use kind: orthogonal")
    H = torch.ones(1, 1, dtype=torch.float64)
    rest = n
    for kind, q in plan:
        P = _paley1(q) if kind == 1 else _paley2(q)
        H = torch.kron(H, P)
        rest //= P.shape[0]
    s = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while rest > 1:
        H = torch.kron(H, s)
        rest //= 2
    return H


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (float64, entries +-1, H H^T = n I)."""
    return _hadamard(n).clone()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Orthogonal (n, n) float64: H diag(s) / sqrt(n) with seeded random signs s."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1
    return _hadamard(n) * signs[None, :] / math.sqrt(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Orthogonal (n, n) float64 drawn uniformly (QR of a seeded Gaussian, signs fixed by R's diagonal)."""
    A = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    Qm, R = torch.linalg.qr(A)
    return Qm * torch.sign(torch.diagonal(R))[None, :]


def rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "hadamard":
        return random_hadamard(n, seed)
    if kind == "orthogonal":
        return random_orthogonal(n, seed)
    raise RecipeError(f"unknown rotation kind {kind!r}; known: hadamard, orthogonal")


def _rows(W: torch.Tensor, fn, chunk: int = 8192) -> torch.Tensor:
    """fn over row chunks of W in float64 on W's device, cast back to W's dtype (bounded memory for
    embeddings with 100k+ rows)."""
    out = torch.empty_like(W)
    for i in range(0, W.shape[0], chunk):
        out[i:i + chunk] = fn(W[i:i + chunk].to(torch.float64)).to(W.dtype)
    return out


def rotate_inputs(W: torch.Tensor, Q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """W (out, in) of a Linear that reads x' = x Q, after folding ``scale`` (in,) (a norm's weight
    that multiplied x) into its columns: (W diag(scale)) Q."""
    Q = Q.to(W.device, torch.float64)
    s = None if scale is None else scale.to(W.device, torch.float64)
    return _rows(W, lambda w: (w * s[None, :] if s is not None else w) @ Q)


def rotate_outputs(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """W (out, in) of a Linear whose output is rotated (y' = y Q): Q^T W. Also a bias (out,) -> b Q."""
    Q = Q.to(W.device, torch.float64)
    if W.dim() == 1:
        return (W.to(torch.float64) @ Q).to(W.dtype)
    return (Q.T @ W.to(torch.float64)).to(W.dtype)


def rotate_head_outputs(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Output rows (heads * d, ...) of a per-head projection (v): every head's d rows become R^T W_h
    (a bias (heads * d,) becomes b_h R)."""
    d = R.shape[0]
    if W.shape[0] % d:
        raise RecipeError(f"a per-head rotation of width {d} does not divide {W.shape[0]} output rows")
    R = R.to(W.device, torch.float64)
    Wh = W.to(torch.float64).reshape(W.shape[0] // d, d, *W.shape[1:])
    if W.dim() == 1:
        return (Wh @ R).reshape(W.shape).to(W.dtype)
    return torch.einsum("ij,hjk->hik", R.T, Wh).reshape(W.shape).to(W.dtype)


def rotate_head_inputs(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Input columns (out, heads * d) of the projection reading per-head outputs rotated by R (o):
    every head's d columns become W_h R."""
    d = R.shape[0]
    if W.shape[1] % d:
        raise RecipeError(f"a per-head rotation of width {d} does not divide {W.shape[1]} input columns")
    R = R.to(W.device, torch.float64)
    Wh = W.to(torch.float64).reshape(W.shape[0], W.shape[1] // d, d)
    return (Wh @ R).reshape(W.shape).to(W.dtype)
