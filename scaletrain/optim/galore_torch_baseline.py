"""galore-torch's GaLoreAdamW as a trainer optimizer (`--optim.name galore_torch`): the external
reference the project's own dense GaLore (`galore`) is compared with.

Set up as GaLore's C4 script does: 2-D weights whose names contain one of `optim.proj_patterns`
(attention and MLP) are projected at `optim.rank`, refit every `optim.update_proj_gap` steps, scaled
by `optim.proj_scale`, proj_type "std"; every other parameter is a plain Adam group. The engine
all-reduces gradients (as for adamw); every rank then takes the same step.

galore-torch keeps each projector as a Python object in the state. `GaLoreTorchAdamW` also keeps
the projector's basis as a state tensor (so the trainer's state-bytes count includes it) and saves
its state keyed by parameter name, as tensors and numbers only, so the existing checkpoint code
saves it and resumes it bit-identically.

galore-torch is optional (the [dev] extra): it is imported when this optimizer is built, so
importing scaletrain never needs it (nor the transformers import it does).
"""
from __future__ import annotations

import functools

import torch

from scaletrain.optim.config import OptimConfig

STATE_KEY = "galore_torch"  # the top-level key of the saved state: another optimizer's is refused


def is_projected(name: str, param: torch.Tensor, patterns) -> bool:
    return param.dim() == 2 and any(p in name for p in patterns)


class NamedGaLoreState:
    """Mixed into galore_torch.GaLoreAdamW by `galore_torch_adamw()`: param grouping from the
    config, the basis counted as state, name-keyed checkpoints."""
    state_keyed_by_name = True  # the checkpoint stores our own state_dict()

    def __init__(self, named_params, cfg: OptimConfig):
        named = list(named_params)
        lowrank = [p for n, p in named if is_projected(n, p, cfg.proj_patterns)]
        rest = [p for n, p in named if not is_projected(n, p, cfg.proj_patterns)]
        groups = [{"params": rest}] if rest else []
        if lowrank:
            groups.append({"params": lowrank, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
                           "scale": cfg.proj_scale, "proj_type": "std"})
        super().__init__(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         weight_decay=cfg.weight_decay, no_deprecation_warning=True)
        self.names = {p: n for n, p in named}

    @torch.no_grad()
    def step(self, closure=None):
        self._check_whole_matrices()
        loss = super().step(closure)
        for st in self.state.values():
            if "projector" in st:  # refits replace the tensor: keep the state's reference current
                st["basis"] = st["projector"].ortho_matrix
        return loss

    def _check_whole_matrices(self) -> None:
        """GaLore projects whole 2-D weights: DeepSpeed ZeRO-1/2 hands the client optimizer flat
        1-D partitions and FSDP2 row shards (galore-torch would fail deep inside, or project a shard)."""
        for group in self.param_groups:
            if "rank" in group and any(p.dim() != 2 or hasattr(p, "full_tensor") for p in group["params"]):
                raise RuntimeError("optim.name galore_torch needs whole 2-D weights: run it with "
                                   "zero_optimization.stage 0 in the deepspeed_config and not under FSDP")

    def state_dict(self) -> dict:
        """{STATE_KEY: {parameter name: step, moments, basis}}: tensors and numbers only."""
        saved = {}
        for p, st in self.state.items():
            if "exp_avg" in st:
                saved[self.names[p]] = {k: st[k] for k in ("step", "exp_avg", "exp_avg_sq", "basis") if k in st}
        return {STATE_KEY: saved}

    def load_state_dict_shards(self, shards: list[dict]) -> None:
        """Every rank saved the same (replicated) state: load rank 0's."""
        from scaletrain.checkpoint import CheckpointError

        if STATE_KEY not in shards[0]:
            raise CheckpointError(f"checkpoint optimizer state is not galore_torch's (keys "
                                  f"{sorted(shards[0])}): resume with the optim.name it was saved with")
        by_name = {n: (p, g) for g in self.param_groups for p in g["params"] for n in [self.names[p]]}
        unknown = sorted(set(shards[0][STATE_KEY]) - set(by_name))
        if unknown:
            raise CheckpointError(f"checkpoint optimizer state names parameters the model lacks: {unknown[:3]} "
                                  f"(a different model.preset?)")
        self.state.clear()
        for name, saved in shards[0][STATE_KEY].items():
            p, group = by_name[name]
            self.state[p] = self._restored(saved, p.device, group)

    @staticmethod
    def _restored(saved: dict, device, group: dict) -> dict:
        st = {"step": int(saved["step"]),
              "exp_avg": saved["exp_avg"].to(device, copy=True),
              "exp_avg_sq": saved["exp_avg_sq"].to(device, copy=True)}
        if "basis" in saved:
            from galore_torch.galore_projector import GaLoreProjector

            projector = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                        scale=group["scale"], proj_type=group["proj_type"])
            projector.ortho_matrix = saved["basis"].to(device, copy=True)
            st.update(projector=projector, basis=projector.ortho_matrix)
        return st


@functools.cache
def galore_torch_adamw() -> type:
    """The class GaLoreTorchAdamW(NamedGaLoreState, galore_torch.GaLoreAdamW)."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as e:
        raise ImportError("optim.name galore_torch needs the galore-torch package: "
                          "pip install galore-torch (or the [dev] extra)") from e
    return type("GaLoreTorchAdamW", (NamedGaLoreState, GaLoreAdamW), {})


def build_galore_torch(cfg: OptimConfig, model: torch.nn.Module, max_grad_norm: float) -> torch.optim.Optimizer:
    return galore_torch_adamw()(model.named_parameters(), cfg)
