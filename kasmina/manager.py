"""The controller's door to the lifecycle: requests, callbacks and a log.

:class:`LifecycleManager` turns single and batched transition requests into the
batched op on an :class:`~kasmina.state.ExtendedStateTensor`, explains refusals with the
spec's messages, calls the callbacks registered for an edge after the transition is
committed, and keeps a bounded log. All its methods may be called from several threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import ops
from ._generated.lifecycle_tables import (
    CONTEXT_FIELDS,
    EDGE_MATRIX,
    REASON_NAMES,
    STATE_NAMES,
    ExtendedLifecycle,
    Reason,
    StateColumn,
)
from .checkpoint import CheckpointManager, TransitionCheckpoint, checkpoint_after_transition, validate_layer_id
from .lifecycle import StateTransition, TransitionContext, context_row, format_reason, state_name
from .policy import LifecyclePolicy, resolve_state
from .state import ExtendedStateTensor

__all__ = ["LifecycleManager", "TransitionCallback", "TransitionRecord", "TransitionResult"]

logger = logging.getLogger("kasmina.lifecycle")
_REASONS = tuple(Reason(code) for code in range(len(REASON_NAMES)))
_NO_CHECKPOINT = TransitionCheckpoint(None, None, None)

TransitionCallback = Callable[[int, ExtendedLifecycle, ExtendedLifecycle, TransitionContext], Any]
BatchVeto = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class TransitionResult:
    """Answer to one request (treat as read-only). Unpacks as ``success, error = result``
    (``error`` is None on success). ``callback_errors`` lists callbacks that raised after the commit (the
    transition stands). With a checkpoint manager, ``checkpoint_id`` names the ``high``
    checkpoint saved after the commit, or ``checkpoint_error`` says why the save failed
    (the transition stands; the seed's ERROR_COUNT was incremented)."""

    success: bool
    code: Reason
    reason: str | None
    seed_id: int
    from_state: int
    to_state: int
    callback_errors: tuple[str, ...] = ()
    checkpoint_id: str | None = None
    checkpoint_error: str | None = None

    def __iter__(self):
        yield self.success
        yield self.reason

    def __bool__(self) -> bool:
        return self.success


@dataclass(slots=True)
class TransitionRecord:
    """One entry of the manager's log (treat as read-only): a single request (``seed_id`` set) or a batched
    call (``seed_id`` None, ``batch_size`` requests, ``reason_counts`` by reason name)."""

    time: float
    seed_id: int | None
    from_state: str | None
    to_state: str | None
    success: bool
    code: str | None
    message: str | None
    context: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    reason_counts: dict[str, int] = field(default_factory=dict)
    callback_errors: tuple[str, ...] = ()


class _SingleRequest:
    """Reusable (1,)-sized request tensors for single requests (used under the lock)."""

    def __init__(self, device: torch.device) -> None:
        # seed id, from, to in one int64 buffer: one NumPy store fills all three.
        self.request = torch.zeros(3, dtype=torch.int64)
        self.ids, self.src, self.dst = self.request[0:1], self.request[1:2], self.request[2:3]
        self.ctx = torch.full((1, len(CONTEXT_FIELDS)), math.nan, dtype=torch.float32)
        self.host = (self.request.numpy(), self.ctx.numpy())
        self.ctx_is_nan = True
        self.device = device
        self.policy: LifecyclePolicy | None = None
        self.policy_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        # The compiled op itself where it serves this device (skips the dispatch in ops).
        direct = ops.compiled_serves(torch.empty(0, device=device)) and device.type == "cpu"
        self.op = torch.ops.kasmina.apply_transitions.default if direct else ops.apply_transitions

    def fill(self, seed_id: int, src: int, dst: int, metrics: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        request, ctx = self.host
        request[:] = (seed_id, src, dst)
        if metrics:
            ctx[0] = context_row(metrics)
            self.ctx_is_nan = False
        elif not self.ctx_is_nan:
            ctx[0] = math.nan
            self.ctx_is_nan = True
        tensors = (self.ids, self.src, self.dst, self.ctx)
        if self.device.type != "cpu":
            tensors = tuple(t.to(self.device) for t in tensors)
        return tensors

    def tensors_of(self, policy: LifecyclePolicy) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's kernel tensors on this device (cached for the current policy)."""
        if policy is not self.policy:
            self.policy, self.policy_tensors = policy, policy.tensors(self.device)
        return self.policy_tensors


class LifecycleManager:
    """Thread-safe front end of an :class:`ExtendedStateTensor`.

    ``checkpoint_manager`` (optional :class:`~kasmina.CheckpointManager`): every committed
    single transition saves a ``high`` checkpoint of the seed (named by ``layer_id``, with
    the blueprint state ``blueprint_state(seed_id)`` returns, when given) and stores its
    number in CHECKPOINT_ID (:func:`kasmina.checkpoint.checkpoint_after_transition`);
    ``policy`` (default: the spec's) sets minimum epochs and guard thresholds;
    ``history_limit`` bounds the log of :meth:`get_transition_history`; ``follow``, the
    owner's own follow-up of every committed transition (called like a callback; the
    layer allocates or frees the seed's blueprint there), runs before the checkpoint is
    saved and before the callbacks, so that both see the seed as it now is; ``veto``
    (the owner's rule beyond the spec's guards, for batches: single requests are checked
    by the owner before they get here) takes a batch's (K,) seed ids, from and to states
    and (K, F) context and returns the (K,) requests to refuse with GUARD_FAILED.
    """

    def __init__(
        self,
        state: ExtendedStateTensor,
        checkpoint_manager: Any = None,
        policy: LifecyclePolicy | None = None,
        *,
        history_limit: int = 1000,
        layer_id: str = "layer",
        blueprint_state: Callable[[int], Mapping[str, torch.Tensor] | None] | None = None,
        follow: TransitionCallback | None = None,
        veto: BatchVeto | None = None,
    ) -> None:
        if not isinstance(state, ExtendedStateTensor):
            raise TypeError(f"state must be an ExtendedStateTensor, got {type(state).__name__}")
        if checkpoint_manager is not None:
            if not isinstance(checkpoint_manager, CheckpointManager):
                raise TypeError(f"checkpoint_manager must be a CheckpointManager, got {type(checkpoint_manager).__name__}")
            validate_layer_id(layer_id)
        self.layer_id = layer_id
        self.blueprint_state = blueprint_state
        if history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, got {history_limit}")
        self.state = state
        self.checkpoint_manager = checkpoint_manager
        self._policy = policy if policy is not None else LifecyclePolicy.default()
        self._validator = StateTransition(self._policy)
        self._lock = threading.Lock()
        self._callbacks: dict[tuple[int, int], list[TransitionCallback]] = {}
        self._follow = follow
        self._veto = veto
        self._log: deque[TransitionRecord] = deque(maxlen=history_limit)
        self._single: _SingleRequest | None = None

    # ---- policy ---------------------------------------------------------------------

    @property
    def policy(self) -> LifecyclePolicy:
        """The policy requests are judged under."""
        return self._policy

    def set_policy(self, policy: LifecyclePolicy) -> None:
        """Judge later requests under ``policy``."""
        if not isinstance(policy, LifecyclePolicy):
            raise TypeError(f"policy must be a LifecyclePolicy, got {type(policy).__name__}")
        with self._lock:
            self._policy = policy
            self._validator = StateTransition(policy)

    # ---- requests -------------------------------------------------------------------

    def request_transition(
        self,
        seed_id: int,
        from_state: Any,
        to_state: Any,
        context: TransitionContext | Mapping[str, Any] | None = None,
    ) -> TransitionResult:
        """Ask for ``seed_id: from_state -> to_state``. ``context`` is a
        :class:`TransitionContext` (its ``performance_metrics`` feed the guards; epochs
        and error count are read from the state tensor, the source of truth) or a dict
        of metrics. A seed id out of range is answered with UNKNOWN_SEED; unknown state
        names or ids raise ValueError."""
        if type(seed_id) is not int:
            if isinstance(seed_id, bool) or not isinstance(seed_id, (int, np.integer)):
                raise TypeError(f"seed_id must be an int, got {seed_id!r}")
            seed_id = int(seed_id)
        src, dst = resolve_state(from_state), resolve_state(to_state)
        metrics, given = self._metrics_of(context, seed_id, dst)
        state_t = self.state._buffers["state"]
        num_seeds = state_t.shape[0]
        if not 0 <= seed_id < num_seeds:
            code = Reason.UNKNOWN_SEED
            message = format_reason(code, seed_id=seed_id, num_seeds=num_seeds)
            return self._finish_single(seed_id, src, dst, code, message, metrics, given)
        with self._lock:
            buffers = self.state._buffers
            state_t = buffers["state"]
            device = state_t.device
            single = self._single
            if single is None or single.device != device:
                single = self._single = _SingleRequest(device)
            ids, srcs, dsts, ctx = single.fill(seed_id, src, dst, metrics)
            validator = self._validator
            min_epochs, params = single.tensors_of(self._policy)
            codes = single.op(state_t, buffers["history"], buffers["history_count"], ids, srcs, dsts, ctx, min_epochs, params)
            code = _REASONS[codes.item()]
            row = None if code is Reason.OK else state_t[seed_id].tolist()
        message = None if row is None else self._explain(code, seed_id, src, dst, row, metrics, validator, num_seeds)
        return self._finish_single(seed_id, src, dst, code, message, metrics, given)

    def request_transitions(
        self,
        seed_ids: Any,
        from_states: Any,
        to_states: Any,
        context: Mapping[str, Any] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Judge a batch of requests (see :meth:`ExtendedStateTensor.apply_transitions`)
        and return int32 (K,) reason codes. Logs one summary record; callbacks registered
        for an edge are called for each seed of the batch that took it."""
        with self._lock:
            if self._veto is None:
                codes = self.state.apply_transitions(seed_ids, from_states, to_states, context, policy=self._policy)
            else:  # the arguments as tensors once, for the veto, the judgement and the callbacks
                seed_ids, from_states, to_states, context = self._batch_args(seed_ids, from_states, to_states, context)
                codes = self._apply_with_veto(seed_ids, from_states, to_states, context)
        counts = torch.bincount(codes.to(torch.int64), minlength=len(REASON_NAMES)).tolist()
        errors: list[str] = []
        if (self._callbacks or self._follow) and counts[Reason.OK]:
            errors = self._batch_callbacks(seed_ids, from_states, to_states, context, codes)
        self._log.append(
            TransitionRecord(
                time=time.time(),
                seed_id=None,
                from_state=None,
                to_state=None,
                success=counts[Reason.OK] == codes.shape[0],
                code=None,
                message=f"batch of {codes.shape[0]} requests, {counts[Reason.OK]} accepted",
                batch_size=codes.shape[0],
                reason_counts={REASON_NAMES[i]: n for i, n in enumerate(counts) if n},
                callback_errors=tuple(errors),
            )
        )
        return codes

    def _batch_args(
        self, seed_ids: Any, from_states: Any, to_states: Any, context: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's arguments as tensors: int64 (K,) ids, from and to states, (K, F) context."""
        st = self.state
        ids = st._tensor_arg(seed_ids, "seed_ids", integer=True).to(torch.int64)
        k = ids.shape[0]
        src = st._state_arg(from_states, "from_states", k).to(torch.int64)
        dst = st._state_arg(to_states, "to_states", k).to(torch.int64)
        return ids, src, dst, st._context_arg(context, k)

    def _apply_with_veto(self, ids: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """apply_transitions for the requests the owner's veto lets through; the vetoed
        ones get GUARD_FAILED and change nothing (a seed named twice is left to the
        judgement, which refuses both as duplicates)."""
        st = self.state
        k = ids.shape[0]
        vetoed = self._veto(ids, src, dst, ctx)  # type: ignore[misc]
        if k > 1 and vetoed.any():
            _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
            vetoed = vetoed & (counts[inverse] == 1)
        if not vetoed.any():
            return st.apply_transitions(ids, src, dst, ctx, policy=self._policy)
        codes = torch.full((k,), int(Reason.GUARD_FAILED), dtype=torch.int32, device=ids.device)
        keep = ~vetoed
        codes[keep] = st.apply_transitions(ids[keep], src[keep], dst[keep], ctx[keep], policy=self._policy)
        return codes

    def step_epoch(self) -> None:
        """Advance every seed's lifecycle epoch counter by one."""
        with self._lock:
            self.state.step_epoch()

    # ---- callbacks and log ----------------------------------------------------------

    def register_transition_callback(self, from_state: Any, to_state: Any, fn: TransitionCallback) -> None:
        """Call ``fn(seed_id, from_state, to_state, context)`` after every committed
        transition ``from_state -> to_state`` (which must be an edge of the lifecycle).
        An exception in ``fn`` is logged and reported; the transition stands."""
        src, dst = resolve_state(from_state), resolve_state(to_state)
        if EDGE_MATRIX[src][dst] < 0:
            raise ValueError(f"no transition {STATE_NAMES[src]} -> {STATE_NAMES[dst]} in the lifecycle")
        if not callable(fn):
            raise TypeError(f"callback must be callable, got {fn!r}")
        with self._lock:
            self._callbacks.setdefault((src, dst), []).append(fn)

    def get_transition_history(self, seed_id: int | None = None, limit: int = 100) -> list[TransitionRecord]:
        """The newest ``limit`` log records, oldest first; with ``seed_id`` only that
        seed's single requests (its committed transitions are also in the state tensor's
        own history, :meth:`ExtendedStateTensor.get_transition_history`)."""
        with self._lock:
            records = list(self._log)
        if seed_id is not None:
            records = [r for r in records if r.seed_id == seed_id]
        return records[-limit:] if limit > 0 else []

    # ---- internals ------------------------------------------------------------------

    @staticmethod
    def _explain(code: Reason, seed_id: int, src: int, dst: int, row: list[int], metrics: dict[str, Any],
                 validator: StateTransition, num_seeds: int) -> str:
        """The message of a refused single request, from the seed's row as it is."""
        if code is not Reason.GUARD_FAILED:  # no guard detail needed: skip building a context
            return format_reason(
                code,
                seed_id=seed_id,
                num_seeds=num_seeds,
                from_state=STATE_NAMES[src],
                to_state=STATE_NAMES[dst],
                actual_state=state_name(row[StateColumn.LIFECYCLE_STATE]),
                epochs_in_state=row[StateColumn.EPOCHS_IN_STATE],
                min_epochs=validator.policy.min_epochs[src],
            )
        seen = TransitionContext.from_row(seed_id, dst, row, metrics)
        return validator.message(code, seed_id, src, dst, seen, num_seeds=num_seeds)

    @staticmethod
    def _metrics_of(context: Any, seed_id: int, dst: int) -> tuple[dict[str, Any], TransitionContext | None]:
        if context is None:
            return {}, None
        if isinstance(context, TransitionContext):
            if context.seed_id != seed_id:
                raise ValueError(f"the context is for seed {context.seed_id}, the request for seed {seed_id}")
            if int(context.target_state) != dst:
                raise ValueError(
                    f"the context targets {context.target_state.name}, the request {STATE_NAMES[dst]}"
                )
            return context.performance_metrics, context
        if isinstance(context, Mapping):
            return dict(context), None
        raise TypeError(f"context must be a TransitionContext, a dict of metrics or None, got {type(context).__name__}")

    def _finish_single(
        self, seed_id: int, src: int, dst: int, code: Reason, message: str | None, metrics: dict[str, Any],
        given: TransitionContext | None,
    ) -> TransitionResult:
        errors: tuple[str, ...] = ()
        saved = _NO_CHECKPOINT
        if code == Reason.OK and (
            self.checkpoint_manager is not None or self._follow is not None or (src, dst) in self._callbacks
        ):
            context = given if given is not None else TransitionContext(seed_id, src, dst, performance_metrics=metrics)
            follow_errors = self._call([self._follow] if self._follow else [], seed_id, src, dst, context)
            if self.checkpoint_manager is not None:  # after the follow-up, before the callbacks (they see CHECKPOINT_ID)
                saved = checkpoint_after_transition(
                    self.checkpoint_manager, self.layer_id, self.state, seed_id, self._lock, self.blueprint_state
                )
            errors = (*follow_errors, *self._after_commit(seed_id, src, dst, context))
        self._log.append(
            TransitionRecord(
                time=time.time(),
                seed_id=seed_id,
                from_state=STATE_NAMES[src],
                to_state=STATE_NAMES[dst],
                success=code == Reason.OK,
                code=code.name,
                message=message,
                context=dict(metrics),
                callback_errors=errors,
            )
        )
        return TransitionResult(code == Reason.OK, code, message, seed_id, src, dst, errors, saved.checkpoint_id, saved.error)

    def _after_commit(self, seed_id: int, src: int, dst: int, context: TransitionContext) -> list[str]:
        """Work that follows a committed single transition (called outside the lock,
        when the edge has callbacks or a checkpoint manager is set): the edge's
        callbacks. Returns the errors of callbacks that raised."""
        return self._run_callbacks(seed_id, src, dst, context)

    def _run_callbacks(self, seed_id: int, src: int, dst: int, context: TransitionContext) -> list[str]:
        return self._call(list(self._callbacks.get((src, dst), ())), seed_id, src, dst, context)

    @staticmethod
    def _call(callbacks: list[TransitionCallback], seed_id: int, src: int, dst: int, context: TransitionContext) -> list[str]:
        """Call each of ``callbacks``; the errors of those that raised (logged too)."""
        errors = []
        for fn in callbacks:
            try:
                fn(seed_id, ExtendedLifecycle(src), ExtendedLifecycle(dst), context)
            except Exception as exc:  # a callback must not undo or corrupt the transition
                logger.exception("transition callback %r failed for seed %d %s -> %s", fn, seed_id,
                                 STATE_NAMES[src], STATE_NAMES[dst])
                errors.append(f"seed {seed_id}: {getattr(fn, '__qualname__', repr(fn))}: {type(exc).__name__}: {exc}")
        return errors

    def _batch_callbacks(self, seed_ids: Any, from_states: Any, to_states: Any, context: Any,
                         codes: torch.Tensor) -> list[str]:
        """Callbacks for the accepted requests of a batch whose edge has callbacks."""
        ids, src, dst, ctx = self._batch_args(seed_ids, from_states, to_states, context)
        follow = [self._follow] if self._follow else []
        errors: list[str] = []
        for k in torch.nonzero(codes == Reason.OK).flatten().tolist():
            edge_src, edge_dst = int(src[k]), int(dst[k])
            callbacks = follow + list(self._callbacks.get((edge_src, edge_dst), ()))
            if not callbacks:
                continue
            metrics = {
                name: value for name, value in zip(CONTEXT_FIELDS, ctx[k].tolist(), strict=True) if not math.isnan(value)
            }
            seed = int(ids[k])
            context = TransitionContext(seed, edge_src, edge_dst, performance_metrics=metrics)
            errors += self._call(callbacks, seed, edge_src, edge_dst, context)
        return errors
