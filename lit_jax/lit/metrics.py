"""Run metrics: a JSONL log (one object per line), TensorBoard event files, and a loss-curve PNG."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard/`.

    Only process 0 writes; other hosts get a writer that does nothing.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **values}) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(f"{split}/{k}", v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(jsonl_path: str, png_path: str) -> str | None:
    """Train and held-out loss against step (the last value per step wins after a resume)."""
    rows = read_jsonl(jsonl_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("heldout", "o-")):
        points = {r["step"]: r["loss"] for r in rows if r["split"] == split and "loss" in r}
        if points:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], style, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
