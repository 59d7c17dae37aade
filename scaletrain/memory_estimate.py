"""Per-rank memory estimate for a scaletrain run, in the style of DeepSpeed's
`estimate_zero2_model_states_mem_needs`: weights, gradients, optimizer states, projection
matrices and activations, in bytes and GiB.

    scaletrain-estimate-memory --preset llama_7b --world-size 8 --mode block --density 0.05
    python tools/estimate_memory.py --hf-config path/to/config.json --mode adamw --zero-stage 2 --json

The model's parameter shapes are exact: the transformers model is built on the meta device (no
memory), from a preset (`scaletrain.models.llama`) or a LlamaConfig JSON. The optimizer parts follow
the optimizers' own layouts (scaletrain.optim.layout, update_rules, quant8; torch.optim.AdamW;
DeepSpeed ZeRO-1/2 partitions; FSDP2 shards), and tests/test_memory_estimate.py checks them
against the tensors the optimizers really allocate. Weights, gradients and activations are stated
approximations (see `activation_bytes_per_token` and the notes each estimate prints).

Modes:
  adamw          torch.optim.AdamW on every parameter, under DeepSpeed ZeRO stage 0/1/2, or FSDP2
                 (stage 3: parameters, gradients and states sharded)
  block          scaletrain's BlockOptimizer: `density` of the candidate parameters selected,
                 optionally with a GaLore / GradNormLoRP projection and 8-bit moments inside blocks
  galore, gradnorm_lorp
                 the dense low-rank methods: every block selected, nothing frozen, density 1
Which blocks a selection picks depends on gradients, so for `block` the estimate is the worst
case allowed by the budget; `selected_state_bytes` gives the exact figure for a known selection.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from scaletrain.config import OptimConfig
from scaletrain.optim.comm import BUCKET_BYTES
from scaletrain.optim.layout import BlockLayout, fsdp_row_shards
from scaletrain.optim.selection import Block, always_blocks, partition_blocks

GIB = 2**30
DEFAULT_VOCAB = 8192  # the shipped default tokenizer (c4-sample-8192.model); the trainer uses its size
MODES = ("adamw", "block", "galore", "gradnorm_lorp")
PROJECTIONS = ("none", "galore", "gradnorm_lorp")
COMPONENTS = ("weights", "gradients", "optimizer_states", "projections", "activations")
BUCKET_MIB = BUCKET_BYTES // 2**20  # the block optimizer's communication bucket
STEP_TENSOR_BYTES = 4  # torch.optim.AdamW's 'step': a float32 scalar tensor per parameter tensor


# ---------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelSpec:
    """Parameter names and shapes (as `model.named_parameters()` lists them) and the sizes the
    activation formula needs."""
    name: str
    named_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    vocab_size: int

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.named_shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.named_shapes)

    def layer_params(self) -> int:
        """Parameters of the largest decoder layer (the unit FSDP2 gathers)."""
        per_layer: dict[str, int] = {}
        for name, shape in self.named_shapes:
            parts = name.split(".")
            if "layers" in parts:
                key = ".".join(parts[: parts.index("layers") + 2])
                per_layer[key] = per_layer.get(key, 0) + math.prod(shape)
        return max(per_layer.values(), default=0)

    def root_params(self) -> int:
        """Parameters outside the decoder layers (embedding, final norm, head): FSDP2's root unit."""
        return sum(math.prod(s) for n, s in self.named_shapes if "layers" not in n.split("."))

    def matmul_params(self) -> int:
        """2-D weights used by nn.Linear (all but the embedding): autocast keeps a bf16 copy each."""
        return sum(math.prod(s) for n, s in self.named_shapes if len(s) == 2 and "embed_tokens" not in n)


