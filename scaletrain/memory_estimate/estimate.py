"""The estimate: a run's setup (Setup), the per-rank figures (Estimate: JSON and table) and
`estimate()`, which adds up weights, gradients, optimizer states, projections and activations for
torch AdamW under DeepSpeed ZeRO / FSDP2 or the block optimizer."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from scaletrain.config import OptimConfig
from scaletrain.memory_estimate.activations import activation_bytes
from scaletrain.memory_estimate.model import ModelSpec
from scaletrain.memory_estimate.optimizer_state import (PROJECTIONS, block_layout, block_shapes, block_state_bytes,
                                                        fractional_knapsack, selected_state_bytes)
from scaletrain.optim.comm import BUCKET_BYTES
from scaletrain.optim.selection import always_blocks, partition_blocks

GIB = 2**30
MODES = ("adamw", "block", "galore", "gradnorm_lorp")
COMPONENTS = ("weights", "gradients", "optimizer_states", "projections", "activations")
BUCKET_MIB = BUCKET_BYTES // 2**20  # the block optimizer's communication bucket
STEP_TENSOR_BYTES = 4  # torch.optim.AdamW's 'step': a float32 scalar tensor per parameter tensor


OPTIM_DEFAULTS = OptimConfig()


@dataclass
class Setup:
    mode: str = "adamw"
    world_size: int = 1
    zero_stage: int = 2
    density: float = 0.05
    projection: str = "none"
    rank: int = 128
    eight_bit: bool | None = None  # None: the trainer's default for the mode (block: OptimConfig's)
    # the block optimizer's kinds of parameters; defaults are the trainer's (OptimConfig)
    frozen_patterns: tuple[str, ...] = tuple(OPTIM_DEFAULTS.frozen_patterns)
    always_train: tuple[str, ...] = tuple(OPTIM_DEFAULTS.always_train)
    inactive: str = OPTIM_DEFAULTS.inactive
    proj_patterns: tuple[str, ...] = tuple(OPTIM_DEFAULTS.proj_patterns)
    max_block_fraction: float = OPTIM_DEFAULTS.max_block_fraction
    dtype: str = "fp32"
    micro_batch: int = 4
    seq_len: int = 256
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, not {self.projection!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3 (3: FSDP2), not {self.zero_stage}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, not {self.dtype!r}")
        if self.world_size < 1 or self.micro_batch < 1 or self.seq_len < 1:
            raise ValueError("world_size, micro_batch and seq_len must be >= 1")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], not {self.density}")
        if self.inactive not in ("none", "sign"):
            raise ValueError(f"inactive must be none or sign, not {self.inactive!r}")
        if self.mode == "adamw" and (self.eight_bit or self.projection != "none"):  # (None: not asked for)
            raise ValueError("adamw (torch.optim.AdamW) has no 8-bit or projected states; "
                             "use --mode block/galore/gradnorm_lorp")

    def effective(self) -> "Setup":
        """What the trainer runs for this setup: the dense low-rank modes with every block selected,
        nothing frozen, density 1 and fp32 moments (as published); the block mode's moments 8-bit
        or not as asked, else OptimConfig's default."""
        s = Setup(**self.__dict__)
        if s.mode in ("galore", "gradnorm_lorp"):
            s.projection, s.frozen_patterns, s.density = s.mode, (), 1.0
            s.always_train, s.inactive, s.eight_bit = (), "none", False
        elif s.eight_bit is None:
            s.eight_bit = OPTIM_DEFAULTS.eight_bit if s.mode == "block" else False
        return s

    def precision(self) -> str:
        """How weights and activations are stored: fp32, or bf16 (DeepSpeed bf16 for adamw; the
        block optimizer's bf16 weights with fp32 masters of its selected blocks; FSDP2's
        param_dtype at stage 3). ("autocast", fp32 weights with bf16 compute, is what a dense
        optimizer gets from SingleEngine; activation_bytes still models it.)"""
        return "fp32" if self.dtype == "fp32" else "bf16"


