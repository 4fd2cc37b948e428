"""Run-time lifecycle policy: minimum epochs per state and guard thresholds.

The spec fixes the *structure* of the lifecycle (states, edges, guard shapes); a
:class:`LifecyclePolicy` holds the numbers a user may tune without rebuilding. The
kernels receive it as two tensors (:meth:`LifecyclePolicy.tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._generated.lifecycle_tables import (
    NUM_STATES,
    PARAM_DEFAULTS,
    PARAM_NAMES,
    STATE_MIN_EPOCHS,
    STATE_NAMES,
    ExtendedLifecycle,
)

__all__ = ["LifecyclePolicy", "resolve_state"]

_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_STATE_LOOKUP: dict[Any, int] = {**{i: i for i in range(NUM_STATES)}, **{name: i for i, name in enumerate(STATE_NAMES)}}
_FAST_TYPES = (int, str, ExtendedLifecycle)


def resolve_state(state: Any) -> int:
    """The state id of ``state``: an ``ExtendedLifecycle``, an int id or a state name
    (case-insensitive). Raises ValueError naming the value when it is no state."""
    if type(state) in _FAST_TYPES:
        state_id = _STATE_LOOKUP.get(state)
        if state_id is not None:
            return state_id
    if isinstance(state, str):
        name = state.strip().upper()
        if name not in STATE_NAMES:
            raise ValueError(f"unknown lifecycle state {state!r}; known states: {', '.join(STATE_NAMES)}")
        return STATE_NAMES.index(name)
    if isinstance(state, bool) or not isinstance(state, (int, np.integer)):
        raise TypeError(f"a lifecycle state must be an ExtendedLifecycle, an int id or a name, got {state!r}")
    if not 0 <= int(state) < NUM_STATES:
        raise ValueError(f"unknown lifecycle state id {int(state)}; ids are 0..{NUM_STATES - 1}")
    return int(state)


@dataclass(frozen=True)
class LifecyclePolicy:
    """Minimum lifecycle epochs per state (indexed by state id) and guard params
    (indexed like ``PARAM_NAMES``). Immutable; derive variants with :meth:`with_overrides`.

    ``min_epochs[s]`` is how many epochs a seed must spend in state ``s`` before a move
    out that does not bypass the minimum (for retired states: the recycle embargo).
    """

    min_epochs: tuple[int, ...]
    params: tuple[float, ...]
    _tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if len(self.min_epochs) != NUM_STATES:
            raise ValueError(f"min_epochs needs {NUM_STATES} entries (one per state), got {len(self.min_epochs)}")
        if len(self.params) != len(PARAM_NAMES):
            raise ValueError(f"params needs {len(PARAM_NAMES)} entries ({', '.join(PARAM_NAMES)}), got {len(self.params)}")
        for state_id, value in enumerate(self.min_epochs):
            _check_min_epochs(STATE_NAMES[state_id], value)
        for name, value in zip(PARAM_NAMES, self.params, strict=True):
            _check_param(name, value)
        object.__setattr__(self, "min_epochs", tuple(int(v) for v in self.min_epochs))
        object.__setattr__(self, "params", tuple(float(v) for v in self.params))

    @classmethod
    def default(cls) -> LifecyclePolicy:
        """The spec's minimum epochs and param defaults."""
        return _DEFAULT

    def with_overrides(
        self,
        min_epochs: Mapping[Any, int] | None = None,
        params: Mapping[str, float] | None = None,
    ) -> LifecyclePolicy:
        """A copy with some values replaced. ``min_epochs`` maps states (name, id or
        ``ExtendedLifecycle``) to non-negative ints, ``params`` maps param names to finite
        numbers. Unknown names and bad values raise ValueError naming them."""
        new_min = list(self.min_epochs)
        for state, value in (min_epochs or {}).items():
            state_id = resolve_state(state)
            _check_min_epochs(STATE_NAMES[state_id], value)
            new_min[state_id] = int(value)
        new_params = list(self.params)
        for name, value in (params or {}).items():
            if name not in PARAM_NAMES:
                raise ValueError(f"unknown lifecycle param {name!r}; known params: {', '.join(PARAM_NAMES)}")
            _check_param(name, value)
            new_params[PARAM_NAMES.index(name)] = float(value)
        return LifecyclePolicy(tuple(new_min), tuple(new_params))

    def min_epochs_of(self, state: Any) -> int:
        """Minimum epochs of ``state`` (name, id or ``ExtendedLifecycle``)."""
        return self.min_epochs[resolve_state(state)]

    def param(self, name: str) -> float:
        """Value of the param ``name``."""
        if name not in PARAM_NAMES:
            raise ValueError(f"unknown lifecycle param {name!r}; known params: {', '.join(PARAM_NAMES)}")
        return self.params[PARAM_NAMES.index(name)]

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{"min_epochs": {state name: n}, "params": {name: value}}``."""
        return {
            "min_epochs": dict(zip(STATE_NAMES, self.min_epochs, strict=True)),
            "params": dict(zip(PARAM_NAMES, self.params, strict=True)),
        }

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_epochs int32 (S,), params float32 (P,)) on ``device``, as the kernels take
        them. Cached per device; treat them as read-only."""
        key = torch.device(device if device is not None else "cpu")
        cached = self._tensors.get(key)
        if cached is None:  # a race builds equal tensors twice; either may be kept
            cached = (
                torch.tensor(self.min_epochs, dtype=torch.int32, device=key),
                torch.tensor(self.params, dtype=torch.float32, device=key),
            )
            self._tensors[key] = cached
        return cached


def _check_min_epochs(state_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"min_epochs of {state_name} must be an int, got {value!r}")
    if not 0 <= int(value) <= _INT32_MAX:
        raise ValueError(f"min_epochs of {state_name} must be in 0..{_INT32_MAX}, got {int(value)}")


def _check_param(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"lifecycle param {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise ValueError(f"lifecycle param {name} must be a finite float32 number, got {value!r}")


_DEFAULT = LifecyclePolicy(tuple(STATE_MIN_EPOCHS), tuple(PARAM_DEFAULTS))
