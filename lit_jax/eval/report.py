"""Evaluation results as tables (markdown + JSON) and plots (PNG).

A result is a nested dict from lit_jax.eval.harness; every figure in it is an interval
{"value", "low", "high", "n"} (lit_jax.eval.stats). `rows` flattens it into one row per
(task, metric, variant) with the task's chance or baseline beside it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lit_jax.atomic_dir import write_directory

VARIANT_ORDER = ("trained", "zeros", "shuffled", "text_only", "untrained")


def _is_interval(x: Any) -> bool:
    return isinstance(x, dict) and {"value", "low", "high", "n"} <= set(x)


def rows(results: dict) -> list[dict]:
    """[{task, metric, variant, value, low, high, n, reference}] for every interval in results["tasks"]."""
    out = []
    for task, by_variant in results.get("tasks", {}).items():
        reference = by_variant.get("reference", {})
        for variant, metrics in by_variant.items():
            if variant == "reference" or not isinstance(metrics, dict):
                continue
            for metric, iv in _flatten(metrics):
                ref = reference.get(metric.split("/")[0])
                out.append({"task": task, "metric": metric, "variant": variant, **iv,
                            "reference": ref})
    return out


def _flatten(metrics: dict, prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if _is_interval(v):
            out.append((name, v))
        elif isinstance(v, dict) and k != "examples":
            out.extend(_flatten(v, name + "/"))
    return out


def markdown(results: dict) -> str:
    """The results as one markdown table (value [95% interval], n; reference = chance or baseline)."""
    lines = ["| task | metric | variant | value [95% CI] | n | chance / baseline |", "|---|---|---|---|---|---|"]
    for r in rows(results):
        ref = "" if r["reference"] is None else f"{r['reference']:.3f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['variant']} | {r['value']:.3f} "
                     f"[{r['low']:.3f}, {r['high']:.3f}] | {r['n']} | {ref} |")
    return "\n".join(lines) + "\n"


def plot_controls(results: dict, path: str) -> str:
    """A PNG: per task, the headline accuracy of each variant with its interval, and the task's
    chance or baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, metric) for task, metric in results.get("headline", {}).items()]
    if not panels:
        raise ValueError("no headline metrics to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        data = [(v, _get(results["tasks"][task].get(v, {}), metric)) for v in VARIANT_ORDER]
        data += [(k, _get(results["tasks"][task], f"baselines/{k}/{metric}"))
                 for k in results["tasks"][task].get("baselines", {})]
        data = [(v, iv) for v, iv in data if iv is not None]
        xs = range(len(data))
        vals = [iv["value"] for _, iv in data]
        err = [[iv["value"] - iv["low"] for _, iv in data], [iv["high"] - iv["value"] for _, iv in data]]
        colors = ["tab:blue" if v == "trained" else "tab:gray" if v in VARIANT_ORDER else "tab:orange"
                  for v, _ in data]
        ax.bar(xs, vals, yerr=err, color=colors, capsize=3)
        ax.set_xticks(list(xs), [v for v, _ in data], rotation=45, ha="right", fontsize=8)
        ref = results["tasks"][task].get("reference", {}).get(metric.split("/")[0])
        if ref is not None:
            ax.axhline(ref, ls="--", c="k", lw=1)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _get(d: dict, metric: str) -> dict | None:
    for part in metric.split("/"):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d if _is_interval(d) else None


def write_report(results: dict, out_dir: str, *, overwrite: bool = True) -> str:
    """results.json, results.md and controls.png (+ any plots the results name) into out_dir,
    atomically."""
    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(markdown(results))
        if results.get("headline"):
            plot_controls(results, os.path.join(tmp, "controls.png"))
        for task, title in (("relations", "Relational knowledge by read layer (held-out subjects)"),
                            ("classification", "Classification by read layer (held-out sentences)")):
            rows = results.get("tasks", {}).get(task, {}).get("by_layer")
            if rows:
                from lit_jax.eval.relations import plot_by_layer

                plot_by_layer(rows, os.path.join(tmp, f"{task}_by_layer.png"), title=title)

    return write_directory(out_dir, fill, overwrite=overwrite)


def summary_lines(results: dict) -> list[str]:
    """A few lines: per task, its headline metric for the trained decoder and each control,
    the chance/baseline, and whether the trained decoder beats every control (intervals apart)."""
    lines = []
    for task, metric in results.get("headline", {}).items():
        entry = results["tasks"][task]
        trained = _get(entry.get("trained", {}), metric)
        if trained is None:
            continue
        parts = [f"{v} {iv['value']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"
                 for v in VARIANT_ORDER if (iv := _get(entry.get(v, {}), metric)) is not None]
        ref = entry.get("reference", {}).get(metric.split("/")[0])
        controls = [iv for v in VARIANT_ORDER[1:] if (iv := _get(entry.get(v, {}), metric)) is not None]
        verdict = ("reads: above every control" if controls and all(trained["low"] > c["high"] for c in controls)
                   else "not separated from every control")
        ref_text = f"; chance/baseline {ref:.2f}" if ref is not None else ""
        lines.append(f"{task} ({metric}, n={trained['n']}{ref_text}): " + ", ".join(parts) + f" -> {verdict}")
    return lines
