"""Lifecycle telemetry of a seeded layer: the seed document's ``ExtendedTelemetry``.

``ExtendedTelemetry(layer).collect_lifecycle_metrics()`` returns the seed document's
keys, each computed with a few batched tensor ops over all seeds (no loop over seeds):

``state_distribution``
    ``{state name: number of seeds}`` for all 11 states (the ``state_summary`` op).
``transition_rate``
    Transitions committed since the previous collection, per lifecycle epoch elapsed
    (epochs count from 0, so a first collection at epoch ``e`` covers ``e + 1`` epochs;
    per collection when no epoch is given), read from the history write counters (a
    seed whose history a restore or ``load_state_dict`` rewound counts none).
``checkpoint_count``
    Checkpoints the layer's :class:`~kasmina.CheckpointManager` holds (0 without one).
``grafting_progress``
    For seeds in GRAFTING: how many, and the mean / min / max of their alpha; plus how
    many seeds are fully grafted (alpha 1: STABILIZATION … FOSSILIZED).
``error_rates``
    ERROR_COUNT totals: all errors, seeds with at least one error, the fraction of seeds
    with errors, and errors per state.

Writers: :class:`JsonlWriter` (one JSON object per line, flushed per record) and
:class:`TensorBoardWriter` (needs the optional ``tensorboard`` package).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor

from ._generated.lifecycle_tables import STATE_ALPHA_SOURCE, STATE_NAMES, ExtendedLifecycle, StateColumn
from .state import ExtendedStateTensor

__all__ = ["ExtendedTelemetry", "JsonlWriter", "TensorBoardWriter", "tensorboard_available"]

_FULL_ALPHA = torch.tensor([source == "one" for source in STATE_ALPHA_SOURCE])


class ExtendedTelemetry:
    """Collects lifecycle metrics from a :class:`~kasmina.ChunkedKasminaLayer` (or a bare
    :class:`~kasmina.ExtendedStateTensor`, which then has no alpha or checkpoints)."""

    def __init__(self, layer: Any):
        if isinstance(layer, ExtendedStateTensor):
            self.state, self.layer = layer, None
        elif isinstance(getattr(layer, "state", None), ExtendedStateTensor):
            self.state, self.layer = layer.state, layer
        else:
            raise TypeError(
                f"ExtendedTelemetry needs a ChunkedKasminaLayer or an ExtendedStateTensor, got {type(layer).__name__}"
            )
        self._last_counts = self.state.history_count.clone()
        self._last_epoch: int | None = None

    # ---- the seed document's metrics -------------------------------------------------
    def collect_lifecycle_metrics(self, epoch: int | None = None) -> dict[str, Any]:
        """The seed document's five metrics; ``epoch`` (the training loop's lifecycle epoch)
        makes ``transition_rate`` a per-epoch rate."""
        return {
            "state_distribution": self.state.get_state_summary(),
            "transition_rate": self._calculate_transition_rate(epoch),
            "checkpoint_count": self._checkpoint_count(),
            "grafting_progress": self._get_grafting_metrics(),
            "error_rates": self._get_error_distribution(),
        }

    def _calculate_transition_rate(self, epoch: int | None) -> float:
        counts = self.state.history_count.clone()
        # per seed, so that a seed whose history a restore rewound counts no transitions
        # instead of subtracting from the others'
        delta = int((counts.long() - self._last_counts.long()).clamp_min(0).sum())
        if epoch is None:
            elapsed = 1
        else:
            elapsed = epoch - (self._last_epoch if self._last_epoch is not None else -1)
            if elapsed <= 0:
                raise ValueError(f"epoch {epoch} does not advance past the previous collection's epoch {self._last_epoch}")
            self._last_epoch = epoch
        self._last_counts = counts
        return delta / elapsed

    def _checkpoint_count(self) -> int:
        manager = None if self.layer is None else self.layer.lifecycle.checkpoint_manager
        return 0 if manager is None else int(manager.get_checkpoint_count())

    def _get_grafting_metrics(self) -> dict[str, float | int]:
        states = self.state.state[:, StateColumn.LIFECYCLE_STATE].long()
        grafting = states == int(ExtendedLifecycle.GRAFTING)
        full = _FULL_ALPHA.to(states.device)[states]
        n = int(grafting.sum())
        out: dict[str, float | int] = {"seeds_grafting": n, "seeds_fully_grafted": int(full.sum())}
        alpha = self._alpha()
        if alpha is None or n == 0:
            out.update(mean_alpha=math.nan, min_alpha=math.nan, max_alpha=math.nan)
            return out
        a = alpha[grafting].float()
        stats = torch.stack([a.mean(), a.min(), a.max()]).tolist()
        out.update(mean_alpha=stats[0], min_alpha=stats[1], max_alpha=stats[2])
        return out

    def _alpha(self) -> Tensor | None:
        if self.layer is None:
            return None
        return self.layer.get_alpha().detach()

    def _get_error_distribution(self) -> dict[str, Any]:
        states = self.state.state[:, StateColumn.LIFECYCLE_STATE].long()
        errors = self.state.state[:, StateColumn.ERROR_COUNT].long()
        per_state = torch.zeros(len(STATE_NAMES), dtype=torch.long, device=states.device).index_add_(0, states, errors)
        totals = torch.stack([errors.sum(), (errors > 0).sum()]).tolist()
        num_seeds = max(1, states.numel())
        return {
            "total_errors": totals[0],
            "seeds_with_errors": totals[1],
            "fraction_with_errors": totals[1] / num_seeds,
            "errors_by_state": dict(zip(STATE_NAMES, per_state.tolist(), strict=True)),
        }


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}/{key}" if prefix else str(key), inner, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)


class JsonlWriter:
    """Appends one JSON object per line to a file, flushed after each record."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "a"):
        if mode not in ("a", "w"):
            raise ValueError(f"mode must be 'a' (append) or 'w' (truncate), got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open(mode, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (NaN is written as ``null``)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        self._file.write(json.dumps(_nan_to_none(record), sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nan_to_none(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN and infinities as None, NumPy and 0-dim tensor
    scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, np.generic | torch.Tensor) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package is installed)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardWriter:
    """Writes every numeric value of a metrics dict as a TensorBoard scalar
    (nested keys joined with ``/``). Needs the optional ``tensorboard`` package."""

    def __init__(self, log_dir: str | os.PathLike[str]):
        if not tensorboard_available():
            raise ImportError("TensorBoardWriter needs the tensorboard package: pip install tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, metrics: dict[str, Any], step: int) -> None:
        scalars: dict[str, float] = {}
        _flatten("", metrics, scalars)
        for key, value in scalars.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
