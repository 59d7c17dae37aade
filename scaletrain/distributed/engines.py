"""Backends behind one tiny interface: `train_step(micro_batches) -> mean local loss`.

Each engine owns gradient accumulation, clipping, precision and the optimizer/LR step, all
configured by the DeepSpeed JSON (the single source of truth for those knobs):
  DeepSpeedEngine  `deepspeed.initialize` with our optimizer as the client optimizer
  SingleEngine     one process, plain PyTorch (no DeepSpeed runtime), same numerics
  FSDPEngine       FSDP2 (`fully_shard`, ZeRO-3): every parameter sharded across ranks; the
                   model is sharded by `shard_model` before the optimizer is built

Optimizers that synchronise gradients themselves (the block optimizer only reduces the blocks
it trains) set `syncs_grads`: the engine then neither all-reduces nor clips (the optimizer clips
after its own reduction, so the norm is global).

Non-finite steps: before the optimizer step every rank checks its mean loss and its local
gradients; one all-reduce of that flag decides, identically on all ranks, whether the step is
applied. A skipped step changes no weight, moment, step count or selection and does not advance
the LR schedule; the engine clears the gradients and sets `step_skipped`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch

from scaletrain.distributed.runtime import DistContext, all_reduce_max
from scaletrain.models.llama import causal_lm_loss

log = logging.getLogger("scaletrain")
# Fault-injection hook for tests: "RANK:STEP[,STEP...]" makes RANK's gradient NaN (its loss stays
# finite) at those steps, numbered as in metrics.jsonl (1 = the first step).
NAN_GRAD_ENV = "SCALETRAIN_TEST_NAN_GRAD"


def nan_grad_steps(rank: int) -> set[int]:
    """The steps at which the test hook NAN_GRAD_ENV poisons this rank's gradient."""
    hook_rank, _, steps = os.environ.get(NAN_GRAD_ENV, "").partition(":")
    if not hook_rank or int(hook_rank) != rank:
        return set()
    return {int(s) for s in steps.split(",") if s}


def poison_gradient(loss: torch.Tensor) -> None:
    """Test hook: every gradient that flows back from `loss` becomes NaN; the loss value does not."""
    loss.register_hook(lambda g: torch.full_like(g, float("nan")))