def model_spec(preset: str | None = None, hf_config: str | Path | None = None,
               vocab_size: int | None = None) -> ModelSpec:
    """Shapes of the model the trainer builds for `preset` (vocabulary: `vocab_size`, default the
    shipped tokenizer's 8192), or of a transformers LlamaConfig JSON (a file or a directory holding
    config.json; its own vocabulary unless `vocab_size` is given). Built on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (preset is None) == (hf_config is None):
        raise ValueError("give exactly one of preset or hf_config")
    if preset is not None:
        from scaletrain.models.llama import llama_config

        config = llama_config(preset, vocab_size or DEFAULT_VOCAB)
        name = preset
    else:
        path = Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        config = LlamaConfig.from_json_file(str(path))
        if vocab_size:
            config.vocab_size = vocab_size
        name = str(hf_config)
    config.use_cache = False
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return ModelSpec(name, shapes, config.hidden_size, config.intermediate_size,
                     config.num_attention_heads, config.num_hidden_layers, config.vocab_size)


# ------------------------------------------------------------------------------- optimizer state
def moment_bytes(numel: int, eight_bit: bool = False, dtype_bytes: int = 4) -> int:
    """One Adam moment tensor: fp32, or with 8-bit (quant8) and numel >= quant8.MIN_NUMEL one
    uint8 code per value + one fp32 absmax per quant8.CHUNK values."""
    from scaletrain.optim import quant8

    if eight_bit and numel >= quant8.MIN_NUMEL:
        return numel + 4 * math.ceil(numel / quant8.CHUNK)
    return numel * dtype_bytes


def block_state_bytes(param: str, shape: Sequence[int], *, projection: str = "none", rank: int = 128,
                      eight_bit: bool = False, proj_patterns: Sequence[str] = ("attn", "mlp"),
                      master: bool = False, dtype_bytes: int = 4) -> dict[str, int]:
    """State bytes the block optimizer's update rule keeps for one block of `shape` (a parameter,
    or a row chunk of it, or an FSDP row shard) of parameter `param`, by asking the rule itself:
    its `new_state` for such a block, allocated on the meta device (no memory). By key:
      moments      exp_avg + exp_avg_sq (projected shape when projected; 8-bit codes + absmax where
                   quant8 applies)
      projection   the GaLore basis, projected blocks only
      magnitude    gradnorm_lorp: moments of the per-row magnitudes (mag_exp_avg, mag_exp_avg_sq)
      master       bf16 runs (DeepSpeed/single): the block's fp32 master copy, 4 bytes a value
                   (BlockOptimizer keeps it next to the rule's state)
    The per-block 'step' (and 'proj_stale') are Python floats, not tensors: 0 bytes."""
    import torch

    from scaletrain.optim.update_rules import build_rule

    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, not {projection!r}")
    shape = tuple(shape)
    # update_proj_gap, proj_scale and svd change the arithmetic, not the state's layout
    rule = build_rule(projection, rank=rank, update_proj_gap=1, proj_scale=1.0, svd="full",
                      proj_patterns=tuple(proj_patterns), eight_bit=eight_bit)
    dtype = {4: torch.float32, 2: torch.bfloat16}[dtype_bytes]
    with torch.device("meta"):
        state = rule.new_state(Block(param, param, None, math.prod(shape)), torch.empty(shape, dtype=dtype))
    out = {"moments": 0, "projection": 0, "magnitude": 0, "master": 4 * math.prod(shape) if master else 0}
    for key, value in state.items():
        if torch.is_tensor(value):
            kind = "projection" if key == "proj" else "magnitude" if key.startswith("mag_") else "moments"
            out[kind] += value.numel() * value.element_size()
    return out


def _parse_block(name: str) -> tuple[str, tuple[int, int] | None]:
    """('param', rows) from a block name 'param' or 'param[rows a:b]' (partition_blocks' naming)."""
    if name.endswith("]") and "[rows " in name:
        param, rows = name[:-1].split("[rows ")
        a, b = rows.split(":")
        return param, (int(a), int(b))
    return name, None


def block_layout(world_size: int, zero_stage: int, projection: str, eight_bit: bool,
                 param_shapes: dict[str, Sequence[int]] | None = None) -> BlockLayout:
    """The block optimizer's layout (scaletrain.optim.layout) for a hypothetical run, seen from
    rank 0: stage 3 is FSDP2, where plain fp32 Adam keeps row shards of every block's state on
    every rank and a projected or 8-bit state lives on its owner."""
    fsdp = zero_stage >= 3
    rows = {p: s[0] for p, s in (param_shapes or {}).items()}
    return BlockLayout(rows, fsdp=fsdp, fsdp_rows=fsdp_row_shards(fsdp, projection, eight_bit),
                       zero_stage=zero_stage, world_size=world_size, rank=0)


def selected_state_bytes(selected: Iterable[tuple[str, Sequence[int]]], *, world_size: int = 1,
                         zero_stage: int = 2, projection: str = "none", rank: int = 128,
                         eight_bit: bool = False, proj_patterns: Sequence[str] = ("attn", "mlp"),
                         master: bool = False,
                         param_shapes: dict[str, Sequence[int]] | None = None) -> list[dict[str, int]]:
    """Exact optimizer-state bytes on each rank for a known selection.

    selected: (block name, block shape) pairs, e.g. [(n, shape of block n) for n in opt.selected];
    a row chunk is named 'param[rows a:b]' and has shape (b - a, n). Ownership as the block
    optimizer realises the ZeRO stage: 0 (or one rank): every rank holds every block; 1, 2: each
    block on its owner (selection.owner_map); 3 (FSDP2): with plain fp32 Adam every rank holds its
    Shard(0) rows of every block (param_shapes, the full parameter shapes, is needed then); with a
    projection or 8-bit moments each whole block's state is on its owner, as at stage 2.
    master: bf16 weights, so each held block also has its fp32 master (not at stage 3).
    Returns, per rank, a dict with 'moments', 'projection', 'magnitude', 'master' and 'total'."""
    items = [(name, tuple(shape)) for name, shape in selected]
    if master and zero_stage >= 3:
        raise ValueError("FSDP2 (zero_stage 3) keeps fp32 shards: no master copies")
    rule = dict(projection=projection, rank=rank, eight_bit=eight_bit, proj_patterns=tuple(proj_patterns),
                master=master)
    per_rank = [{"moments": 0, "projection": 0, "magnitude": 0, "master": 0} for _ in range(world_size)]
    layout = block_layout(world_size, zero_stage, projection, eight_bit, param_shapes)
    row_shards = layout.fsdp_rows and world_size > 1  # (one rank holds every row: whole blocks)
    if row_shards and param_shapes is None:
        raise ValueError("zero_stage 3 (FSDP2 row shards) needs param_shapes")
    blocks = [Block(name, *_parse_block(name), math.prod(shape)) for name, shape in items]
    layout.assign(blocks)
    for b, (_, shape) in zip(blocks, items):
        for r in range(world_size):
            if not layout.holds(b.name, r):
                continue
            local = layout.rows_of_rank(b, r) if row_shards else None
            if local == 0:
                continue  # FSDP2: the block has no rows on this rank
            parts = block_state_bytes(b.param, shape if local is None else (local, *shape[1:]), **rule)
            for k, v in parts.items():
                per_rank[r][k] += v
    for d in per_rank:
        d["total"] = d["moments"] + d["projection"] + d["magnitude"] + d["master"]
    return per_rank


def block_shapes(blocks, named_shapes: Iterable[tuple[str, Sequence[int]]]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of partition_blocks' Block objects, for selected_state_bytes."""
    shapes = {n: tuple(s) for n, s in named_shapes}
    out = []
    for b in blocks:
        full = shapes[b.param]
        out.append((b.name, full if b.rows is None else (b.rows[1] - b.rows[0], *full[1:])))
    return out


def _fractional_knapsack(items: list[tuple[int, dict[str, float]]], capacity: float) -> dict[str, float]:
    """Largest sum of values (per key, by 'total') of items (cost, values) with total cost <=
    capacity when items may be taken fractionally: an upper bound for whole items."""
    out: dict[str, float] = {}
    left = capacity
    for cost, values in sorted(items, key=lambda it: -it[1]["total"] / max(it[0], 1)):
        if left <= 0:
            break
        frac = min(1.0, left / cost) if cost else 1.0
        for k, v in values.items():
            out[k] = out.get(k, 0.0) + frac * v
        left -= frac * cost
    return out


# ---------------------------------------------------------------------------------- activations
def activation_bytes_per_token(hidden: int, intermediate: int, heads: int, precision: str) -> int:
    """Bytes autograd saves per token per decoder layer of a transformers Llama (sdpa attention,
    RMSNorm, SwiGLU), counted tensor by tensor and checked against a saved-tensors hook in the tests
    (h = hidden, i = intermediate, a = heads):
      fp32      40h + 16i + 4a + 8   per norm: input, normalised, output (3 x 4h); sdpa: q, k, v,
                                     out (4 x 4h); MLP: gate, silu(gate), up, product (4 x 4i);
                                     2 rsqrt (8) and the attention log-sum-exp (4a)
      autocast  34h +  8i + 4a + 8   weights fp32, compute bf16 (SingleEngine's dense bf16): norms
                                     fp32 input + normalised (2 x 8h); bf16 input casts for q, k, v,
                                     gate, up (5 x 2h); sdpa q, k, v, out bf16 (4 x 2h); MLP 4 x 2i
      bf16      24h +  8i + 4a + 8   bf16 weights (DeepSpeed bf16, FSDP2 param_dtype): norms: fp32
                                     upcast input 4h + bf16 normalised and output (2 x 2h), twice;
                                     sdpa 4 x 2h; MLP 4 x 2i
    Grouped-query attention saves no more (k, v are smaller): these figures are an upper bound
    there. Eager attention (not the default) would add the a x seq_len fp32 probabilities."""
    h, i, a = hidden, intermediate, heads
    coef = {"fp32": (40, 16), "autocast": (34, 8), "bf16": (24, 8)}[precision]
    return coef[0] * h + coef[1] * i + 4 * a + 8


def head_activation_bytes_per_token(hidden: int, vocab: int, precision: str) -> int:
    """Saved bytes per token outside the decoder layers: input ids and targets (int64, 8 + 8),
    final norm (fp32: 12h; autocast: 10h; bf16: 8h) + its rsqrt (4), and the fp32 log-softmax of
    the logits the loss keeps (4V). (RoPE's cos/sin add 2 x head_dim per position, not per token.)"""
    return {"fp32": 12, "autocast": 10, "bf16": 8}[precision] * hidden + 4 * vocab + 20


def activation_bytes(spec: ModelSpec, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: bool) -> dict[str, int]:
    """Activation memory of one micro-batch at its peak (end of forward / start of backward).

    Without checkpointing: layers x tokens x activation_bytes_per_token + the head's saved tensors
    + a transient 8V bytes per token at the loss (the fp32 gradients of the log-softmax and its
    input exist together at the start of backward). With checkpointing (transformers'
    per-decoder-layer, non-reentrant): only each layer's input is kept (the residual stream: 4h
    bytes per token, 2h in bf16), plus one layer's full activations while it is recomputed in
    backward, plus the head. Gradient accumulation does not add: micro-batches run one at a time.
    Not counted: temporaries inside one op (e.g. the attention kernel's workspace), allocator
    fragmentation, CUDA context."""
    tokens = micro_batch * seq_len
    h, v = spec.hidden_size, spec.vocab_size
    layer = tokens * activation_bytes_per_token(h, spec.intermediate_size, spec.num_heads, precision)
    head = tokens * head_activation_bytes_per_token(h, v, precision)
    loss_transient = tokens * 8 * v
    rope = 2 * seq_len * (h // spec.num_heads) * (2 if precision == "bf16" else 4)
    if checkpointing:
        kept = spec.num_layers * tokens * h * (2 if precision == "bf16" else 4)
        layers = kept + layer
    else:
        layers = spec.num_layers * layer
    return {"layers": layers, "head": head + rope, "loss_transient": loss_transient,
            "total": layers + head + rope + loss_transient}


# ------------------------------------------------------------------------------------- estimate
_OPTIM = OptimConfig()


@dataclass
class Setup:
    mode: str = "adamw"
    world_size: int = 1
    zero_stage: int = 2
    density: float = 0.05
    projection: str = "none"
    rank: int = 128
    eight_bit: bool = False
    # the block optimizer's kinds of parameters; defaults are the trainer's (OptimConfig)
    frozen_patterns: tuple[str, ...] = tuple(_OPTIM.frozen_patterns)
    always_train: tuple[str, ...] = tuple(_OPTIM.always_train)
    inactive: str = _OPTIM.inactive
    proj_patterns: tuple[str, ...] = tuple(_OPTIM.proj_patterns)
    max_block_fraction: float = _OPTIM.max_block_fraction
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
        if self.mode == "adamw" and (self.eight_bit or self.projection != "none"):
            raise ValueError("adamw (torch.optim.AdamW) has no 8-bit or projected states; "
                             "use --mode block/galore/gradnorm_lorp")

    def effective(self) -> "Setup":
        """The dense low-rank modes: every block selected, nothing frozen, density 1."""
        s = Setup(**self.__dict__)
        if s.mode in ("galore", "gradnorm_lorp"):
            s.projection, s.frozen_patterns, s.density = s.mode, (), 1.0
            s.always_train, s.inactive = (), "none"
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


def estimate(spec: ModelSpec, setup: Setup) -> Estimate:
    setup.validate()
    s = setup.effective()
    W, P = s.world_size, spec.n_params
    ceil = lambda x: int(math.ceil(x))  # noqa: E731
    precision = s.precision()
    low = 2 if precision == "bf16" else 4          # bytes per weight/gradient value held by the model
    gathered = 2 if s.dtype == "bf16" else 4       # FSDP2's unsharded (gathered) copies
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
    else:
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
            chosen = _fractional_knapsack([(c, p) for c, p, _, _ in items], cap)
            total = {k: chosen.get(k, 0) + always_total[k] for k in always_total}
            largest = max([b.numel for b in (fits or blocks)] + [c for c, _, _, _ in always_items])
            info.update(selected_params_worst=cap)
            layout = block_layout(W, s.zero_stage, s.projection, s.eight_bit, shapes)
            if layout.fsdp_rows and W > 1:
                # every rank: its rows of every selected block; rank 0's are the largest
                shard_items = []
                for c, _, b, shape in items:
                    local = layout.rows_of_rank(b, 0)
                    parts = block_state_bytes(b.param, (local, *shape[1:]), **rule) if local else \
                        {"moments": 0, "projection": 0, "magnitude": 0, "master": 0}
                    parts["total"] = sum(parts.values())
                    shard_items.append((c, parts))
                worst = _fractional_knapsack(shard_items, cap)
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
                worst = _fractional_knapsack([(c, p) for c, p, _, _ in items + always_items], rank_cap)
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
            grad_params = _fractional_knapsack(fits_p, cap).get("total", 0.0)
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
    mean["weights"] = mx["weights"] = weights
    mean["activations"] = mx["activations"] = act["total"]
    for col in (mean, mx):
        col["total"] = sum(col[k] for k in COMPONENTS)
    if s.activation_checkpointing:
        notes.append("activations: layer inputs kept + one layer recomputed in backward")
    notes.append("activations: sdpa attention, saved tensors per micro-batch + 8V B/token loss transient; "
                 "not counted: communication buckets, allocator fragmentation, CUDA context")
    return Estimate(spec, s, mean, mx, bd, info, notes)


# ------------------------------------------------------------------------------------------ CLI
def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scaletrain-estimate-memory",
        description="Per-rank memory (weights, gradients, optimizer states, projections, activations) "
                    "of a scaletrain run, in the style of DeepSpeed's estimate_zero2_model_states_mem_needs.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset (scaletrain.models.llama.PRESETS), e.g. llama_60m")
    src.add_argument("--hf-config", "--hf_config", dest="hf_config",
                     help="a transformers LlamaConfig JSON (file, or directory with config.json)")
    p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=None,
                   help=f"vocabulary (default: presets {DEFAULT_VOCAB}, the shipped tokenizer's, which the "
                        "trainer uses; hf-config: its own)")
    p.add_argument("--world-size", "--world_size", dest="world_size", type=int, default=1)
    p.add_argument("--mode", "--optim", dest="mode", choices=MODES, default="adamw")
    p.add_argument("--projection", choices=PROJECTIONS, default="none",
                   help="block: low-rank states inside selected blocks")
    p.add_argument("--density", type=float, default=0.05, help="block: fraction of candidate params selected")
    p.add_argument("--rank", type=int, default=128, help="galore/gradnorm_lorp projection rank")
    p.add_argument("--eight-bit", "--eight_bit", dest="eight_bit", action="store_true",
                   help="8-bit Adam moments (block optimizer)")
    p.add_argument("--zero-stage", "--zero_stage", dest="zero_stage", type=int, choices=(0, 1, 2, 3), default=2,
                   help="adamw: DeepSpeed ZeRO stage (3: FSDP2); block: the stage the optimizer realises "
                        "per block (3: FSDP2 row shards). Default 2")
    p.add_argument("--micro-batch", "--micro_batch", dest="micro_batch", type=int, default=4)
    p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=256)
    p.add_argument("--activation-checkpointing", "--activation_checkpointing", dest="activation_checkpointing",
                   action="store_true")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 as the ds_config's bf16.enabled")
    p.add_argument("--frozen-patterns", "--frozen_patterns", dest="frozen_patterns",
                   default=",".join(_OPTIM.frozen_patterns),
                   help="block: comma-separated name substrings never trained ('' for none)")
    p.add_argument("--always-train", "--always_train", dest="always_train", default=",".join(_OPTIM.always_train),
                   help="block: comma-separated name substrings trained every step with Adam ('' for none)")
    p.add_argument("--inactive", choices=("none", "sign"), default=_OPTIM.inactive,
                   help="block: what the unselected blocks do (sign: they hold gradients too)")
    p.add_argument("--proj-patterns", "--proj_patterns", dest="proj_patterns", default="attn,mlp",
                   help="galore/gradnorm_lorp: comma-separated name substrings of projected weights")
    p.add_argument("--max-block-fraction", "--max_block_fraction", dest="max_block_fraction", type=float,
                   default=0.5)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print JSON (to stdout, or to PATH) instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup = Setup(mode=args.mode, world_size=args.world_size, zero_stage=args.zero_stage,
                      density=args.density, projection=args.projection, rank=args.rank,
                      eight_bit=args.eight_bit, frozen_patterns=_patterns(args.frozen_patterns),
                      always_train=_patterns(args.always_train), inactive=args.inactive,
                      proj_patterns=_patterns(args.proj_patterns), max_block_fraction=args.max_block_fraction,
                      dtype=args.dtype, micro_batch=args.micro_batch, seq_len=args.seq_len,
                      activation_checkpointing=args.activation_checkpointing)
        setup.validate()  # before building the model: bad flags fail fast
        est = estimate(model_spec(args.preset, args.hf_config, args.vocab_size), setup)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json is None:
        print(est.table())
    else:
        text = json.dumps(est.to_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(est.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
