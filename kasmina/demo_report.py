"""The demo's report: the lifecycle picture and the printed summary table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._generated.lifecycle_tables import NUM_STATES, STATE_NAMES

__all__ = ["STATE_COLOURS", "plot_lifecycle", "print_report"]

# Greys for idle, blues→greens along the happy path, gold for FOSSILIZED, reds for the
# retired states; indexed by state id through the spec's names.
_COLOUR_OF = {
    "DORMANT": "#e6e6e6",
    "GERMINATED": "#c6dbef",
    "TRAINING": "#6baed6",
    "GRAFTING": "#2171b5",
    "STABILIZATION": "#74c476",
    "EVALUATING": "#31a354",
    "FINE_TUNING": "#006d2c",
    "FOSSILIZED": "#f2b701",
    "CULLED": "#cb181d",
    "CANCELLED": "#fc9272",
    "ROLLED_BACK": "#a50f15",
}
STATE_COLOURS = tuple(_COLOUR_OF[name] for name in STATE_NAMES)

_MARKS = {
    "GERMINATED": ("^", "#31a354", "germinated"),
    "FOSSILIZED": ("*", "#f2b701", "fossilized"),
    "CULLED": ("x", "#cb181d", "culled"),
    "ROLLED_BACK": ("X", "#a50f15", "rolled back"),
    "CANCELLED": ("x", "#fc9272", "cancelled"),
}


def plot_lifecycle(records: list[dict[str, Any]], path: Path, num_seeds: int) -> None:
    """Save the run's picture: one row per seed coloured by state over epochs, and the
    loss / accuracy curves with germination, fossilization and cull marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    epochs = np.array([r["epoch"] for r in records])
    states = np.array([r["seed_states"] for r in records]).T.reshape(num_seeds, len(records))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 3 + 0.35 * num_seeds + 3), gridspec_kw={"height_ratios": [0.6 + 0.3 * num_seeds, 3]}, sharex=True
    )
    cmap = ListedColormap(STATE_COLOURS)
    norm = BoundaryNorm(np.arange(-0.5, NUM_STATES + 0.5), NUM_STATES)
    first = epochs[0] if len(epochs) else 0
    last = epochs[-1] if len(epochs) else 0
    extent = (first - 0.5, last + 0.5, num_seeds - 0.5, -0.5)
    top.imshow(states, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm, extent=extent)
    top.set_yticks(range(num_seeds), [f"seed {i}" for i in range(num_seeds)])
    top.set_title("Seed lifecycle (one row per seed)")
    present = sorted({int(s) for s in states.flatten()})
    top.legend(
        handles=[Patch(color=STATE_COLOURS[s], label=STATE_NAMES[s]) for s in present],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )

    def series(key: str) -> np.ndarray:  # records read back from JSONL hold None where NaN was written
        return np.array([math.nan if r[key] is None else r[key] for r in records], dtype=float)

    bottom.plot(epochs, series("train_loss"), label="train loss", color="#6baed6")
    val_loss = series("val_loss")
    bottom.plot(epochs, val_loss, label="validation loss", color="#08519c")
    bottom.set_yscale("log")
    bottom.set_ylabel("cross-entropy (log scale)")
    bottom.set_xlabel("epoch")
    accuracy_axis = bottom.twinx()
    accuracy_axis.plot(epochs, series("val_accuracy"), label="validation accuracy", color="#636363", linestyle="--")
    accuracy_axis.set_ylabel("validation accuracy")
    shown: set[str] = set()
    index = {int(e): i for i, e in enumerate(epochs)}
    for record in records:
        for decision in record["decisions"]:
            mark = _MARKS.get(decision["to_state"])
            if mark is None:
                continue
            marker, colour, label = mark
            # Germinations sit just below the validation curve, outcomes just above it.
            y = val_loss[index[int(record["epoch"])]] * (0.85 if label == "germinated" else 1.18)
            if not math.isfinite(y):
                continue  # no validation loss that epoch: nothing to sit on
            bottom.scatter([record["epoch"]], [y], marker=marker, color=colour, s=90, zorder=5,
                           label=None if label in shown else label)  # fmt: skip
            shown.add(label)
    handles, labels = bottom.get_legend_handles_labels()
    handles2, labels2 = accuracy_axis.get_legend_handles_labels()
    bottom.legend(handles + handles2, labels + labels2, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, frameon=False)
    bottom.set_title("Loss and accuracy, with lifecycle events")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _path_text(path: list[tuple[int, str]]) -> str:
    return " → ".join(f"{state}@{epoch}" for epoch, state in path)


def print_report(result: Any, records: list[dict[str, Any]]) -> None:
    """Print every seed life's path and outcome, and the grown-vs-baseline comparison."""
    print()
    print("Seed lives (state@epoch):")
    header = f"{'seed':>4}  {'blueprint':<15} {'germ.':>5}  {'outcome':<13} {'delta':>7}  path"
    print(header)
    print("-" * len(header))
    for life in result.lives:
        delta = "" if math.isnan(life.last_delta) else f"{life.last_delta:+.3f}"
        row = f"{life.seed:>4}  {life.blueprint:<15} {life.germinated_epoch:>5}  {life.outcome:<13} {delta:>7}"
        print(f"{row}  {_path_text(life.path)}")
    if not result.lives:
        print("(no seed germinated: validation loss never plateaued)")
    outcomes: dict[str, int] = {}
    for life in result.lives:
        outcomes[life.outcome] = outcomes.get(life.outcome, 0) + 1
    print("outcomes: " + (", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none"))
    print("final seed states: " + ", ".join(f"{k} {v}" for k, v in result.final_states.items()))
    print()
    diff = result.test_accuracy - result.baseline_test_accuracy
    print(f"{'':<34}{'test accuracy':>14}{'test loss':>11}")
    print(f"{'grown (host + seeds)':<34}{result.test_accuracy:>14.4f}{result.test_loss:>11.4f}")
    print(f"{'same host, no seeds, same epochs':<34}{result.baseline_test_accuracy:>14.4f}{result.baseline_test_loss:>11.4f}")
    verdict = "better" if diff > 0 else "worse" if diff < 0 else "the same"
    print(f"difference: {diff * 100:+.2f} accuracy points ({verdict}; {len(records)} epochs logged, one seeded CPU run)")
    print(f"outputs: {result.run_dir}/telemetry.jsonl, lifecycle.png, summary.json, checkpoints/")
    print(f"run time: {result.seconds:.1f} s")