def local_shard(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's shard of an FSDP2 DTensor


def step_is_finite(mean_loss: float, local_grads: list[torch.Tensor], ctx: DistContext) -> bool:
    """Collective: True on every rank iff every rank's loss and local gradient norm are finite
    (a norm overflows to inf when a gradient does, and is NaN when one is)."""
    grads = [local_shard(g) for g in local_grads if g is not None]
    norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    local_bad = not (math.isfinite(mean_loss) and math.isfinite(norm))
    return all_reduce_max(float(local_bad), ctx) == 0.0


def local_gradients(module, optimizer) -> list[torch.Tensor]:
    """The gradients this rank holds before the optimizer step (the block optimizer also keeps
    fp32 accumulations of its own under bf16 weights)."""
    if hasattr(optimizer, "pending_grads"):
        return optimizer.pending_grads()
    return [p.grad for p in module.parameters() if p.grad is not None]


@contextlib.contextmanager
def skipped_update(optimizer):
    """Inside, `optimizer.step()` does nothing and reports `overflow`: the contract DeepSpeed's
    engine honours for fp16 loss scaling (it then clears the gradients, leaves the LR schedule
    where it is and counts a skipped step), reused here for a non-finite step."""
    had_step, had_overflow = "step" in vars(optimizer), hasattr(optimizer, "overflow")
    saved_step, saved_overflow = getattr(optimizer, "step"), getattr(optimizer, "overflow", None)
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        if had_step:
            optimizer.step = saved_step
        else:
            del optimizer.step
        if had_overflow:
            optimizer.overflow = saved_overflow
        else:
            del optimizer.overflow


def resolve_precision(ds_config: dict[str, Any]) -> dict[str, Any]:
    """bf16.enabled 'auto' (as in the HF integration) means: on where the device supports it."""
    ds = dict(ds_config)
    bf16 = dict(ds.get("bf16", {}))
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    ds["bf16"] = bf16
    return ds


def bf16_enabled(ds_config: dict[str, Any]) -> bool:
    return bool(ds_config.get("bf16", {}).get("enabled", False))


def use_bf16_weights(model, optimizer) -> None:
    """Cast the model to bf16 (parameters keep their identity, so the optimizer's references
    stay valid) and let the block optimizer keep fp32 masters of the blocks it trains."""
    model.to(torch.bfloat16)
    optimizer.use_master_weights()


def _as_float(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP


class SingleEngine:
    """World size 1, no DeepSpeed runtime: accumulation, clipping and bf16 autocast by hand."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        self.module = model.to(ctx.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.clip = 0.0 if syncs_grads else float(ds_config.get("gradient_clipping", 0.0))
        # bf16: the block optimizer keeps bf16 weights and fp32 masters of its selected blocks;
        # a dense optimizer keeps fp32 weights and autocasts the compute
        self.autocast = bf16_enabled(ds_config) and not syncs_grads
        if bf16_enabled(ds_config) and syncs_grads and not isinstance(self, FSDPEngine):
            use_bf16_weights(self.module, optimizer)
        self.device = ctx.device
        self.ctx = ctx
        self.grad_norm: float | None = None
        self.step_skipped = False

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, micro_batches: list, loss_fn=causal_lm_loss, poison: bool = False) -> float:
        """loss_fn(module, micro_batch) -> mean loss; the causal-LM loss, or a fine-tuning task's.
        poison: the NaN-gradient test hook (see NAN_GRAD_ENV)."""
        total = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self._sync_grads(last)
            with self._autocast():
                loss = loss_fn(self.module, mb.to(self.device, non_blocking=True))
            if poison and last:
                poison_gradient(loss)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        mean_loss = total / len(micro_batches)
        self.step_skipped = not step_is_finite(mean_loss, local_gradients(self.module, self.optimizer), self.ctx)
        if self.step_skipped:  # no optimizer or LR step: nothing changes but the cleared gradients
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_norm = float("nan")
            return mean_loss
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip > 0:
            self.grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        else:
            self.grad_norm = _as_float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = getattr(self.optimizer, "last_grad_norm", self.grad_norm)
        return mean_loss

    def _sync_grads(self, last_micro_batch: bool) -> None:
        pass  # one process: nothing to synchronise

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    zero_partitions_state = False

    def grad_leaves(self) -> dict[str, torch.Tensor] | None:
        return None  # the parameters themselves


def shard_model(model, ds_config: dict, ctx: DistContext):
    """FSDP2: shard each decoder layer, then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(ctx.device)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16_enabled(ds_config) else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


class FSDPEngine(SingleEngine):
    """FSDP2: the same step as SingleEngine; FSDP reduce-scatters (averages) gradients across ranks
    in backward, so parameters, gradients and AdamW state are all sharded (ZeRO-3)."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        super().__init__(model, optimizer, scheduler, ds_config, ctx, syncs_grads)
        self.autocast = False  # FSDP's MixedPrecisionPolicy casts instead

    def _sync_grads(self, last_micro_batch: bool) -> None:
        self.module.set_requires_gradient_sync(last_micro_batch)  # reduce once per step

    def grad_leaves(self) -> dict[str, torch.Tensor]:
        """The unsharded parameters autograd accumulates into (FSDP2 creates them at the first
        all-gather and reuses them), found through the public unshard() one FSDP module at a time,
        so no rank ever holds more than one layer unsharded (at 7B, not the whole model). Inner
        modules come first: the root's listing then shows their parameters sharded again, and
        the unsharded tensors recorded for them are kept."""
        from torch.distributed.fsdp import FSDPModule

        leaves: dict[str, torch.Tensor] = {}
        fsdp_modules = [(n, m) for n, m in self.module.named_modules() if isinstance(m, FSDPModule)]
        for prefix, m in reversed(fsdp_modules):
            m.unshard()
            for name, p in m.named_parameters():
                leaves.setdefault(f"{prefix}.{name}" if prefix else name, p)
            m.reshard()
        return leaves


def check_zero_stage(ds_config: dict, backend: str) -> None:
    """ZeRO-3 partitions the parameters themselves, which neither the block optimizer (whole blocks)
    nor our checkpoints (full weights, name-keyed state) handle under DeepSpeed; FSDP2 is our ZeRO-3."""
    from scaletrain.config_fields import ConfigError

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if backend == "deepspeed" and stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed_config: zero_optimization.stage {stage} is not supported under "
                          f"the DeepSpeed backend (stages 0-2); for sharded parameters (ZeRO-3) use "
                          f"--backend fsdp (e.g. torchrun ... --backend fsdp)")


STAGE_MEANING = {0: "states replicated, gradients all-reduced",
                 1: "each block's state on one owner rank, gradients all-reduced",
                 2: "each block's state and reduced gradient on one owner rank"}


class DeepSpeedEngine:
    """`deepspeed.initialize` with our optimizer and LR schedule as client objects."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        import deepspeed

        from scaletrain.distributed.runtime import skip_deepspeed_shm_allreduce

        skip_deepspeed_shm_allreduce()  # (when the process group was started without DeepSpeed)
        ds = dict(ds_config)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if syncs_grads:
            # DeepSpeed's ZeRO flattens parameters into 1-D partitions, destroying the per-tensor
            # structure block selection needs; the engine runs at stage 0 and leaves gradient
            # reduction and clipping to the optimizer (which reduces selected blocks only).
            ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
            ds["gradient_clipping"] = 0.0
            if bf16_enabled(ds):  # bf16 weights; fp32 masters of the selected blocks, on owners
                ds["bf16"] = {"enabled": False}
                use_bf16_weights(model, optimizer)
                if ctx.is_main:
                    log.info("bf16: bf16 weights on every rank, fp32 master copies of the selected "
                             "blocks on their owners, gradients accumulated and reduced in fp32")
            optimizer.zero_stage = stage  # realised by the owner partition, per block
            if ctx.is_main:
                log.info("block optimizer: DeepSpeed engine runs at ZeRO stage 0; the requested "
                         "stage %d is realised per selected block by the optimizer (%s); it also "
                         "reduces and clips (%.3g) the selected gradients", stage, STAGE_MEANING[min(stage, 2)],
                         float(ds_config.get("gradient_clipping", 0)))
        self.zero_stage = ds["zero_optimization"].get("stage", 0) if "zero_optimization" in ds else 0
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        if syncs_grads:
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module
        self.device = ctx.device
        self.ctx = ctx
        self.syncs_grads = syncs_grads
        self.grad_norm: float | None = None
        self.step_skipped = False

    def train_step(self, micro_batches: list, loss_fn=causal_lm_loss, poison: bool = False) -> float:
        """loss_fn(module, micro_batch) -> mean loss (bf16: DeepSpeed casts the model, or the block
        optimizer keeps bf16 weights; no autocast either way). poison: see NAN_GRAD_ENV."""
        total = 0.0
        skipped_before = self.engine.skipped_steps
        finite = True
        for i, mb in enumerate(micro_batches):
            loss = loss_fn(self.engine, mb.to(self.device, non_blocking=True))
            if poison and i == len(micro_batches) - 1:
                poison_gradient(loss)
            self.engine.backward(loss)
            total += loss.item()
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                finite = step_is_finite(total / len(micro_batches),
                                        local_gradients(self.module, self.optimizer), self.ctx)
            if boundary and self.zero_stage == 0 and finite:
                # stage 0: gradients are all-reduced now and not yet clipped
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                self.grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            # ZeRO 1/2 keep the gradients in their own partitions: only their own overflow path
            # (a non-finite global norm, checked in fp32 and, by default, bf16) clears them
            skip = boundary and not finite and self.zero_stage == 0
            with skipped_update(self.engine.optimizer) if skip else contextlib.nullcontext():
                self.engine.step()
            if skip:  # DeepSpeed clears p.grad; the block optimizer's own accumulations too
                self.optimizer.zero_grad(set_to_none=True)
        self.step_skipped = self.engine.skipped_steps > skipped_before
        if not finite and not self.step_skipped:
            log.warning("DeepSpeed ZeRO-%d applied a step whose loss was not finite (its overflow "
                        "check looks at gradients only)", self.zero_stage)
        if self.step_skipped:
            self.grad_norm = float("nan")
        elif self.syncs_grads:
            self.grad_norm = self.optimizer.last_grad_norm
        elif self.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        return total / len(micro_batches)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_leaves(self) -> dict[str, torch.Tensor] | None:
        return None  # the parameters themselves

    @property
    def zero_partitions_state(self) -> bool:
        """Dense AdamW under ZeRO 1/2: the state lives in DeepSpeed's flat fp32 partitions."""
        return self.zero_stage > 0 and not self.syncs_grads

    def optimizer_shard(self) -> tuple[dict, dict]:
        """Collective: ZeRO's partitioned AdamW state, per parameter (DeepSpeed's public
        tensor-fragment API), in the name-keyed layout torch.distributed.checkpoint's
        get_optimizer_state_dict gives the other backends, so a checkpoint resumes at any world
        size and under any backend. Each full tensor is assembled on every rank (one parameter at
        a time) and kept by one rank only, so each rank holds and writes about 1/W of the state.
        Returns (flat "optim/state/<name>/<key>" entries for DCP, metadata for trainer.pt)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        zero = self.engine.optimizer
        steps = [st["step"] for st in zero.optimizer.state.values() if "step" in st]
        named = list(self.module.named_parameters())
        rank, world = self.ctx.rank, self.ctx.world_size
        mine = _balanced_share([p.numel() for _, p in named], world)
        flat = {}
        if steps:  # nothing before the first step, as torch's lazily built state
            for i, (name, p) in enumerate(named):
                for key in ("exp_avg", "exp_avg_sq"):
                    full = safe_get_full_optimizer_state(p, key)  # collective
                    if mine[i] == rank:
                        flat[f"optim/state/{name}/{key}"] = full.detach().cpu().view_as(p)
                if mine[i] == rank:
                    flat[f"optim/state/{name}/step"] = steps[0].detach().clone().cpu()
        group = {k: v for k, v in zero.param_groups[0].items() if k != "params"}
        return flat, {"kind": "torch", "param_groups": [{**group, "params": [n for n, _ in named]}]}

    def load_optimizer_states(self, states) -> None:
        """Inverse of optimizer_shard, at this run's world size, from (parameter name, whole
        state) pairs read one at a time: ZeRO's fp32 master copy is refreshed from the (already
        restored) model weights and each rank writes its own fragment of every state tensor; no
        communication. (Each rank reads every parameter's whole state, one at a time: ZeRO's flat
        fragments do not map onto DCP's row chunks.)"""
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = self.engine.optimizer
        zero.refresh_fp32_params()  # the master copy follows the restored weights
        params = dict(self.module.named_parameters())
        built = False
        for name, st in states:
            if not built:  # torch builds its state lazily: build it now, once
                self._build_zero_state(st["step"])
                built = True
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(params[name], st[key].to(self.device).reshape(-1), key)

    def _build_zero_state(self, step: torch.Tensor) -> None:
        zero = self.engine.optimizer
        for flat in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[flat] = {"step": step.detach().clone().to(torch.float32),
                                          "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()  # point each parameter at its fragments


def _balanced_share(sizes: list[int], world: int) -> list[int]:
    """The rank that keeps each tensor: largest first onto the least loaded rank."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world), key=load.__getitem__)
        load[owner[i]] += sizes[i]
    return owner


ENGINES = {"deepspeed": DeepSpeedEngine, "single": SingleEngine, "fsdp": FSDPEngine}


def build_engine(backend: str, model, optimizer, scheduler, ds_config, ctx, syncs_grads: bool):
    return ENGINES[backend](model, optimizer, scheduler, ds_config, ctx, syncs_grads)
