"""Zeroth-order sparse fine-tuning (SensZOQ, arXiv 2406.02913): a static Fisher mask of sensitive
coordinates (sensitivity.py), 4-bit frozen weights with the sensitive values kept apart (quant4.py,
model.py), and MeZO's two-point SPSA step on those values only (spsa.py)."""

from .model import ZOModel
from .quant4 import Quant4, SparseDeltaLinear, error_bound, int4_levels, nf4_levels
from .sensitivity import Mask, candidate_names, compute_mask, fisher_diagonal, top_mask
from .spsa import SPSA

__all__ = ["Mask", "Quant4", "SPSA", "SparseDeltaLinear", "ZOModel", "candidate_names", "compute_mask",
           "error_bound", "fisher_diagonal", "int4_levels", "nf4_levels", "top_mask"]
