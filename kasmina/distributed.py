"""Keeping lifecycle state identical on every rank of a ``torch.distributed`` job.

Kasmina runs under the engine users already have — ``torch.distributed`` with DDP
(gloo on CPU, NCCL on GPUs). DDP keeps *parameters* in sync; lifecycle state (the
``ExtendedStateTensor`` buffers, alphas, which seeds own a blueprint) changes only at
epoch boundaries, by commands. The protocol at every epoch boundary is:

1. every rank measures its metrics; :meth:`LifecycleSync.reduce_metrics` all-reduces
   them (one collective for sums/means, one more only when max/min are asked for), so
   the controller decides on the global numbers, not on its own shard;
2. the controller's rank decides a batch of :class:`SeedCommand`;
3. :meth:`LifecycleSync.broadcast_commands` sends the whole batch as **one** int32
   tensor (one ``broadcast`` per boundary, never one per seed) and every rank decodes
   the same :class:`CommandBatch`;
4. every rank applies it in the same order (:func:`apply_commands`, or
   :func:`kasmina.distributed_layer.apply_layer_commands` for a layer), so the state
   tensors stay bitwise identical. :meth:`LifecycleSync.check_consistency` proves it.

Wire format (int32 words): an 8-word header ``[magic, version, spec hash, boundary
sequence, K total, K in this message, F, row width]`` followed by ``capacity`` rows of
``9 + F`` words ``[kind, seed, from, to, blueprint, strategy, init seed, call, fields,
context bits...]`` (``call`` groups the rows of one batched call, ``fields`` is the
bitmask of context fields the command carries); the
float32 context travels as its bit pattern (``view(int32)``), so NaN ("metric not
supplied") and every value arrive bit for bit. Receivers must know a collective's size
before it runs; a fixed-capacity padded buffer makes the common case one collective
(a header-then-payload scheme would pay two latency-bound collectives every epoch, and
a few KB cost the same as a few bytes). A batch larger than ``capacity`` sends its
remaining rows in one follow-up broadcast sized from the header. The header's spec
hash and boundary sequence catch ranks built from different specs or out of step.

Collective failures (a peer that died, or hung past the process-group timeout) are
raised as :class:`DistributedSyncError` naming the rank, the operation and the boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._generated.lifecycle_tables import (
    CONTEXT_FIELDS,
    GRAFTING_STRATEGY_NAMES,
    NUM_STATES,
    SPEC_SHA256,
    ExtendedLifecycle,
    Reason,
)

__all__ = [
    "CommandBatch",
    "CommandKind",
    "DistributedSyncError",
    "LifecycleSync",
    "RankDivergenceError",
    "SeedCommand",
    "apply_commands",
    "named_state_tensors",
    "tensor_digest",
]

_T = TypeVar("_T")

_MAGIC = 0x4B534D43  # "KSMC"
_WIRE_VERSION = 1
_HEADER_WORDS = 8
_FIXED_COLUMNS = 9
_SPEC_HASH32 = int(SPEC_SHA256[:7], 16)  # 28 bits: fits a positive int32
_NUM_FIELDS = len(CONTEXT_FIELDS)
_INT_FIELDS = ("kinds", "seed_ids", "from_states", "to_states", "blueprint_ids", "strategies", "init_seeds", "calls", "fields")
_METRIC_OPS = ("mean", "sum", "max", "min")
_INT32_MAX = 2**31 - 1
_CALL_BASE = 1 << 30  # calls of commands without an explicit one (one call each)


class DistributedSyncError(RuntimeError):
    """A collective of the lifecycle protocol failed or the ranks are out of step."""


class RankDivergenceError(DistributedSyncError):
    """Ranks hold different lifecycle state (the message names the tensors and ranks)."""


class CommandKind(IntEnum):
    """What a broadcast command asks a seed to do.

    TRANSITION … RECYCLE are the layer's commands (``process_lifecycle_command``);
    REQUEST is a row of a batched ``LifecycleManager.request_transitions`` call and
    REPORT a row of ``ChunkedKasminaLayer.report_metrics`` — how a controller that acts
    on the layer directly is recorded and replayed (:mod:`kasmina.distributed_layer`)."""

    TRANSITION = 0
    GERMINATE = 1
    CANCEL = 2
    ROLLBACK = 3
    RECYCLE = 4
    REQUEST = 5
    REPORT = 6


# The state each kind moves to (TRANSITION names its own target).
_KIND_TARGET = {
    CommandKind.GERMINATE: int(ExtendedLifecycle.GERMINATED),
    CommandKind.CANCEL: int(ExtendedLifecycle.CANCELLED),
    CommandKind.ROLLBACK: int(ExtendedLifecycle.ROLLED_BACK),
    CommandKind.RECYCLE: int(ExtendedLifecycle.DORMANT),
}


def _strategy_id(strategy: int | str) -> int:
    if isinstance(strategy, str):
        if strategy not in GRAFTING_STRATEGY_NAMES:
            raise ValueError(f"unknown grafting strategy {strategy!r}; known: {', '.join(GRAFTING_STRATEGY_NAMES)}")
        return GRAFTING_STRATEGY_NAMES.index(strategy)
    if not -1 <= int(strategy) < len(GRAFTING_STRATEGY_NAMES):
        raise ValueError(f"grafting strategy id {strategy} out of range -1..{len(GRAFTING_STRATEGY_NAMES) - 1}")
    return int(strategy)


@dataclass(frozen=True)
class SeedCommand:
    """One lifecycle command for one seed, as the controller decides it.

    ``from_state`` is the state the controller saw (optimistic concurrency: a seed that
    moved meanwhile answers STALE_FROM_STATE). ``context`` maps names of
    ``CONTEXT_FIELDS`` to numbers; fields left out are NaN (never let a guard pass).
    ``call`` groups commands replayed as one batched call (-1: a call of its own).
    Build commands with the class methods rather than by hand.
    """

    kind: CommandKind
    seed_id: int
    from_state: int
    to_state: int
    blueprint_id: int = -1
    strategy: int = -1
    init_seed: int = 0
    context: Mapping[str, float] = field(default_factory=dict)
    call: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CommandKind(self.kind))
        for name in ("from_state", "to_state"):
            value = int(getattr(self, name))
            if not 0 <= value < NUM_STATES:
                raise ValueError(f"{name}={value} is no state id (0..{NUM_STATES - 1})")
            object.__setattr__(self, name, value)
        if int(self.seed_id) < 0:
            raise ValueError(f"seed_id={self.seed_id} must be >= 0")
        if not 0 <= int(self.init_seed) <= _INT32_MAX:
            raise ValueError(f"init_seed={self.init_seed} must be in 0..{_INT32_MAX}")
        if not -1 <= int(self.call) <= _INT32_MAX:
            raise ValueError(f"call={self.call} must be -1 or in 0..{_INT32_MAX}")
        unknown = sorted(set(self.context) - set(CONTEXT_FIELDS))
        if unknown:
            raise ValueError(f"unknown context field(s) {unknown}; known: {', '.join(CONTEXT_FIELDS)}")
        object.__setattr__(self, "strategy", _strategy_id(self.strategy))

    @classmethod
    def transition(cls, seed_id: int, from_state: int, to_state: int, context: Mapping[str, float] | None = None) -> SeedCommand:
        """Move ``seed_id`` along the edge ``from_state -> to_state``, judged on ``context``."""
        return cls(CommandKind.TRANSITION, seed_id, from_state, to_state, context=dict(context or {}))

    @classmethod
    def germinate(cls, seed_id: int, blueprint_id: int, strategy: int | str = 0, init_seed: int | None = None) -> SeedCommand:
        """Allocate blueprint ``blueprint_id`` in the DORMANT seed and move it to GERMINATED.

        Every rank initialises the blueprint's parameters from the same ``init_seed`` (by
        default drawn from this process's torch RNG — the controller's, since commands are
        built there), so blueprint weights are identical everywhere without a broadcast."""
        if int(blueprint_id) < 0:
            raise ValueError(f"blueprint_id={blueprint_id} must be >= 0 to germinate")
        if init_seed is None:
            init_seed = int(torch.randint(0, _INT32_MAX, (1,)).item())
        return cls(
            CommandKind.GERMINATE,
            seed_id,
            ExtendedLifecycle.DORMANT,
            _KIND_TARGET[CommandKind.GERMINATE],
            blueprint_id=blueprint_id,
            strategy=strategy,
            init_seed=init_seed,
        )

    @classmethod
    def report(cls, seed_id: int, state: int, metrics: Mapping[str, float], call: int = -1) -> SeedCommand:
        """Tell the seed's layer ``metrics`` (context fields; NaN clears one), as
        ``report_metrics`` does; ``state`` is the seed's current state (not checked)."""
        return cls(CommandKind.REPORT, seed_id, state, state, context=dict(metrics), call=call)

    @classmethod
    def cancel(cls, seed_id: int, from_state: int) -> SeedCommand:
        """Stop the seed (to CANCELLED)."""
        return cls(CommandKind.CANCEL, seed_id, from_state, _KIND_TARGET[CommandKind.CANCEL])

    @classmethod
    def rollback(cls, seed_id: int, from_state: int) -> SeedCommand:
        """Emergency revert of the seed (to ROLLED_BACK)."""
        return cls(CommandKind.ROLLBACK, seed_id, from_state, _KIND_TARGET[CommandKind.ROLLBACK])

    @classmethod
    def recycle(cls, seed_id: int, from_state: int) -> SeedCommand:
        """Return a retired seed's slot to DORMANT (after its embargo)."""
        return cls(CommandKind.RECYCLE, seed_id, from_state, _KIND_TARGET[CommandKind.RECYCLE])