@dataclass
class Estimate:
    spec: ModelSpec
    setup: Setup
    mean: dict[str, int]             # per-rank bytes, mean over ranks
    max: dict[str, int]              # bytes on the most loaded rank (block: worst-case bound); its
                                     # components are that rank's, so they add up to its total
    breakdown: dict[str, int]        # finer parts (largest rank)
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        s = self.setup
        return {
            "model": {"name": self.spec.name, "n_params": self.spec.n_params,
                      "n_tensors": self.spec.n_tensors, "hidden_size": self.spec.hidden_size,
                      "intermediate_size": self.spec.intermediate_size, "num_heads": self.spec.num_heads,
                      "num_layers": self.spec.num_layers, "vocab_size": self.spec.vocab_size,
                      "largest_layer_params": self.spec.layer_params()},
            "setup": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()},
                      "activation_precision": s.precision()},
            "per_rank_bytes": {k: {"mean": self.mean[k], "max": self.max[k]} for k in (*COMPONENTS, "total")},
            "per_rank_gib": {k: {"mean": self.mean[k] / GIB, "max": self.max[k] / GIB}
                             for k in (*COMPONENTS, "total")},
            "breakdown_bytes": dict(self.breakdown),
            "info": dict(self.info),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        s, spec = self.setup, self.spec
        mode = s.mode
        if s.mode != "adamw":
            mode += f" projection={s.projection}" if s.mode == "block" else ""
            mode += f" density={s.density:g}" if s.mode == "block" else ""
            mode += f" rank={s.rank}" if s.projection != "none" or s.mode != "block" else ""
            mode += f" moments={'8-bit' if s.eight_bit else 'fp32'}"
        backend = "FSDP2 (ZeRO-3)" if s.zero_stage == 3 else f"ZeRO stage {s.zero_stage}"
        lines = [
            "Estimated memory per rank (weights, gradients, optimizer states, projections, activations) for a:",
            f"HW: Setup with {s.world_size} rank{'s' if s.world_size > 1 else ''} (data parallel).",
            f"SW: Model {spec.name} with {spec.n_params / 1e6:.0f}M total params, "
            f"{spec.layer_params() / 1e6:.0f}M largest layer params, vocab {spec.vocab_size}.",
            f"    {mode}; {backend}; {s.dtype} (activations: {s.precision()}); micro-batch {s.micro_batch} x "
            f"seq_len {s.seq_len}; activation checkpointing {'on' if s.activation_checkpointing else 'off'}",
            f"  {'per rank':<17}|{'bytes (mean)':>16} |{'GiB (mean)':>11} |{'bytes (max rank)':>17} |"
            f"{'GiB (max rank)':>15}",
        ]
        for k in (*COMPONENTS, "total"):
            label = k.replace("_", " ")
            lines.append(f"  {label:<17}|{self.mean[k]:>16,d} |{self.mean[k] / GIB:>11.2f} |"
                         f"{self.max[k]:>17,d} |{self.max[k] / GIB:>15.2f}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

def _ceil(x: float) -> int:
    return int(math.ceil(x))


def _sizes(spec: ModelSpec, s: Setup) -> tuple[int, int, int, int]:
    """World size, parameters, bytes per weight/gradient value held by the model, bytes per value
    of FSDP2's unsharded (gathered) copies."""
    low = 2 if s.precision() == "bf16" else 4
    gathered = 2 if s.dtype == "bf16" else 4
    return s.world_size, spec.n_params, low, gathered


def _adamw_parts(spec: ModelSpec, s: Setup, bd: dict, info: dict, notes: list, mean: dict, mx: dict) -> None:
    """Gradients and optimizer states of torch.optim.AdamW under DeepSpeed ZeRO 0/1/2 or FSDP2."""
    W, P, low, gathered = _sizes(spec, s)
    ceil = _ceil
    stage = s.zero_stage
    shard = W if stage >= 1 else 1
    moments = ceil(8 * P / shard)
    steps = STEP_TENSOR_BYTES * (1 if stage in (1, 2) else spec.n_tensors)
    master = 0
    if stage in (1, 2):
        master = ceil(4 * P / W)
        notes.append("DeepSpeed ZeRO-1/2 keeps an fp32 master copy of its partition (4 B/param / W), "
                     "also with fp32 weights")
    elif stage == 0 and s.dtype == "bf16":
        master = 4 * P
        notes.append("DeepSpeed bf16 at stage 0: fp32 master weights (4 B/param) + fp32 gradients at step")
    bd.update(optimizer_moments=moments, optimizer_step_tensors=steps, optimizer_master_weights=master)
    if stage == 0:
        grads = P * low + (4 * P if s.dtype == "bf16" else 0)
    elif stage == 1:
        grads = P * low + (ceil(4 * P / W) if s.dtype == "bf16" else 0)
    elif stage == 2:
        grads = ceil(P * low / W) + (ceil(4 * P / W) if s.dtype == "bf16" else 0)
    else:
        grads = ceil(4 * P / W) + (spec.root_params() + spec.layer_params()) * gathered
        notes.append("FSDP2 gradients: fp32 shards + unsharded gradients of the root and one layer")
    if s.dtype == "bf16" and stage in (1, 2):
        notes.append("DeepSpeed bf16 ZeRO-1/2: + an fp32 copy of the rank's gradient partition at step")
    bd["gradients"] = grads
    states = moments + steps + master
    mean.update(gradients=grads, optimizer_states=states, projections=0)
    mx.update(mean)


def _block_parts(spec: ModelSpec, s: Setup, bd: dict, info: dict, notes: list, mean: dict, mx: dict) -> None:
    """Gradients and optimizer states of the block optimizer (and the dense low-rank modes):
    exact for the dense modes, the budget's worst case for `block`."""
    W, _, low, _ = _sizes(spec, s)
    ceil = _ceil
    shapes = dict(spec.named_shapes)
    always_b = always_blocks(spec.named_shapes, tuple(s.always_train))
    always = block_shapes(always_b, spec.named_shapes)
    always_names = {b.param for b in always_b}
    blocks, budget = partition_blocks([(n, shape) for n, shape in spec.named_shapes if n not in always_names],
                                      tuple(s.frozen_patterns), s.density, s.max_block_fraction)
    masters = s.dtype == "bf16" and s.zero_stage != 3  # bf16 weights + fp32 masters (engines.py)
    if masters:
        notes.append("block optimizer in bf16: bf16 weights; fp32 masters of the selected blocks on their "
                     "owners (in optimizer states); fp32 gradient accumulators")
    rule = dict(projection=s.projection, rank=s.rank, eight_bit=s.eight_bit,
                proj_patterns=tuple(s.proj_patterns), master=masters)
    named = block_shapes(blocks, spec.named_shapes)
    candidates = sum(b.numel for b in blocks)
    always_params = sum(b.numel for b in always_b)
    info.update(budget_params=budget, candidate_params=candidates, n_blocks=len(blocks),
                largest_block_params=max(b.numel for b in blocks), always_params=always_params)
    always_items = []  # (params, state parts) of each always-trained tensor: held all the time
    for b, (_, shape) in zip(always_b, always):
        parts = block_state_bytes(b.param, shape, **rule)
        parts["total"] = sum(parts.values())
        always_items.append((b.numel, parts, b, shape))
    always_total = {k: sum(p[k] for _, p, _, _ in always_items) for k in ("moments", "projection",
                                                                           "magnitude", "master", "total")}
    info["always_state_bytes"] = always_total["total"]
    if s.mode != "block":  # dense galore / gradnorm_lorp: every block, exact
        per_rank = selected_state_bytes(named, world_size=W, zero_stage=s.zero_stage,
                                        param_shapes=shapes, **rule)
        info.update(selected_params=candidates)
        for key, part in (("optimizer_states", ("moments", "magnitude", "master")), ("projections", ("projection",))):
            vals = [sum(r[k] for k in part) for r in per_rank]
            mean[key] = ceil(sum(vals) / W)
            big = max(range(W), key=lambda i: per_rank[i]["total"])
            mx[key] = vals[big]
        notes.append("dense low-rank mode: every block selected, its state on its owner (exact)")
    else:
        fits = [b for b in blocks if b.numel <= budget]
        cap = budget if fits else max(b.numel for b in blocks)  # the selector's one-block fallback
        items = []
        for b, (_, shape) in zip(blocks, named):
            parts = block_state_bytes(b.param, shape, **rule)
            parts["total"] = sum(parts.values())
            items.append((b.numel, parts, b, shape))
        chosen = fractional_knapsack([(c, p) for c, p, _, _ in items], cap)
        total = {k: chosen.get(k, 0) + always_total[k] for k in always_total}
        largest = max([b.numel for b in (fits or blocks)] + [c for c, _, _, _ in always_items])
        info.update(selected_params_worst=cap)
        layout = block_layout(W, s.zero_stage, s.projection, shapes)
        if layout.fsdp_rows and W > 1:
            # every rank: its rows of every selected block; rank 0's are the largest
            shard_items = []
            for c, _, b, shape in items:
                local = layout.rows_of_rank(b, 0)
                parts = block_state_bytes(b.param, (local, *shape[1:]), block_numel=b.numel, **rule) if local else \
                    {"moments": 0, "projection": 0, "magnitude": 0, "master": 0}
                parts["total"] = sum(parts.values())
                shard_items.append((c, parts))
            worst = fractional_knapsack(shard_items, cap)
            for c, _, b, shape in always_items:  # rank 0's rows of each, always held
                local = layout.rows_of_rank(b, 0)
                for k, v in (block_state_bytes(b.param, (local, *shape[1:]), **rule) if local else {}).items():
                    worst[k] = worst.get(k, 0) + v
            avg = {k: v / W for k, v in total.items()}
        elif s.zero_stage == 0 or W == 1:
            worst, avg = total, total
        else:  # owner_map is largest-first onto the least-loaded rank: a rank's load is at most
            # (selected - last block) / W + last block <= budget / W + largest (1 - 1/W)
            # (the always-trained tensors count in that load like any block)
            load = cap + always_params
            rank_cap = min(load, load / W + largest * (1 - 1 / W))
            worst = fractional_knapsack([(c, p) for c, p, _, _ in items + always_items], rank_cap)
            avg = {k: v / W for k, v in total.items()}
        for col, d in ((mean, avg), (mx, worst)):
            col["optimizer_states"] = ceil(d.get("moments", 0) + d.get("magnitude", 0) + d.get("master", 0))
            col["projections"] = ceil(d.get("projection", 0))
        info.update(state_bytes_total_worst=ceil(total.get("total", 0)))
        notes.append("block: selection depends on gradients; states are the worst case the budget "
                     f"({budget:,} params) allows; 'max' bounds the most loaded rank (owner_map)")
    # gradients: fp32 (with bf16 weights: fp32 accumulators, each bf16 gradient freed as it is
    # added), whole tensors of the selected blocks, on every rank until step() (stage 2 drops
    # non-owned ones only after the reduce)
    by_param: dict[str, int] = {}
    for b in blocks:
        by_param[b.param] = min(by_param.get(b.param, b.numel), b.numel)
    if s.mode == "block":
        fits_p = [(c, {"total": float(math.prod(shapes[p]))}) for p, c in by_param.items()]
        cap = budget if any(c <= budget for c, _ in fits_p) else max(c for c, _ in fits_p)
        grad_params = fractional_knapsack(fits_p, cap).get("total", 0.0)
    else:
        grad_params = sum(math.prod(shapes[p]) for p in by_param)
    grad_params += always_params  # fp32 (accumulators with bf16 weights), like a selected block
    info["gradient_params_worst"] = ceil(grad_params)
    grad_bytes = 4 * grad_params
    if s.inactive == "sign":  # every candidate has a gradient: the model's dtype for the rest
        rest = sum(math.prod(shapes[p]) for p in by_param) - (grad_params - always_params)
        grad_bytes += low * rest
        notes.append("inactive=sign: every candidate tensor has a gradient until step() (the model's "
                     "dtype; fp32 accumulators for the Adam-trained ones); the sign step's buffers "
                     f"are one {BUCKET_MIB} MiB bucket at a time")
    grads = ceil(grad_bytes / W) if s.zero_stage == 3 else ceil(grad_bytes)
    bd["gradients"] = grads
    mean["gradients"] = mx["gradients"] = grads
    bd.update(optimizer_states=mx["optimizer_states"], projections=mx["projections"])
    notes.append("block optimizer 'step' counters are Python floats (0 tensor bytes)")


def estimate(spec: ModelSpec, setup: Setup) -> Estimate:
    setup.validate()
    s = setup.effective()
    W, P, low, gathered = _sizes(spec, s)
    ceil = _ceil
    precision = s.precision()
    bd: dict[str, int] = {}
    info: dict = {}
    notes: list[str] = []

    # weights
    if s.zero_stage == 3:
        bd["weights_shard"] = ceil(P * 4 / W)
        bd["weights_gathered"] = (spec.root_params() + 2 * spec.layer_params()) * gathered
        notes.append("FSDP2: fp32 shards + gathered copies of the root (embedding, final norm, head; kept "
                     "through backward) and of two decoder layers (current + prefetched)")
    else:
        bd["weights_model"] = P * low
    weights = sum(v for k, v in bd.items() if k.startswith("weights"))

    act = activation_bytes(spec, s.micro_batch, s.seq_len, precision, s.activation_checkpointing)
    bd.update({f"activations_{k}": v for k, v in act.items() if k != "total"})

    mean, mx = {}, {}
    if s.mode == "adamw":
        _adamw_parts(spec, s, bd, info, notes, mean, mx)
    else:
        _block_parts(spec, s, bd, info, notes, mean, mx)
    mean["weights"] = mx["weights"] = weights
    mean["activations"] = mx["activations"] = act["total"]
    for col in (mean, mx):
        col["total"] = sum(col[k] for k in COMPONENTS)
    if s.activation_checkpointing:
        notes.append("activations: layer inputs kept + one layer recomputed in backward")
    notes.append("activations: sdpa attention, saved tensors per micro-batch + 8V B/token loss transient; "
                 "not counted: communication buckets, allocator fragmentation, CUDA context")
    return Estimate(spec, s, mean, mx, bd, info, notes)
