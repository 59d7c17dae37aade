"""GaLore's gradient projector (arXiv 2403.03507), as a small class apart from the Adam math.

For an m x n gradient G, GaLore projects on the smaller side:
  m >= n ("right"): basis P = top-r right singular vectors, r x n;  low = G P^T (m x r);  back = low P
  m <  n ("left"):  basis P = top-r left singular vectors,  m x r;  low = P^T G (r x n);  back = P low
and multiplies the projected-back update by `scale`. The basis is a plain tensor kept in the
optimizer state of the block (never a Python object in the state, unlike galore-torch), so it is
saved, moved between ranks and resharded like the moments.

`svd="lowrank"` uses torch.svd_lowrank (randomized, q = r + 10, 2 power iterations) seeded from
the block name and step, so every rank and every resumed run computes the same basis. Where the
sketch would be more than half the smaller side (small matrices, high ranks) it saves little time,
and its subspace is a loose approximation that amplifies last-bit differences in the gradient (a
2-rank run then drifts 1e-4 from the 1-rank run within a few refits): the full SVD is used there.
"""
from __future__ import annotations

import hashlib

import torch


class GaLoreProjector:
    def __init__(self, rank: int, scale: float, svd: str = "full"):
        if svd not in ("full", "lowrank"):
            raise ValueError(f"svd must be 'full' or 'lowrank', not {svd!r}")
        self.rank, self.scale, self.svd = rank, scale, svd

    def applies_to(self, shape: torch.Size) -> bool:
        """GaLore projects 2-D gradients; a block whose smaller side is <= rank gains nothing."""
        return len(shape) == 2 and min(shape) > self.rank

    @staticmethod
    def side(shape: torch.Size) -> str:
        return "right" if shape[0] >= shape[1] else "left"

    def basis_shape(self, shape: torch.Size) -> tuple[int, int]:
        m, n = shape
        return (self.rank, n) if self.side(shape) == "right" else (m, self.rank)

    def moment_shape(self, shape: torch.Size) -> tuple[int, int]:
        m, n = shape
        return (m, self.rank) if self.side(shape) == "right" else (self.rank, n)

    def fit(self, grad: torch.Tensor, key: str = "", step: int = 0) -> torch.Tensor:
        """The basis: top-r singular vectors of grad on GaLore's side."""
        g = grad.float()
        q = self.rank + 10
        if self.svd == "full" or 2 * q > min(g.shape):
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            v = vh.mT
        else:
            seed = int.from_bytes(hashlib.sha256(f"{key}:{step}".encode()).digest()[:7], "big")
            with torch.random.fork_rng(devices=[g.device] if g.is_cuda else []):
                torch.manual_seed(seed)
                u, _, v = torch.svd_lowrank(g, q=q, niter=2)
        basis = v[:, : self.rank].mT if self.side(grad.shape) == "right" else u[:, : self.rank]
        return basis.contiguous().to(grad.dtype)

    def project(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return grad @ basis.mT if self.side(grad.shape) == "right" else basis.mT @ grad

    def project_back(self, low: torch.Tensor, basis: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        full = low @ basis if self.side(shape) == "right" else basis @ low
        return full * self.scale
