"""What a run reports: TensorBoard scalars, one `metrics.jsonl` line per log step, a progress bar.

Only rank 0 writes. The jsonl keys and TensorBoard tags are the same names (a contract used
by tests and tools): step, tokens, loss, lr, grad_norm, tokens_per_s, step_time_s,
peak_mem_bytes, mfu (on GPUs of known peak), n_params, optim_state_bytes, optim_state_bytes_total, wire_bytes,
selected_params, selection_churn, skipped_data_lines, skipped_steps; eval_loss, eval_ppl on eval steps.
A non-finite number is written to metrics.jsonl as null (strict JSON) and not sent to TensorBoard.
"""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), as in the PaLM paper's MFU:
    6 x the parameters that multiply (all but the input embedding, a lookup) plus attention's
    12 x layers x hidden x seq_len. The same figure for every optimizer: MFU counts the model's
    work, so a mode that skips frozen weight gradients shows as higher MFU, not lower."""
    cfg = model.config
    matmul_params = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_params + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def _finite_or_none(value: Any) -> Any:
    """NaN and infinities as None (JSON null): bare NaN is not JSON and strict parsers reject it."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """TensorBoard + metrics.jsonl under the run directory; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite_or_none(v) for k, v in values.items() if v is not None}}
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.enabled:
            self.tb.add_figure(tag, fig, step)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


class ProgressBar:
    """tqdm on rank 0 with loss and tokens/s; silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def selection_heatmap(layer_names: list[str], history: list[list[str]]):
    """A figure: rows are parameter blocks (grouped by layer), columns are selections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.zeros(len(layer_names), len(history))
    index = {n: i for i, n in enumerate(layer_names)}
    for col, selected in enumerate(history):
        for name in selected:
            base = name.split("[")[0]  # row-chunk blocks are named 'param[rows a:b]'
            if base in index:
                grid[index[base], col] = 1.0
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(history) + 3), max(4, 0.12 * len(layer_names))))
    ax.imshow(grid.numpy(), aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(len(layer_names)))
    ax.set_yticklabels([n.replace("model.", "").replace(".weight", "") for n in layer_names], fontsize=5)
    ax.set_xlabel("selection #")
    ax.set_title("selected blocks over time")
    fig.tight_layout()
    return fig