@dataclass(frozen=True)
class CommandBatch:
    """K commands as tensors: ``kinds``, ``seed_ids``, ``from_states``, ``to_states``,
    ``blueprint_ids``, ``strategies``, ``init_seeds``, ``calls``, ``fields`` (K,) int32 and ``context`` (K, F) float32 in
    ``CONTEXT_FIELDS`` order (NaN: not supplied). Command order is application order."""

    kinds: Tensor
    seed_ids: Tensor
    from_states: Tensor
    to_states: Tensor
    blueprint_ids: Tensor
    strategies: Tensor
    init_seeds: Tensor
    calls: Tensor
    fields: Tensor
    context: Tensor

    def __post_init__(self) -> None:
        k = self.kinds.shape[0] if self.kinds.dim() == 1 else -1
        for name in _INT_FIELDS:
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.shape != (k,):
                raise ValueError(f"CommandBatch.{name} must be a ({k},) int32 tensor, got {tuple(t.shape)} {t.dtype}")
        if self.context.dtype != torch.float32 or self.context.shape != (k, _NUM_FIELDS):
            raise ValueError(
                f"CommandBatch.context must be a ({k}, {_NUM_FIELDS}) float32 tensor, "
                f"got {tuple(self.context.shape)} {self.context.dtype}"
            )

    def __len__(self) -> int:
        return int(self.kinds.shape[0])

    @classmethod
    def empty(cls) -> CommandBatch:
        """A batch of no commands."""
        z = torch.zeros(0, dtype=torch.int32)
        return cls(*[z] * len(_INT_FIELDS), context=torch.zeros(0, _NUM_FIELDS, dtype=torch.float32))

    @classmethod
    def from_commands(cls, commands: Iterable[SeedCommand]) -> CommandBatch:
        """Pack commands (in order) into tensors."""
        cmds = list(commands)
        if not cmds:
            return cls.empty()
        for i, c in enumerate(cmds):
            if not isinstance(c, SeedCommand):
                raise TypeError(f"command {i} is a {type(c).__name__}, not a SeedCommand")
        ints = torch.tensor(
            [
                [
                    int(c.kind),
                    c.seed_id,
                    c.from_state,
                    c.to_state,
                    c.blueprint_id,
                    c.strategy,
                    c.init_seed,
                    c.call if c.call >= 0 else _CALL_BASE + i,
                    sum(1 << CONTEXT_FIELDS.index(n) for n in c.context),
                ]
                for i, c in enumerate(cmds)
            ],
            dtype=torch.int64,
        )
        if int(ints.max()) > torch.iinfo(torch.int32).max:
            raise ValueError(f"a command field exceeds int32: {int(ints.max())}")
        ints = ints.to(torch.int32)
        ctx = torch.full((len(cmds), _NUM_FIELDS), float("nan"), dtype=torch.float32)
        for i, c in enumerate(cmds):
            for name, value in c.context.items():
                ctx[i, CONTEXT_FIELDS.index(name)] = float(value)
        return cls(*ints.unbind(1), context=ctx)

    @classmethod
    def build(
        cls,
        kind: CommandKind,
        seed_ids: Tensor,
        from_states: Tensor,
        to_states: Tensor,
        context: Tensor | None = None,
        fields: int = 0,
        call: int = 0,
    ) -> CommandBatch:
        """K rows of one ``kind`` and one ``call`` from tensors (no per-seed Python):
        ``context`` (K, F) in ``CONTEXT_FIELDS`` order (None: all NaN) carrying the
        fields in the ``fields`` bitmask."""
        ids = seed_ids.detach().reshape(-1).to("cpu", torch.int64)
        k = ids.shape[0]
        if k and int(ids.min()) < 0:
            raise ValueError(f"seed ids must be >= 0, got {int(ids.min())}")

        def column(values: Tensor | int) -> Tensor:
            return torch.as_tensor(values).detach().to("cpu", torch.int32).expand(k).contiguous()

        ctx = torch.full((k, _NUM_FIELDS), float("nan")) if context is None else context.detach().to("cpu", torch.float32)
        if ctx.shape != (k, _NUM_FIELDS):
            raise ValueError(f"context must be ({k}, {_NUM_FIELDS}), got {tuple(ctx.shape)}")
        minus = column(-1)
        return cls(
            column(int(kind)),
            ids.to(torch.int32),
            column(from_states),
            column(to_states),
            minus,
            minus,
            column(0),
            column(call),
            column(fields),
            context=ctx.contiguous(),
        )

    @classmethod
    def concat(cls, batches: Sequence[CommandBatch]) -> CommandBatch:
        """The batches' commands one after the other. Call ids are renumbered (in order,
        from 0) so that each batch's calls stay its own: two batches built or packed
        apart may reuse the same ids."""
        if not batches:
            return cls.empty()
        calls, offset = [], 0
        for b in batches:
            if b.calls.numel():
                _, dense = torch.unique_consecutive(b.calls, return_inverse=True)
                calls.append((dense + offset).to(torch.int32))
                offset += int(dense[-1]) + 1
        joined = {n: torch.cat([getattr(b, n) for b in batches]) for n in _INT_FIELDS}
        joined["calls"] = torch.cat(calls) if calls else joined["calls"]
        return cls(*(joined[n] for n in _INT_FIELDS), context=torch.cat([b.context for b in batches]))

    def to_commands(self) -> list[SeedCommand]:
        """The commands as objects (for APIs that take one command at a time)."""
        ints = torch.stack([getattr(self, n) for n in _INT_FIELDS], 1).tolist()
        ctx = self.context.tolist()
        out = []
        for (kind, seed, frm, to, bp, strat, init, call, fields), row in zip(ints, ctx, strict=True):
            context = {n: v for i, (n, v) in enumerate(zip(CONTEXT_FIELDS, row, strict=True)) if fields >> i & 1}
            out.append(SeedCommand(CommandKind(kind), seed, frm, to, bp, strat, init, context, call))
        return out

    def select(self, mask: Tensor) -> CommandBatch:
        """The commands where ``mask`` (K,) bool is true, in order."""
        return CommandBatch(*(getattr(self, n)[mask] for n in _INT_FIELDS), context=self.context[mask])

    def _rows(self) -> Tensor:
        """(K, 7 + F) int32 rows of the wire format (context as float32 bits)."""
        fixed = torch.stack([getattr(self, n) for n in _INT_FIELDS], 1)
        return torch.cat([fixed, self.context.contiguous().view(torch.int32)], 1)

    @classmethod
    def _from_rows(cls, rows: Tensor) -> CommandBatch:
        rows = rows.cpu()
        cols = rows[:, :_FIXED_COLUMNS].unbind(1)
        context = rows[:, _FIXED_COLUMNS:].contiguous().view(torch.float32)
        return cls(*(c.contiguous() for c in cols), context=context)

    @classmethod
    def decode(cls, message: Tensor, rest: Tensor | None, sequence: int, rank: int = 0) -> CommandBatch:
        """The batch in wire messages made by :meth:`encode`; raises
        :class:`DistributedSyncError` when the header is foreign, from another spec or
        another epoch boundary than ``sequence``."""
        header = message[:_HEADER_WORDS].tolist()
        _check_header(header, sequence, rank)
        total, first, width = header[4], header[5], header[7]
        if message.numel() < _HEADER_WORDS + first * width:
            raise DistributedSyncError(f"rank {rank}: command message holds fewer rows than its header says ({header})")
        rows = message[_HEADER_WORDS : _HEADER_WORDS + first * width].reshape(first, width)
        if total > first:
            if rest is None or rest.numel() != (total - first) * width:
                raise DistributedSyncError(f"rank {rank}: {total - first} overflow rows announced but not received")
            rows = torch.cat([rows, rest.reshape(total - first, width)])
        return cls._from_rows(rows)

    @staticmethod
    def overflow_words(message: Tensor) -> int:
        """Words of the follow-up message announced by a first message's header."""
        header = message[:_HEADER_WORDS].tolist()
        return max(header[4] - header[5], 0) * (_FIXED_COLUMNS + _NUM_FIELDS)

    def encode(self, sequence: int, capacity: int) -> tuple[Tensor, Tensor | None]:
        """The wire messages: a padded ``(8 + capacity * W,)`` int32 tensor and, when the
        batch exceeds ``capacity``, the remaining rows as a second tensor."""
        k = len(self)
        width = _FIXED_COLUMNS + _NUM_FIELDS
        first = min(k, capacity)
        message = torch.zeros(_HEADER_WORDS + capacity * width, dtype=torch.int32)
        message[:_HEADER_WORDS] = torch.tensor(
            [_MAGIC, _WIRE_VERSION, _SPEC_HASH32, sequence, k, first, _NUM_FIELDS, width], dtype=torch.int32
        )
        rows = self._rows()
        message[_HEADER_WORDS : _HEADER_WORDS + first * width] = rows[:first].reshape(-1)
        rest = rows[first:].reshape(-1).contiguous() if k > capacity else None
        return message, rest


