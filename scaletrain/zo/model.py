"""A causal LM prepared for zeroth-order tuning: which coordinates move, and where they live.

Sparse (SensZOQ, density < 1): every candidate linear weight (see `sensitivity.candidate_names`)
becomes a `SparseDeltaLinear`: frozen 4-bit base (or dense with `fmt="none"`) plus its sensitive
coordinates, whose values sit in ONE flat vector `values` (float32, float64 for a float64 model;
matrices in model order, indices ascending). That vector is the only thing SPSA perturbs and updates.

Dense (MeZO, density 1): nothing is replaced; the candidate parameters themselves are perturbed
in place, as in MeZO's reference trainer.

`state_dict()` gives plain transformers Llama weights (each replaced layer materialized with its
sparse values in place), so a checkpoint loads anywhere a pretraining checkpoint does.
"""
from __future__ import annotations

import torch

from scaletrain.zo.quant4 import SparseDeltaLinear
from scaletrain.zo.sensitivity import Mask, candidate_names


class SparseStore:
    def __init__(self, values: torch.Tensor):
        self.values = values


def _parent(model: torch.nn.Module, module_name: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = module_name.split(".")
    parent = model
    for p in path:
        parent = getattr(parent, p)
    return parent, leaf


class ZOModel:
    def __init__(self, model: torch.nn.Module, mask: Mask | None, patterns=("self_attn", "mlp"),
                 fmt: str = "nf4", block: int = 64):
        self.model, self.mask, self.fmt = model, mask, fmt
        for p in model.parameters():
            p.requires_grad_(False)  # forward-only: no autograd graph, no gradients
        self.layers: dict[str, SparseDeltaLinear] = {}
        if mask is None:  # dense MeZO
            if fmt != "none":
                raise ValueError("dense zeroth-order tuning (density 1) needs full-precision weights: fmt none")
            params = dict(model.named_parameters())
            self.names = candidate_names(model, patterns)
            self.tensors = [params[n] for n in self.names]
            self.store = None
            return
        self.names = list(mask.indices)
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"the mask names weights this model does not have: {missing[:3]}")
        for n in self.names:
            if list(params[n].shape) != list(mask.shapes[n]):
                raise ValueError(f"mask shape of {n} is {mask.shapes[n]}, the model's {list(params[n].shape)}")
        dtype = torch.promote_types(params[self.names[0]].dtype, torch.float32)  # fp32 (fp64 in tests)
        values = torch.cat([params[n].detach().reshape(-1)[mask.indices[n].to(params[n].device)].to(dtype)
                            for n in self.names])
        self.store = SparseStore(values)
        offset = 0
        for n in self.names:
            module_name = n.rsplit(".", 1)[0]
            parent, leaf = _parent(model, module_name)
            linear = getattr(parent, leaf)
            if not isinstance(linear, torch.nn.Linear) or not n.endswith(".weight"):
                raise ValueError(f"{n}: sensitive coordinates are supported in nn.Linear weights only")
            layer = SparseDeltaLinear(linear, mask.indices[n], self.store, offset, fmt, block)
            setattr(parent, leaf, layer)  # the fp32 weight is released with the old module
            self.layers[n] = layer
            offset += mask.indices[n].numel()
        self.tensors = [self.store.values]

    # ------------------------------------------------------------------ what moves
    @property
    def trainable(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def effective_weight(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self.layers[name].weight_now()
        return dict(self.model.named_parameters())[name].detach()

    # ------------------------------------------------------------------ memory
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of everything the model holds: frozen 4-bit (or dense) bases, the sparse part
        (values + int64 indices), and the remaining parameters (embedding, head, norms)."""
        frozen = sum(layer.frozen_bytes() for layer in self.layers.values())
        sparse = 0
        if self.store is not None:
            sparse = self.store.values.numel() * self.store.values.element_size() + sum(
                layer.idx.numel() * layer.idx.element_size() for layer in self.layers.values())
        other = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"frozen": frozen, "sparse": sparse, "other": other, "total": frozen + sparse + other}

    # ------------------------------------------------------------------ saving
    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain Llama weights: replaced layers materialized (base + sparse values)."""
        out = {}
        replaced = {n.rsplit(".", 1)[0] for n in self.layers}
        for key, value in self.model.state_dict().items():
            module, leaf = key.rsplit(".", 1)
            if module not in replaced or leaf == "bias":  # skip the codes/scales/idx buffers
                out[key] = value.detach()
        for n, layer in self.layers.items():
            out[n] = layer.weight_now(torch.float32)
        return out
