"""The block optimizer's state across checkpoints and reselections.

  checkpoint_meta / checkpoint_blocks   what a checkpoint writes: the global selection state
                                        (the same on every rank) and this rank's block states,
                                        no gather (FSDP2 rows as row pieces)
  load_checkpoint                       reads back only the blocks (and rows) this rank holds now,
                                        at any world size and backend
  state_dict / load_state_dict(_shards) torch's interface: whole states (gathered under FSDP2)
  _move_state                           a kept block's state to its new owner on reselection

States are keyed by block name, not by parameter index or rank, so they reshard by name: the
owner map is recomputed for the loading world size. A mixin of BlockOptimizer (it reads the
layout, the rule and the block tables, and owns `block_state`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from scaletrain.optim.selection import Block
from scaletrain.optim.update_rules import chunked_by_rows


class BlockStateIO:
    """State save, load and migration of BlockOptimizer (see the module docstring)."""

    # ------------------------------------------------------------------ reselection
    def _move_state(self, kept: list[str], old_owners: dict[str, int]) -> None:
        """Keep the state of blocks that stay selected; send it to the new owner where it moved,
        drop everything else. Every rank walks the moves in the same order, so sends and
        receives pair up without deadlock. The receiver allocates the rule's state layout for the
        block (fixed keys and shapes) and receives the tensors in key order, then the numbers."""
        rank = self._rank()
        moved = {}
        for name in kept:
            src, dst = old_owners[name], self.owners[name]
            if not self.layout.state_moves() or src == dst or rank not in (src, dst):
                continue  # (FSDP, stage 0: every rank already holds its part of every kept state)
            peer = self._global_rank(dst if rank == src else src)
            block = self.block_by_name[name]
            st = self.block_state.get(name) if rank == src else None  # (none yet: never updated)
            st = st or self._new_state(block, self._block_like(block))
            numbers = torch.tensor([float(st[k]) for k in sorted(st) if not torch.is_tensor(st[k])],
                                   dtype=torch.float64, device=self.device)
            for key in sorted(k for k in st if torch.is_tensor(st[k])):
                (self.wire.send if rank == src else self.wire.recv)(st[key], peer)
            (self.wire.send if rank == src else self.wire.recv)(numbers, peer)
            if rank == dst:
                for key, value in zip(sorted(k for k in st if not torch.is_tensor(st[k])), numbers.tolist()):
                    st[key] = value
                moved[name] = st
        self.block_state = {n: s for n, s in self.block_state.items() if n in kept and self.holds(n)}
        self.block_state.update(moved)
        for st in self.block_state.values():
            if "proj_stale" in st:
                st["proj_stale"] = 1.0  # GaLore's basis is refit when a block is (re)selected

    # ------------------------------------------------------------------ save
    def state_dict(self) -> dict:
        """Tensors and plain numbers/strings only, keyed by block name (weights_only loadable).
        Under FSDP2 this is collective: the row shards of each block's state are gathered and
        rank 0 returns them whole (the other ranks none), so any backend and size can resume.
        (Checkpoints use checkpoint_blocks/checkpoint_meta instead: no gather.)"""
        blocks = self._gathered_fsdp_state() if self.fsdp_rows else {n: dict(s) for n, s in self.block_state.items()}
        return {"blocks": blocks, **self.checkpoint_meta()}

    def checkpoint_meta(self) -> dict:
        """The global part of the state (the same on every rank): selection, visits, LR."""
        return {
            "selected": list(self.selected),
            "chosen": list(self.chosen),
            "owners": dict(self.owners),  # at the saving world size; recomputed on load
            "visits": dict(self.selector.visits),
            "importance": dict(self.selector.importance),
            "losses_since_selection": list(self.losses_since_selection),
            "selection_history": [list(h) for h in self.selection_history],
            "last_selection_step": self.last_selection_step,
            "lr": self.param_groups[0]["lr"],
        }

    def checkpoint_blocks(self) -> dict:
        """This rank's part of the block state as flat `blocks/<name>/<key>` entries, no
        communication but one small all-reduce under FSDP2: each block by its owner (every rank
        at stage 0 or world 1: replicated, written once by DCP); under FSDP2 rows, each rank's
        rows as `<key>@<first>-<end>` (rows of the parameter) plus the block's step."""
        if not self.fsdp_rows:
            return {f"blocks/{n}/{k}": v for n, st in self.block_state.items() for k, v in st.items()}
        names = sorted(self.selected)
        steps = torch.tensor([float(self.block_state[n]["step"]) if n in self.block_state else 0.0
                              for n in names], dtype=torch.float64, device=self.device)
        if self._world() > 1:
            self.wire.all_reduce(steps, op=dist.ReduceOp.MAX)  # 0 where a rank has no rows
        out = {}
        for name, step in zip(names, steps.tolist()):
            b = self.block_by_name[name]
            out[f"blocks/{name}/step"] = step
            lo, hi, _ = self._local_rows(b)
            if hi > lo:
                st = self.block_state.get(name) or self.rule.new_state(b, self._weight(b))
                out.update({f"blocks/{name}/{k}@{lo}-{hi}": v for k, v in st.items() if torch.is_tensor(v)})
        return out

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, meta: dict, saved, prefix: str) -> None:
        """Load from a checkpoint (`saved.keys`, `saved.read(targets)`, `saved.empty(key)`) the
        blocks this rank holds at the current world size and backend, reading only those (their
        rows only, where FSDP2 row pieces were saved)."""
        self._load_selection(meta)
        by_block: dict[str, list[str]] = {}  # block name -> its saved keys (`<key>` or `<key>@<rows>`)
        for k in saved.keys:
            if k.startswith(f"{prefix}blocks/"):
                name, key = k[len(prefix) + 7:].rsplit("/", 1)
                by_block.setdefault(name, []).append(key)
        self._install_blocks({n: self._read_block(n, saved, f"{prefix}blocks/{n}/", by_block[n])
                              for n in self.owned() if n in by_block})

    def _read_block(self, name: str, saved, prefix: str, keys: list[str]) -> dict:
        b = self.block_by_name[name]
        a, z = b.rows or (0, self.params[b.param].shape[0])
        lo, hi = self._local_rows(b)[:2] if self.fsdp_rows else (a, z)
        pieces = {}  # state key -> [(first, end, saved key)] of the saved row pieces we need
        for k in keys:
            if "@" in k:
                key, rows = k.split("@")
                first, end = map(int, rows.split("-"))
                pieces.setdefault(key, [])
                if first < hi and end > lo:
                    pieces[key].append((first, end, k))
        whole = [k for k in keys if "@" not in k]
        got = saved.read({prefix + k: None for k in whole + [p[2] for ps in pieces.values() for p in ps]})
        state = {k: got[prefix + k] for k in whole}
        if self.fsdp_rows:  # a whole block saved by an owner: this rank's rows of it
            state = {k: (v[lo - a:hi - a] if torch.is_tensor(v) else v) for k, v in chunked_by_rows(state).items()}
        for key, ps in pieces.items():
            ps.sort()
            parts = [got[prefix + k][max(lo, f) - f:min(hi, e) - f] for f, e, k in ps]
            first_key = next(k for k in keys if k.startswith(key + "@"))
            parts = parts or [saved.empty(prefix + first_key)[:0]]  # no rows here
            state[key] = torch.cat(parts).clone()
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in state.items()}

    def _gathered_fsdp_state(self) -> dict:
        """Each selected block's state with its row shards concatenated (FSDP2, collective)."""
        full = {}
        for name in sorted(self.selected):
            b = self.block_by_name[name]
            st = self.block_state.get(name) or self.rule.new_state(b, self._weight(b))  # no rows here
            step = torch.tensor([float(st["step"])], dtype=torch.float64, device=self.device)
            self.wire.all_reduce(step, op=dist.ReduceOp.MAX)  # 0 where a rank has no rows
            out = {"step": step.item()}
            for key in sorted(k for k in st if torch.is_tensor(st[k])):
                out[key] = self.comm.all_gather_rows(b, st[key]).cpu()
            if self._rank() == 0:
                full[name] = out
        return full

    def _local_state(self, b: Block, st: dict) -> dict:
        """This rank's rows of a whole saved state (FSDP2), or the state itself, on this rank's
        device (a checkpoint is loaded onto the CPU, whatever device saved it)."""
        if not self.fsdp_rows:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in st.items()}
        lo, hi, _ = self._local_rows(b)
        a = b.rows[0] if b.rows else 0
        return {k: (v[lo - a:hi - a].clone().to(self.device) if torch.is_tensor(v) else v)
                for k, v in chunked_by_rows(dict(st)).items()}

    def load_state_dict(self, state: dict) -> None:
        self._load_selection(state)
        self._install_blocks({n: self._local_state(self.block_by_name[n], state["blocks"][n])
                              for n in self.owned() if n in state["blocks"]})

    def _load_selection(self, state: dict) -> None:
        """Selection, visits, losses and LR from a saved state; owners for this world size."""
        unknown = set(state.get("chosen", state["selected"])) - {b.name for b in self.blocks}
        if unknown:
            raise ValueError(f"saved selection has blocks this model/config does not: {sorted(unknown)[:3]}"
                             " (a different model.preset, optim.density or optim.frozen_patterns?)")
        self.selector.visits = dict(state["visits"])
        self.selector.importance = dict(state.get("importance", {}))  # (saved before "sample" existed)
        self.losses_since_selection = list(state["losses_since_selection"])
        self.selection_history = [list(h) for h in state["selection_history"]]
        self.last_selection_step = state["last_selection_step"]
        self.param_groups[0]["lr"] = state["lr"]
        always = sorted(b.name for b in self.always_blocks)
        self.chosen = list(state.get("chosen", state["selected"]))  # (saved before always-trained tensors existed)
        self.selected = sorted(always + self.chosen)
        self.layout.assign([self.block_by_name[n] for n in self.selected])

    def _install_blocks(self, blocks: dict) -> None:
        """The loaded states of the blocks this rank holds (local rows under FSDP2, on its device)."""
        missing = [n for n in self.owned() if n not in blocks]
        if missing:
            raise ValueError(f"saved optimizer state lacks blocks this rank now owns: {missing[:3]}")
        self.block_state = blocks
        self._set_requires_grad()
        self._adopt_masters()
        self._hook_trained_params()

    def load_state_dict_shards(self, shards: list[dict]) -> None:
        """Merge the per-rank saved states (each holds the blocks its rank owned) and load the
        ones this rank owns under the current world size (any world size can resume)."""
        merged = dict(shards[0])
        merged["blocks"] = {n: s for shard in shards for n, s in shard["blocks"].items()}
        self.load_state_dict(merged)