def _check_header(header: list[int], sequence: int, rank: int) -> None:
    magic, version, spec, seq, k, first, fields, width = header
    if magic != _MAGIC or version != _WIRE_VERSION:
        raise DistributedSyncError(
            f"rank {rank}: the command message is not Kasmina wire format v{_WIRE_VERSION} "
            f"(magic {magic:#x}, version {version}); ranks called different collectives"
        )
    if spec != _SPEC_HASH32:
        raise DistributedSyncError(
            f"rank {rank}: the controller runs lifecycle spec {spec:07x}…, this rank {_SPEC_HASH32:07x}…; "
            "every rank must run the same kasmina build"
        )
    if seq != sequence:
        raise DistributedSyncError(
            f"rank {rank}: out of step with the controller: it sent epoch boundary {seq}, this rank is at {sequence}"
        )
    if fields != _NUM_FIELDS or width != _FIXED_COLUMNS + _NUM_FIELDS or not 0 <= first <= k:
        raise DistributedSyncError(f"rank {rank}: malformed command header {header}")


def _comm_device(group: Any) -> torch.device:
    """Where collective buffers of ``group`` must live (CUDA for NCCL, else CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tensor_digest(t: Tensor) -> int:
    """A 63-bit digest of a tensor's dtype, shape and exact bytes (bitwise identity check)."""
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")  # 0-dim too
    return int.from_bytes(h.digest(), "little") >> 1


