"""Model and optimizer state by parameter name: this rank's part for a save (DCP keys "model/..."
and "optim/..."), and restoring it into a model and optimizer of any world size or backend."""
from __future__ import annotations

import torch

from scaletrain.checkpoint.files import CheckpointError
from scaletrain.checkpoint.load import SavedState


def _resharded(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 leaves the root module's parameters unsharded after a no-grad forward (evaluation):
    reshard them so that the parameters are the sharded DTensors the optimizer knows."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def model_shard(model: torch.nn.Module) -> dict:
    """This rank's weights for DCP: the parameters themselves (replicated: DCP writes each once)
    or, under FSDP2, this rank's DTensor shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {f"model/{k}": v for k, v in get_model_state_dict(_resharded(model)).items()}


def restore_model(model: torch.nn.Module, saved: SavedState) -> None:
    """Read the weights this rank holds (its shards under FSDP2) straight into the model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    current = get_model_state_dict(_resharded(model))
    got = saved.read({f"model/{k}": v for k, v in current.items()})
    set_model_state_dict(model, {k: got[f"model/{k}"] for k in current})


def _flatten(prefix: str, tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(f"{prefix}{k}/", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def optimizer_shard(optimizer, model: torch.nn.Module) -> tuple[dict, dict]:
    """(this rank's optimizer tensors for DCP under "optim/", global metadata for trainer.pt).

    The block optimizer gives the blocks it owns (`checkpoint_blocks`); other name-keyed
    optimizers (galore_torch) hold replicated state, which DCP writes once. A dense torch
    optimizer's state comes from torch.distributed.checkpoint's state-dict API, keyed by
    parameter name: replicated, or DTensor shards under FSDP2."""
    if hasattr(optimizer, "checkpoint_blocks"):
        return ({f"optim/{k}": v for k, v in optimizer.checkpoint_blocks().items()},
                {"kind": "named", **optimizer.checkpoint_meta()})
    if getattr(optimizer, "state_keyed_by_name", False):
        return _flatten("optim/", optimizer.state_dict()), {"kind": "named"}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(_resharded(model), optimizer)
    return _flatten("optim/state/", full["state"]), {"kind": "torch", "param_groups": full["param_groups"]}


def _check_kind(meta: dict, want: str, optimizer_name: str) -> None:
    if meta["kind"] != want:
        raise CheckpointError(f"checkpoint optimizer state is {meta['kind']!r}; this run's optimizer "
                              f"{optimizer_name} needs {want!r}: resume with the same optim.name")


def _dense_state_keys(model: torch.nn.Module, saved: SavedState) -> dict[str, list[str]]:
    """parameter name -> the state keys saved for it, checked against the model (a state saved
    as pieces is one key: SavedState.keys has it without the pieces' "@<start>-<stop>")."""
    keys: dict[str, list[str]] = {}
    for k in saved.keys:
        if k.startswith("optim/state/"):
            name, key = k[len("optim/state/"):].rsplit("/", 1)
            keys.setdefault(name, []).append(key)
    if keys and set(keys) != {n for n, _ in model.named_parameters()}:
        raise CheckpointError("checkpoint optimizer parameters do not match the model "
                              "(a different model.preset?)")
    return keys


def dense_optimizer_fragments(model: torch.nn.Module, saved: SavedState, meta: dict,
                              ranges: dict[str, tuple[int, int]], optimizer_name: str = "AdamW"):
    """(the saved step, or None when no state was saved; an iterator of (parameter name, state
    key, the elements [start, stop) of that flattened saved tensor)) for each parameter in
    `ranges` (name -> (start, stop)), read one tensor at a time and only that part of it:
    DeepSpeed ZeRO-1/2 gives each rank a contiguous range of the flattened parameters, so a rank
    reads only the state it keeps (the saved pieces or chunks that overlap it). Checked against
    the model first."""
    _check_kind(meta, "torch", optimizer_name)
    keys = _dense_state_keys(model, saved)
    if not keys:
        return None, iter(())
    steps = saved.read({f"optim/state/{next(iter(keys))}/step": None})  # one step for all (AdamW)
    return next(iter(steps.values())), _fragments(saved, keys, ranges)


def _fragments(saved: SavedState, keys: dict[str, list[str]], ranges: dict[str, tuple[int, int]]):
    for name, span in ranges.items():
        for key in (k for k in keys[name] if k != "step"):
            fqn = f"optim/state/{name}/{key}"
            yield name, key, saved.read_flat({fqn: span})[fqn]


def restore_optimizer(optimizer, model: torch.nn.Module, saved: SavedState, meta: dict) -> None:
    """Load into this rank's optimizer the state it holds, read from the checkpoint."""
    name = type(optimizer).__name__
    if hasattr(optimizer, "checkpoint_blocks"):
        _check_kind(meta, "named", name)
        optimizer.load_checkpoint(meta, saved, "optim/")
        return
    if getattr(optimizer, "state_keyed_by_name", False):
        _check_kind(meta, "named", name)
        optimizer.load_state_dict_shards([_unflatten(saved.read_prefix("optim/"))])
        return
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    _check_kind(meta, "torch", name)
    current = get_optimizer_state_dict(_resharded(model), optimizer)["state"]  # torch builds its lazy state here
    got = _unflatten(saved.read(_flatten("optim/state/", current)))["optim"]["state"]
    if set(got) != set(current):
        raise CheckpointError("checkpoint optimizer parameters do not match the model")
    set_optimizer_state_dict(model, optimizer, {"state": got, "param_groups": meta["param_groups"]})
