"""Device-resident lifecycle state of every seed of a layer.

:class:`ExtendedStateTensor` is an ``nn.Module`` whose persistent buffers hold, per seed
(DESIGN §4 "State tensor"):

- ``state`` (N, 8) int32, columns ``StateColumn`` (LIFECYCLE_STATE, BLUEPRINT_ID,
  EPOCHS_IN_STATE, GRAFTING_STRATEGY, PARENT_STATE, CHECKPOINT_ID, EVALUATION_SCORE,
  ERROR_COUNT);
- ``history`` (N, H, 2) int32, a circular buffer of (from, to) pairs, and
  ``history_count`` (N,) int32, the number of transitions ever made (the next slot is
  ``count % H``; reads come back oldest first);
- ``metrics`` (N, 4) float32, columns ``MetricColumn`` (loss, accuracy, stability,
  efficiency); NaN means "not measured yet".

A new seed is DORMANT with BLUEPRINT_ID and CHECKPOINT_ID -1, PARENT_STATE DORMANT,
every other column 0, an empty history and NaN metrics. Being buffers, all of it moves
with ``.to(device)`` and is saved in the owner's ``state_dict``.

Mutations go through batched ops; the object itself is not locked — share it between
threads through a :class:`kasmina.LifecycleManager`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import ops
from ._generated.lifecycle_tables import (
    CONTEXT_FIELDS,
    GRAFTING_STRATEGY_NAMES,
    HISTORY_LENGTH,
    METRIC_COLUMNS,
    NUM_STATES,
    STATE_COLUMNS,
    STATE_NAMES,
    ExtendedLifecycle,
    MetricColumn,
    StateColumn,
)
from .policy import LifecyclePolicy, resolve_state

__all__ = ["ExtendedStateTensor"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_BUFFERS = ("state", "history", "history_count", "metrics")
_STATES = tuple(ExtendedLifecycle(i) for i in range(NUM_STATES))
_LIFECYCLE_COLUMN = int(StateColumn.LIFECYCLE_STATE)
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
IdsLike = torch.Tensor | Sequence[int] | int


class ExtendedStateTensor(nn.Module):
    """Lifecycle state of ``num_seeds`` seeds on one device (see the module docstring)."""

    state: torch.Tensor
    history: torch.Tensor
    history_count: torch.Tensor
    metrics: torch.Tensor

    def __init__(self, num_seeds: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, (int, np.integer)) or num_seeds < 1:
            raise ValueError(f"num_seeds must be a positive int, got {num_seeds!r}")
        n = int(num_seeds)
        state = torch.zeros(n, len(STATE_COLUMNS), dtype=torch.int32, device=device)
        state[:, StateColumn.LIFECYCLE_STATE] = int(ExtendedLifecycle.DORMANT)
        state[:, StateColumn.PARENT_STATE] = int(ExtendedLifecycle.DORMANT)
        state[:, StateColumn.BLUEPRINT_ID] = -1
        state[:, StateColumn.CHECKPOINT_ID] = -1
        self.register_buffer("state", state)
        self.register_buffer("history", torch.zeros(n, HISTORY_LENGTH, 2, dtype=torch.int32, device=device))
        self.register_buffer("history_count", torch.zeros(n, dtype=torch.int32, device=device))
        self.register_buffer("metrics", torch.full((n, len(METRIC_COLUMNS)), math.nan, dtype=torch.float32, device=device))
        self._host: tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, int] | None = None

    # ---- shape and device -----------------------------------------------------------

    @property
    def num_seeds(self) -> int:
        """Number of seeds (N)."""
        return self.state.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of every buffer."""
        return self.state.device

    @property
    def bytes_per_seed(self) -> int:
        """Bytes of buffer memory per seed (state, history, history count, metrics)."""
        return sum(getattr(self, name)[0].numel() * getattr(self, name).element_size() for name in _BUFFERS)

    def extra_repr(self) -> str:
        return f"num_seeds={self.num_seeds}, device={self.device}"

    # ---- queries --------------------------------------------------------------------

    def get_state(self, seed_ids: IdsLike | None = None) -> torch.Tensor:
        """A copy of the state rows: all (N, 8) when ``seed_ids`` is None, (K, 8) for a
        sequence or tensor of ids, (8,) for one int id."""
        if seed_ids is None:
            return self.state.clone()
        if isinstance(seed_ids, (int, np.integer)) and not isinstance(seed_ids, bool):
            return self.state[self._one_id(seed_ids)].clone()
        return self.state[self._ids(seed_ids)]

    def lifecycle_state(self, seed_id: int) -> ExtendedLifecycle:
        """The state of one seed (fast: no tensor is created for CPU buffers)."""
        host = self._host_view()
        rows = host[1] if host is not None else self.state
        if type(seed_id) is not int or not 0 <= seed_id < rows.shape[0]:
            seed_id = self._one_id(seed_id)
        return _STATES[int(rows[seed_id, _LIFECYCLE_COLUMN])]

    def get_seeds_in_state(self, state: Any) -> torch.Tensor:
        """Ids (int64, ascending) of the seeds in ``state`` (name, id or ExtendedLifecycle)."""
        state_id = resolve_state(state)
        return torch.nonzero(self.state[:, StateColumn.LIFECYCLE_STATE] == state_id).flatten()

    def get_state_summary(self) -> dict[str, int]:
        """Number of seeds in every state, by state name (all states present)."""
        counts = ops.state_summary(self.state).tolist()
        return dict(zip(STATE_NAMES, counts, strict=True))

    def get_transition_history(self, seed_id: int) -> list[tuple[int, int]]:
        """The last (up to H) transitions of a seed as (from, to) state ids, oldest first."""
        seed = self._one_id(seed_id)
        host = self._host_view()
        if host is not None:
            count, ring = int(host[2][seed]), host[3][seed]
        else:
            count, ring = int(self.history_count[seed]), self.history[seed].cpu().numpy()
        if count <= HISTORY_LENGTH:
            order = range(max(count, 0))
        else:
            start = count % HISTORY_LENGTH
            order = [(start + i) % HISTORY_LENGTH for i in range(HISTORY_LENGTH)]
        return [(int(ring[i, 0]), int(ring[i, 1])) for i in order]

    # ---- lifecycle ------------------------------------------------------------------

    def step_epoch(self) -> None:
        """Advance every seed's EPOCHS_IN_STATE by one lifecycle epoch (saturating)."""
        ops.step_epoch(self.state)

    def apply_transitions(
        self,
        seed_ids: IdsLike,
        from_states: IdsLike | Sequence[Any],
        to_states: IdsLike | Sequence[Any],
        context: Mapping[str, Any] | torch.Tensor | None = None,
        policy: LifecyclePolicy | None = None,
    ) -> torch.Tensor:
        """Judge K requests ``seed_ids[k]: from_states[k] -> to_states[k]`` against the
        state before the batch and commit the accepted ones; returns int32 (K,) reason
        codes (``kasmina.Reason``) on the state's device.

        ``context`` is None (every metric missing), a dict of context field name -> (K,)
        values or one number for all, or a (K, F) float tensor in ``CONTEXT_FIELDS``
        order; NaN means missing. States may be ids, names or ExtendedLifecycle values;
        an id outside the spec is answered with a reason code (STALE_FROM_STATE or
        INVALID_EDGE), a seed id out of range with UNKNOWN_SEED. Malformed input (wrong
        dtype, device or length, unknown names) raises before anything changes.
        """
        ids = self._tensor_arg(seed_ids, "seed_ids", integer=True)
        k = ids.shape[0]
        src = self._state_arg(from_states, "from_states", k)
        dst = self._state_arg(to_states, "to_states", k)
        if src.dtype != dst.dtype:
            src, dst = src.to(torch.int64), dst.to(torch.int64)
        ctx = self._context_arg(context, k)
        min_epochs, params = (policy if policy is not None else LifecyclePolicy.default()).tensors(self.device)
        return ops.apply_transitions(
            self.state, self.history, self.history_count, ids.to(torch.int64), src, dst, ctx, min_epochs, params
        )

    # ---- other per-seed updates -----------------------------------------------------

    def update_performance(self, seed_ids: IdsLike, **metrics: Any) -> None:
        """Set metrics of the given seeds: any of ``loss``, ``accuracy``, ``stability``,
        ``efficiency`` (float32; NaN = unknown) and ``evaluation_score`` (finite; stored as
        round(score x 1000) in EVALUATION_SCORE). Each value is one number or (K,) values."""
        ids = self._ids(seed_ids, unique=True)
        k = ids.shape[0]
        unknown = sorted(set(metrics) - set(METRIC_COLUMNS) - {"evaluation_score"})
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {[*METRIC_COLUMNS, 'evaluation_score']}")
        columns = {name: self._values_arg(value, name, k) for name, value in metrics.items()}
        score = columns.pop("evaluation_score", None)
        if score is not None:
            if not torch.isfinite(score).all():
                raise ValueError(f"evaluation_score must be finite, got {score.tolist()}")
            scaled = torch.round(score.double() * 1000)
            if ((scaled < _INT32_MIN) | (scaled > _INT32_MAX)).any():
                raise ValueError(f"evaluation_score x 1000 must fit in int32, got {score.tolist()}")
        for name, values in columns.items():
            self.metrics[ids, MetricColumn[name.upper()]] = values
        if score is not None:
            self.state[ids, StateColumn.EVALUATION_SCORE] = scaled.to(torch.int32)

    def update_blueprint(
        self, seed_ids: IdsLike, blueprint_ids: IdsLike, strategies: IdsLike | Sequence[str] | None = None
    ) -> None:
        """Set BLUEPRINT_ID (int >= -1; -1 = none) and, when given, GRAFTING_STRATEGY (id or
        name of ``GRAFTING_STRATEGY_NAMES``) of the given seeds."""
        ids = self._ids(seed_ids, unique=True)
        blueprints = self._int_values(blueprint_ids, "blueprint_ids", ids.shape[0], low=-1)
        strategy_ids = None
        if strategies is not None:
            if isinstance(strategies, str) or (
                isinstance(strategies, Sequence) and strategies and all(isinstance(s, str) for s in strategies)
            ):
                names = [strategies] if isinstance(strategies, str) else list(strategies)
                bad = [s for s in names if s not in GRAFTING_STRATEGY_NAMES]
                if bad:
                    raise ValueError(f"unknown grafting strategy {bad[0]!r}; known: {', '.join(GRAFTING_STRATEGY_NAMES)}")
                strategies = [GRAFTING_STRATEGY_NAMES.index(s) for s in names]
                if len(strategies) == 1:
                    strategies = strategies[0]
            strategy_ids = self._int_values(
                strategies, "strategies", ids.shape[0], low=0, high=len(GRAFTING_STRATEGY_NAMES) - 1
            )
        self.state[ids, StateColumn.BLUEPRINT_ID] = blueprints
        if strategy_ids is not None:
            self.state[ids, StateColumn.GRAFTING_STRATEGY] = strategy_ids

    def increment_error_count(self, seed_ids: IdsLike) -> None:
        """Add one to ERROR_COUNT per occurrence of a seed id (saturating at INT32_MAX)."""
        ids = self._ids(seed_ids)
        added = torch.zeros(self.num_seeds, dtype=torch.int64, device=self.device)
        added.index_add_(0, ids, torch.ones_like(ids))
        column = self.state[:, StateColumn.ERROR_COUNT]
        column.copy_((column.to(torch.int64) + added).clamp(max=_INT32_MAX))

    def set_checkpoint(self, seed_ids: IdsLike, checkpoint_ids: IdsLike) -> None:
        """Set CHECKPOINT_ID (int32 >= -1; -1 = none) of the given seeds."""
        ids = self._ids(seed_ids, unique=True)
        self.state[ids, StateColumn.CHECKPOINT_ID] = self._int_values(checkpoint_ids, "checkpoint_ids", ids.shape[0], low=-1)

    # ---- persistence ----------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts of an owner (``.half()``, ``.double()``) do not:
        the buffers keep their dtypes and values."""
        originals = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in originals.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        problems = []
        for name in _BUFFERS:
            key = prefix + name
            if key not in state_dict:
                continue
            value, own = state_dict[key], getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != own.dtype or value.shape != own.shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                problems.append(f"{key}: expected {own.dtype} {tuple(own.shape)}, got {got}")
        if not problems:
            problems = _content_problems(state_dict, prefix)
        if problems:
            error_msgs.extend(f"ExtendedStateTensor: {p}; nothing was loaded" for p in problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ---- argument handling ----------------------------------------------------------

    def _host_view(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, int] | None:
        """NumPy views sharing memory with the CPU buffers (None off the CPU); rebuilt
        when a buffer was replaced (``.to()``, ``.data =``)."""
        state = self._buffers["state"]
        host = self._host
        if host is not None and host[0] is state and host[4] == state.data_ptr():
            return host
        if state.device.type != "cpu":
            return None
        host = (state, state.numpy(), self.history_count.numpy(), self.history.numpy(), state.data_ptr())
        self._host = host
        return host

    def _one_id(self, seed_id: Any) -> int:
        if isinstance(seed_id, bool) or not isinstance(seed_id, (int, np.integer)):
            raise TypeError(f"seed_id must be an int, got {seed_id!r}")
        if not 0 <= seed_id < self.num_seeds:
            raise IndexError(f"seed {seed_id} does not exist (there are {self.num_seeds} seeds)")
        return int(seed_id)

    def _tensor_arg(self, values: Any, name: str, *, integer: bool) -> torch.Tensor:
        if isinstance(values, torch.Tensor):
            tensor = values
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device} but the state tensor is on {self.device}")
        else:
            if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
                values = [values]
            try:
                empty_dtype = torch.int64 if integer else torch.float32
                tensor = torch.as_tensor(values, device=self.device, dtype=None if len(values) else empty_dtype)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {values!r}") from exc
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if integer and tensor.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"{name} must hold integers, got dtype {tensor.dtype}")
        return tensor

    def _ids(self, seed_ids: IdsLike, *, unique: bool = False) -> torch.Tensor:
        ids = self._tensor_arg(seed_ids, "seed_ids", integer=True).to(torch.int64)
        if ids.numel():
            bad = ids[(ids < 0) | (ids >= self.num_seeds)]
            if bad.numel():
                raise IndexError(f"seed {int(bad[0])} does not exist (there are {self.num_seeds} seeds)")
            if unique and torch.unique(ids).numel() != ids.numel():
                raise ValueError(f"seed_ids must not repeat a seed, got {ids.tolist()[:20]}")
        return ids

    def _state_arg(self, states: Any, name: str, k: int) -> torch.Tensor:
        if not isinstance(states, torch.Tensor):
            items = [states] if isinstance(states, (str, int, np.integer)) else list(states)
            states = [resolve_state(s) if isinstance(s, str) else s for s in items]
            if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in states):
                raise TypeError(f"{name} must hold state ids, names or ExtendedLifecycle values, got {items!r}")
            if len(states) == 1 and k != 1:
                states = states * k
        tensor = self._tensor_arg(states, name, integer=True)
        if tensor.shape[0] != k:
            raise ValueError(f"{name} has {tensor.shape[0]} entries but seed_ids has {k}")
        if tensor.dtype != torch.int32:
            tensor = tensor.to(torch.int64)
        return tensor

    def _context_arg(self, context: Any, k: int) -> torch.Tensor:
        if context is None:
            return torch.full((k, len(CONTEXT_FIELDS)), math.nan, dtype=torch.float32, device=self.device)
        if isinstance(context, torch.Tensor):
            if context.device != self.device:
                raise ValueError(f"context is on {context.device} but the state tensor is on {self.device}")
            if context.shape != (k, len(CONTEXT_FIELDS)):
                raise ValueError(
                    f"a context tensor must have shape ({k}, {len(CONTEXT_FIELDS)}) (columns {CONTEXT_FIELDS}), "
                    f"got {tuple(context.shape)}"
                )
            if not context.is_floating_point():
                raise TypeError(f"a context tensor must be floating point, got dtype {context.dtype}")
            return context.to(torch.float32).contiguous()
        if not isinstance(context, Mapping):
            raise TypeError(f"context must be None, a dict of field -> values or a (K, F) tensor, got {type(context).__name__}")
        unknown = sorted(set(context) - set(CONTEXT_FIELDS))
        if unknown:
            raise ValueError(f"unknown context field(s) {unknown}; known: {list(CONTEXT_FIELDS)}")
        ctx = torch.full((k, len(CONTEXT_FIELDS)), math.nan, dtype=torch.float32, device=self.device)
        for name, value in context.items():
            ctx[:, CONTEXT_FIELDS.index(name)] = self._values_arg(value, f"context[{name!r}]", k)
        return ctx

    def _values_arg(self, value: Any, name: str, k: int) -> torch.Tensor:
        """(K,) float32 values from one number or K numbers."""
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return torch.full((k,), float(value), dtype=torch.float32, device=self.device)
        tensor = self._tensor_arg(value, name, integer=False)
        if tensor.dtype == torch.bool:
            raise TypeError(f"{name} must hold numbers, got dtype torch.bool")
        if tensor.shape[0] != k:
            raise ValueError(f"{name} has {tensor.shape[0]} values for {k} seeds")
        return tensor.to(torch.float32)

    def _int_values(self, value: Any, name: str, k: int, *, low: int, high: int = _INT32_MAX) -> torch.Tensor:
        """(K,) int32 values in [low, high] from one int or K ints."""
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = [int(value)] * k
        tensor = self._tensor_arg(value, name, integer=True)
        if tensor.shape[0] != k:
            raise ValueError(f"{name} has {tensor.shape[0]} values for {k} seeds")
        bad = tensor[(tensor < low) | (tensor > high)]
        if bad.numel():
            raise ValueError(f"{name} must be in {low}..{high}, got {int(bad[0])}")
        return tensor.to(torch.int32)


def _content_problems(state_dict: Mapping[str, Any], prefix: str) -> list[str]:
    """Values a loaded state tensor must not hold (checked before anything is copied).
    One min/max pass per tensor; the offending value is looked for only when there is one."""
    problems = []
    state = state_dict.get(prefix + "state")
    if state is not None:
        for column in ("LIFECYCLE_STATE", "PARENT_STATE"):
            if (bad := _first_outside(state[:, StateColumn[column]], 0, NUM_STATES - 1)) is not None:
                problems.append(f"{prefix}state: seed {bad[0]}'s {column} {bad[1]} is no state id (0..{NUM_STATES - 1})")
        for column in ("EPOCHS_IN_STATE", "ERROR_COUNT"):
            if (bad := _first_outside(state[:, StateColumn[column]], 0)) is not None:
                problems.append(f"{prefix}state: seed {bad[0]}'s {column} is {bad[1]}; it must be >= 0")
    count = state_dict.get(prefix + "history_count")
    if count is not None and (bad := _first_outside(count, 0)) is not None:
        problems.append(f"{prefix}history_count of seed {bad[0]} is {bad[1]}; it must be >= 0")
    history = state_dict.get(prefix + "history")
    if history is not None and (bad := _first_outside(history, 0, NUM_STATES - 1)) is not None:
        problems.append(f"{prefix}history of seed {bad[0]} holds {bad[1]}, which is no state id (0..{NUM_STATES - 1})")
    return problems


def _first_outside(values: torch.Tensor, low: int, high: int | None = None) -> tuple[int, int] | None:
    """(seed, value) of the first of ``values`` (seeds along the first dimension) outside
    [low, high] (no upper bound when None), or None when all lie inside."""
    if not _outside(values, low, high):
        return None
    bad = values < low if high is None else (values < low) | (values > high)
    where = tuple(int(i) for i in torch.nonzero(bad)[0])
    return where[0], int(values[where])


def _outside(values: torch.Tensor, low: int, high: int | None = None) -> bool:
    """Whether any of ``values`` lies outside [low, high] (no upper bound when None)."""
    if values.numel() == 0:
        return False
    smallest, largest = torch.aminmax(values)
    return int(smallest) < low or (high is not None and int(largest) > high)