def named_state_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``module``'s ``state_dict`` (parameters, buffers and extra state
    that is a tensor) by name: what must be identical on every rank."""
    return {k: v for k, v in module.state_dict(keep_vars=False).items() if isinstance(v, Tensor)}


class LifecycleSync:
    """The per-epoch-boundary collectives of the lifecycle protocol on one process group.

    Create one on every rank with the same arguments after ``init_process_group``.
    Without an initialised process group (or with world size 1) every method is the
    identity, so one training script runs unchanged in a single process.

    Args:
        group: the process group (default: the world).
        controller_rank: the rank whose controller decides commands (global rank).
        capacity: commands carried by the single per-boundary broadcast; larger batches
            cost one more broadcast. Must be equal on every rank.
        timeout: how long :meth:`barrier` waits before naming the ranks that did not
            arrive (collectives themselves use the process group's timeout).
    """

    def __init__(
        self,
        group: Any = None,
        controller_rank: int = 0,
        capacity: int = 256,
        timeout: timedelta = timedelta(seconds=60),
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.group = group
        self.capacity = int(capacity)
        self.timeout = timeout
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        if not 0 <= controller_rank < (dist.get_world_size() if self.active else 1):
            raise ValueError(f"controller_rank={controller_rank} is not a rank of this job (world size {self.world_size})")
        self.controller_rank = int(controller_rank)
        self.device = _comm_device(group) if self.active else torch.device("cpu")
        self.sequence = 0
        self._buffers: dict[tuple[str, torch.dtype, int], Tensor] = {}

    @property
    def is_controller(self) -> bool:
        """True on the rank whose controller decides commands."""
        return (dist.get_rank() if self.active else 0) == self.controller_rank

    @property
    def distributed(self) -> bool:
        """True when there is more than one rank to talk to."""
        return self.active and self.world_size > 1

    def _collective(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except DistributedSyncError:
            raise
        except RuntimeError as exc:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
            raise DistributedSyncError(
                f"rank {self.rank}/{self.world_size}: {what} at epoch boundary {self.sequence} failed: a peer rank died, "
                f"hung past the process-group timeout, or called a different collective ({exc})"
            ) from exc

    # ---- metrics ------------------------------------------------------------------
    def reduce_metrics(
        self, metrics: Mapping[str, Tensor | float], ops: str | Mapping[str, str] = "mean", *, inplace: bool = False
    ) -> dict[str, Tensor]:
        """All-reduce named metric tensors across ranks (call on every rank, same names
        and shapes). ``ops`` is ``mean``/``sum``/``max``/``min`` for all, or per name.
        All sums and means travel in one packed ``all_reduce``; max and min share a
        second one only when asked for. NaN (a metric not measured) stays NaN through
        mean and sum. Results are identical on every rank.

        ``inplace=True`` writes the results into the given tensors and returns them (a
        single contiguous floating tensor on the collective's device is reduced where it
        lies, with no copy); otherwise new tensors of each input's dtype and device."""
        names = list(metrics)
        op_of = {n: (ops if isinstance(ops, str) else ops.get(n, "mean")) for n in names}
        bad = {n: o for n, o in op_of.items() if o not in _METRIC_OPS}
        if bad:
            raise ValueError(f"unknown reduction(s) {bad}; use one of {', '.join(_METRIC_OPS)}")
        if not isinstance(ops, str):
            extra = sorted(set(ops) - set(names))
            if extra:
                raise ValueError(f"reduction given for unknown metric(s) {extra}")
        values = {n: torch.as_tensor(metrics[n]) for n in names}
        for n, v in values.items():
            if v.is_complex():
                raise TypeError(f"metric {n!r}: complex tensors cannot be reduced")
            if inplace and not isinstance(metrics[n], Tensor):
                raise TypeError(f"metric {n!r}: inplace=True needs tensors, got {type(metrics[n]).__name__}")
            if op_of[n] == "mean" and not v.is_floating_point():
                raise TypeError(f"metric {n!r}: a mean of {v.dtype} values would be truncated; pass floats or use sum")
        if not self.distributed:
            return values if inplace else {n: v.clone() for n, v in values.items()}
        out: dict[str, Tensor] = {}
        additive = [n for n in names if op_of[n] in ("mean", "sum")]
        extreme = [n for n in names if op_of[n] in ("max", "min")]
        if additive:
            out.update(self._packed_all_reduce(additive, values, op_of, dist.ReduceOp.SUM, inplace))
        if extreme:
            out.update(self._packed_all_reduce(extreme, values, op_of, dist.ReduceOp.MAX, inplace))
        return {n: out[n] if inplace else out[n].to(values[n].dtype).to(values[n].device) for n in names}

    def _packed_all_reduce(
        self, names: list[str], values: Mapping[str, Tensor], op_of: Mapping[str, str], op: Any, inplace: bool
    ) -> dict[str, Tensor]:
        """One all_reduce of ``names`` packed in a persistent buffer (gloo reduces into
        fresh memory markedly slower), or of the single tensor itself when reducing in
        place; min travels negated through MAX, mean is divided in place."""
        dtype = torch.float32
        for n in names:
            dtype = torch.promote_types(dtype, values[n].dtype)
        sizes = [values[n].numel() for n in names]
        only = values[names[0]]
        direct = inplace and len(names) == 1 and only.is_contiguous() and only.dtype == dtype and only.device == self.device
        if direct:
            buffer = only.view(-1)
        else:
            key = (str(op), dtype, sum(sizes))
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = self._buffers[key] = torch.empty(sum(sizes), dtype=dtype, device=self.device)
        parts = dict(zip(names, buffer.split(sizes), strict=True))
        for n, part in parts.items():
            if not direct:
                part.copy_(values[n].reshape(-1))
            if op_of[n] == "min":
                part.neg_()
        self._collective(f"all_reduce of metrics {names}", lambda: dist.all_reduce(buffer, op=op, group=self.group))
        for n, part in parts.items():
            if op_of[n] == "min":
                part.neg_()
            elif op_of[n] == "mean":
                part.div_(self.world_size)
        if inplace:
            if not direct:
                for n, part in parts.items():
                    values[n].copy_(part.reshape(values[n].shape))
            return {n: values[n] for n in names}
        return {n: part.reshape(values[n].shape).clone() for n, part in parts.items()}

    # ---- commands -----------------------------------------------------------------
    def broadcast_commands(self, commands: CommandBatch | Sequence[SeedCommand] | None = None) -> CommandBatch:
        """Send the controller's batch to every rank; returns the same batch everywhere.

        Call on every rank once per epoch boundary; only the controller's ``commands``
        are used (others pass None). One ``broadcast`` when the batch fits ``capacity``.
        """
        if commands is None:
            batch = CommandBatch.empty()
        elif isinstance(commands, CommandBatch):
            batch = commands
        else:
            batch = CommandBatch.from_commands(commands)
        if not self.distributed:
            self.sequence += 1
            return batch
        if self.is_controller:
            message, rest = batch.encode(self.sequence, self.capacity)
            message = message.to(self.device)
        else:
            width = _FIXED_COLUMNS + _NUM_FIELDS
            message = torch.empty(_HEADER_WORDS + self.capacity * width, dtype=torch.int32, device=self.device)
            rest = None
        src = self.controller_rank
        self._collective("command broadcast", lambda: dist.broadcast(message, src=src, group=self.group))
        _check_header(message[:_HEADER_WORDS].tolist(), self.sequence, self.rank)
        extra = CommandBatch.overflow_words(message)
        if extra:
            tail = rest.to(self.device) if rest is not None else torch.empty(extra, dtype=torch.int32, device=self.device)
            self._collective("command broadcast (overflow rows)", lambda: dist.broadcast(tail, src=src, group=self.group))
            rest = tail
        decoded = CommandBatch.decode(message, rest, self.sequence, self.rank)
        self.sequence += 1
        return decoded

    # ---- consistency --------------------------------------------------------------
    def check_consistency(self, tensors: nn.Module | Mapping[str, Tensor], what: str = "state") -> None:
        """Raise :class:`RankDivergenceError` unless every rank holds bitwise-identical
        tensors (a module's whole ``state_dict``, or named tensors). Two small
        ``all_gather``s of 64-bit digests; the error names the tensors that differ and
        the ranks that disagree with the controller's rank."""
        named = named_state_tensors(tensors) if isinstance(tensors, nn.Module) else dict(tensors)
        if not self.distributed:
            return
        names = sorted(named)
        names_digest = int.from_bytes(hashlib.blake2b("\0".join(names).encode(), digest_size=8).digest(), "little") >> 1
        header = torch.tensor([len(names), names_digest], dtype=torch.int64, device=self.device)
        headers = self._gather(header, f"{what} consistency check")
        ref = self._index_of_controller()
        if any(not torch.equal(h, headers[ref]) for h in headers):
            bad = [r for r, h in enumerate(headers) if not torch.equal(h, headers[ref])]
            raise RankDivergenceError(f"{what}: ranks {bad} hold a different set of tensors than rank {ref}")
        digests = torch.tensor([tensor_digest(named[n]) for n in names], dtype=torch.int64, device=self.device)
        gathered = self._gather(digests, f"{what} consistency check")
        differ = torch.stack([g != gathered[ref] for g in gathered])  # (world, T)
        if bool(differ.any()):
            wrong = [names[i] for i in differ.any(0).nonzero().flatten().tolist()]
            ranks = differ.any(1).nonzero().flatten().tolist()
            raise RankDivergenceError(
                f"{what} differs across ranks at epoch boundary {self.sequence}: ranks {ranks} disagree with rank {ref} "
                f"on {len(wrong)} tensor(s): {', '.join(wrong[:8])}{' …' if len(wrong) > 8 else ''}"
            )

    def _index_of_controller(self) -> int:
        if self.group is None:
            return self.controller_rank
        return dist.get_group_rank(self.group, self.controller_rank)

    def _gather(self, t: Tensor, what: str) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(out, t, group=self.group))
        return out

    def barrier(self, timeout: timedelta | None = None) -> None:
        """Wait for every rank. On gloo a ``monitored_barrier``: a rank missing after
        ``timeout`` is named in the error instead of hanging."""
        if not self.distributed:
            return
        if dist.get_backend(self.group) == "gloo":
            wait = timeout or self.timeout
            self._collective("barrier", lambda: dist.monitored_barrier(group=self.group, timeout=wait, wait_all_ranks=True))
        else:
            self._collective("barrier", lambda: dist.barrier(group=self.group))


def apply_commands(state: Any, batch: CommandBatch, policy: Any = None) -> Tensor:
    """Apply a decoded batch to an ``ExtendedStateTensor`` (every rank, same batch →
    same result). All commands are judged in one ``apply_transitions`` call against the
    state before the batch (DESIGN §4); successful germinations then record their
    blueprint and strategy with ``update_blueprint``. Returns the (K,) reason codes."""
    if len(batch) == 0:
        return torch.zeros(0, dtype=torch.int32)
    if bool((batch.kinds == int(CommandKind.REPORT)).any()):
        raise ValueError("REPORT commands carry metrics for a layer; apply them with kasmina.apply_layer_commands")
    device = state.state.device
    codes = state.apply_transitions(
        batch.seed_ids.to(device),
        batch.from_states.to(device),
        batch.to_states.to(device),
        batch.context.to(device),
        policy,
    )
    germinated = (codes == int(Reason.OK)) & (batch.kinds.to(codes.device) == int(CommandKind.GERMINATE))
    if bool(germinated.any()):
        mask = germinated.to(batch.seed_ids.device)
        state.update_blueprint(
            batch.seed_ids[mask].to(device), batch.blueprint_ids[mask].to(device), batch.strategies[mask].to(device)
        )
    return codes
