"""``ChunkedKasminaLayer`` under ``torch.distributed`` and DDP.

DDP averages gradients, so parameters that exist on every rank stay identical. What it
does not see is everything the lifecycle changes at an epoch boundary: which seeds
exist in which state, their alphas, which blueprint parameters exist and which of them
train. This module keeps those identical by construction. At every epoch boundary, on
every rank, in this order::

    sync_layer_measurements(layer, sync)      # 1. all-reduce what the layer measured
    layer.step_epoch()                        # 2. same inputs -> same alphas everywhere
    cmds = controller(...) if sync.is_controller else None
    batch = sync.broadcast_commands(cmds)     # 3. one broadcast
    apply_layer_commands(layer, batch)        # 4. same commands, same order, same RNG
    ddp.refresh(optimizer)                    # 5. rebuild DDP if the parameter set changed

1. :func:`sync_layer_measurements` all-reduces the layer's rank-local measurements —
   the reconstruction-loss accumulators (sum), reported metrics and idle-chunk
   statistics (mean), blueprint fault flags (max) — so guards, grafting strategies and
   the controller see global numbers and every rank computes the same thing.
2. ``step_epoch`` is deterministic given identical state and inputs.
3. :meth:`~kasmina.distributed.LifecycleSync.broadcast_commands` (see that module).
4. :func:`apply_layer_commands` feeds each command to
   ``layer.process_lifecycle_command`` in order; a germination initialises its
   blueprint's parameters from the command's ``init_seed`` (a forked RNG, the ranks'
   own RNG streams untouched), so new blueprints are bitwise identical on every rank.
   A controller that acts on the layer itself (like :class:`~kasmina.controller.SeedController`)
   replaces steps 3-4 with :func:`controlled_step`: it runs on the controller's rank
   inside a :class:`CommandRecorder`, and its recorded actions are broadcast and
   replayed on the other ranks.
5. :class:`KasminaDDP` — **what a user must do when the parameter set changes**:
   germination allocates parameters, recycling frees them and a state change freezes or
   unfreezes them (``requires_grad``). DDP fixes its parameter list when it is built,
   so it must be rebuilt whenever that set changes, at an epoch boundary (never inside a
   step); ``KasminaDDP.refresh()`` compares the trainable-parameter signature and
   rebuilds only when it changed, and given the optimizer it also calls each layer's
   ``sync_optimizer`` so new blueprints train and freed ones leave the optimizer. DDP is
   built with ``find_unused_parameters=False`` and without per-forward buffer broadcast
   (lifecycle buffers are kept identical by commands, and rank-local accumulators must
   not be overwritten by rank 0's). Add ``layer.auxiliary_loss()`` to the loss of the
   same ``backward`` (TRAINING blueprints learn only from it).

Checkpoints: layer state is replicated, not sharded, so :func:`save_layer_checkpoint`
writes the whole layer once (rank 0, the project's checksummed ``CheckpointManager``,
then a barrier; every rank returns the id) and :func:`restore_layer_checkpoint` loads it
on any world size — 2 ranks to 1 process and back. (``torch.distributed.checkpoint``
solves sharded state and verifies no checksum; neither fits a replicated layer.)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ._generated.lifecycle_tables import CONTEXT_FIELDS, GRAFTING_STRATEGY_NAMES, StateColumn
from .distributed import CommandBatch, CommandKind, DistributedSyncError, LifecycleSync, SeedCommand
from .grafting import strategy_class
from .layer import ChunkedKasminaLayer
from .layer import LifecycleCommand as LayerCommand
from .manager import TransitionResult
from .policy import resolve_state

__all__ = [
    "CommandRecorder",
    "KasminaDDP",
    "apply_layer_commands",
    "controlled_step",
    "kasmina_layers",
    "restore_layer_checkpoint",
    "save_layer_checkpoint",
    "seed_command",
    "sync_layer_measurements",
]

_ID_BYTES = 256


def kasmina_layers(model: nn.Module) -> list[ChunkedKasminaLayer]:
    """Every ``ChunkedKasminaLayer`` in ``model`` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, ChunkedKasminaLayer)]


# ---- commands ---------------------------------------------------------------------------


def seed_command(layer: ChunkedKasminaLayer, command: LayerCommand | Mapping[str, Any]) -> SeedCommand:
    """The wire form of one of the layer's commands, decided on the controller's rank:
    names become ids (blueprint kind, strategy, states) and a cancel/rollback/recycle
    without ``from_state`` takes the seed's current state on this rank."""
    if not isinstance(command, LayerCommand):
        command = LayerCommand.from_mapping(command)
    seed = command.seed_id
    if command.type == "germinate":
        strategy = GRAFTING_STRATEGY_NAMES.index(strategy_class(command.strategy).name)  # as the layer resolves it
        return SeedCommand.germinate(seed, layer.blueprint_registry.resolve(command.blueprint), strategy)
    context = dict(
        command.context.performance_metrics if hasattr(command.context, "performance_metrics") else command.context or {}
    )
    if command.type == "transition":
        return SeedCommand.transition(seed, resolve_state(command.from_state), resolve_state(command.to_state), context)
    current = resolve_state(command.from_state) if command.from_state is not None else layer.state.lifecycle_state(seed)
    build = {"cancel": SeedCommand.cancel, "rollback": SeedCommand.rollback, "recycle": SeedCommand.recycle}[command.type]
    made = build(seed, current)
    return SeedCommand(made.kind, seed, made.from_state, made.to_state, context=context)


def _layer_command(cmd: SeedCommand) -> LayerCommand:
    if cmd.kind == CommandKind.GERMINATE:
        return LayerCommand("germinate", cmd.seed_id, blueprint=cmd.blueprint_id, strategy=cmd.strategy)
    # TRANSITION, CANCEL, ROLLBACK and RECYCLE are explicit edges: the from_state the
    # controller saw is checked (STALE_FROM_STATE if the seed moved meanwhile).
    return LayerCommand(
        "transition", cmd.seed_id, from_state=cmd.from_state, to_state=cmd.to_state, context=dict(cmd.context) or None
    )


def _rng_devices(layer: ChunkedKasminaLayer) -> list[torch.device]:
    return [layer.alpha.device] if layer.alpha.device.type == "cuda" else []


def _process(layer: ChunkedKasminaLayer, cmd: SeedCommand, run: Any = None) -> TransitionResult:
    """Carry out one layer command; a germination under a forked RNG seeded with its
    ``init_seed`` (so every rank allocates the same blueprint weights)."""
    run = run or layer.process_lifecycle_command
    command = _layer_command(cmd)
    if cmd.kind != CommandKind.GERMINATE:
        return run(command)
    with torch.random.fork_rng(devices=_rng_devices(layer)):
        torch.manual_seed(cmd.init_seed)
        return run(command)


def apply_layer_commands(layer: ChunkedKasminaLayer, batch: CommandBatch) -> Tensor:
    """Apply a broadcast batch to ``layer`` in order, identically on every rank; returns
    the (K,) int32 reason codes (``Reason.OK`` for reports).

    Layer commands go through ``process_lifecycle_command`` one by one (a germination
    allocates its blueprint under an RNG seeded with the command's ``init_seed``);
    REQUEST rows of one call are one batched ``layer.lifecycle.request_transitions``
    call, REPORT rows of one call one ``layer.report_metrics`` call — exactly as the
    controller made them (:class:`CommandRecorder`). The context a layer command is
    judged on is the layer's measured context overridden by the command's, so call
    :func:`sync_layer_measurements` first."""
    codes = torch.zeros(len(batch), dtype=torch.int32)
    if not len(batch):
        return codes
    _, counts = torch.unique_consecutive(batch.calls, return_counts=True)
    cmds = batch.to_commands()
    start = 0
    for n in counts.tolist():
        rows = slice(start, start + n)
        kinds = set(batch.kinds[rows].tolist())
        if len(kinds) != 1:
            raise ValueError(f"commands {start}..{start + n - 1} share a call but differ in kind: {sorted(kinds)}")
        kind = CommandKind(kinds.pop())
        if kind == CommandKind.REQUEST:
            ids = batch.seed_ids[rows].long()
            out = layer.lifecycle.request_transitions(ids, batch.from_states[rows], batch.to_states[rows], batch.context[rows])
            codes[rows] = out.cpu()
        elif kind == CommandKind.REPORT:
            mask = int(batch.fields[start])
            metrics = {f: batch.context[rows, i] for i, f in enumerate(CONTEXT_FIELDS) if mask >> i & 1}
            layer.report_metrics(batch.seed_ids[rows].long(), **metrics)
        else:
            for i in range(start, start + n):
                codes[i] = int(_process(layer, cmds[i]).code)
        start += n
    return codes


class CommandRecorder:
    """Records, as commands, what a controller does to a layer on the controller's rank,
    for the other ranks to replay with :func:`apply_layer_commands`.

    Inside ``with CommandRecorder(layer) as rec:`` the layer works as usual (the
    controller sees real results) while these entry points are also recorded, in call
    order: ``layer.process_lifecycle_command`` (and ``germinate``/``transition``/
    ``cancel``/``rollback``/``recycle``, which go through it; a germination gets an
    ``init_seed`` and runs under it), ``layer.report_metrics`` (context fields only) and
    ``layer.lifecycle.request_transitions``. A controller must change the layer through
    these; anything else it changes is not replayed. ``rec.batch()`` is the recording.
    """

    def __init__(self, layer: ChunkedKasminaLayer) -> None:
        self.layer = layer
        self._parts: list[CommandBatch] = []
        self._depth = 0

    def batch(self) -> CommandBatch:
        """Everything recorded, in order."""
        return CommandBatch.concat(self._parts)

    def __enter__(self) -> CommandRecorder:
        layer, manager = self.layer, self.layer.lifecycle
        process, report, request = layer.process_lifecycle_command, layer.report_metrics, manager.request_transitions

        def recorded_process(command: LayerCommand | Mapping[str, Any]) -> TransitionResult:
            if self._depth:
                return process(command)
            if not isinstance(command, LayerCommand):
                command = LayerCommand.from_mapping(command)
            if not 0 <= command.seed_id < layer.num_seeds:
                return process(command)  # the layer refuses it on every rank: nothing to replay
            cmd = seed_command(layer, command)
            self._record(CommandBatch.from_commands([replace(cmd, call=len(self._parts))]))
            return self._nested(lambda: _process(layer, cmd, process) if cmd.kind == CommandKind.GERMINATE else process(command))

        def recorded_report(seed_ids: Any, **metrics: Any) -> None:
            if not self._depth:
                self._record(_report_rows(layer, seed_ids, metrics, call=len(self._parts)))
            self._nested(lambda: report(seed_ids, **metrics))

        def recorded_request(seed_ids: Any, from_states: Any, to_states: Any, context: Any = None) -> Tensor:
            if not self._depth:
                self._record(_request_rows(layer, seed_ids, from_states, to_states, context, call=len(self._parts)))
            return self._nested(lambda: request(seed_ids, from_states, to_states, context))

        layer.__dict__["process_lifecycle_command"] = recorded_process
        layer.__dict__["report_metrics"] = recorded_report
        manager.__dict__["request_transitions"] = recorded_request
        return self

    def __exit__(self, *exc: object) -> None:
        self.layer.__dict__.pop("process_lifecycle_command", None)
        self.layer.__dict__.pop("report_metrics", None)
        self.layer.lifecycle.__dict__.pop("request_transitions", None)

    def _record(self, part: CommandBatch) -> None:
        self._parts.append(part)

    def _nested(self, fn: Any) -> Any:
        self._depth += 1
        try:
            return fn()
        finally:
            self._depth -= 1


def _ids(seed_ids: Any) -> Tensor:
    ids = torch.as_tensor([seed_ids] if isinstance(seed_ids, int) else seed_ids).reshape(-1)
    if ids.dtype.is_floating_point:
        raise TypeError(f"seed ids must be integers, got {ids.dtype}")
    return ids.to("cpu", torch.int64)


def _states(values: Any, k: int) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().reshape(-1).to("cpu", torch.int32).expand(k)
    if isinstance(values, (str, int)):
        return torch.full((k,), resolve_state(values), dtype=torch.int32)
    return torch.tensor([resolve_state(v) for v in values], dtype=torch.int32)


def _request_rows(
    layer: ChunkedKasminaLayer, seed_ids: Any, from_states: Any, to_states: Any, context: Any, call: int
) -> CommandBatch:
    ids = _ids(seed_ids)
    k = ids.shape[0]
    if context is None:
        ctx, fields = None, 0
    elif isinstance(context, Tensor):
        ctx, fields = context.detach().to("cpu", torch.float32).reshape(k, len(CONTEXT_FIELDS)), (1 << len(CONTEXT_FIELDS)) - 1
    else:
        ctx, fields = _context_rows(dict(context), k)
    return CommandBatch.build(CommandKind.REQUEST, ids, _states(from_states, k), _states(to_states, k), ctx, fields, call)


def _report_rows(layer: ChunkedKasminaLayer, seed_ids: Any, metrics: Mapping[str, Any], call: int) -> CommandBatch:
    ids = _ids(seed_ids)
    ctx, fields = _context_rows(metrics, ids.shape[0])
    current = layer.state.state[:, StateColumn.LIFECYCLE_STATE].cpu()[ids.clamp(0, layer.num_seeds - 1)]
    return CommandBatch.build(CommandKind.REPORT, ids, current, current, ctx, fields, call)


def _context_rows(metrics: Mapping[str, Any], k: int) -> tuple[Tensor, int]:
    unknown = sorted(set(metrics) - set(CONTEXT_FIELDS))
    if unknown:
        raise ValueError(
            f"metric(s) {unknown} cannot be replayed on other ranks (commands carry the context fields "
            f"{', '.join(CONTEXT_FIELDS)}); report them on every rank instead"
        )
    ctx = torch.full((k, len(CONTEXT_FIELDS)), float("nan"))
    fields = 0
    for name, value in metrics.items():
        i = CONTEXT_FIELDS.index(name)
        ctx[:, i] = torch.as_tensor(value, dtype=torch.float32).detach().cpu().expand(k)
        fields |= 1 << i
    return ctx, fields


def controlled_step(layer: ChunkedKasminaLayer, sync: LifecycleSync, decide: Any) -> Any:
    """Run a controller that acts on ``layer`` directly (``decide()``, e.g.
    ``lambda: controller.step(epoch, val_loss, predictions, ablate)``) on the
    controller's rank only, record what it did (:class:`CommandRecorder`), broadcast the
    recording (one collective) and replay it on every other rank. Returns ``decide()``'s
    result on the controller's rank and None elsewhere. Call on every rank."""
    if sync.is_controller:
        with CommandRecorder(layer) as recorder:
            result = decide()
        sync.broadcast_commands(recorder.batch())
        return result
    apply_layer_commands(layer, sync.broadcast_commands(None))
    return None


# ---- measurements -----------------------------------------------------------------------

# Rank-local measurement buffers of a ChunkedKasminaLayer and how they combine.
_MEASUREMENTS = {
    "_recon_sum": "sum",
    "_recon_count": "sum",
    "reported": "mean",
    "chunk_mean": "mean",
    "chunk_var": "mean",
    "fault": "max",
}


def sync_layer_measurements(layers: ChunkedKasminaLayer | Iterable[ChunkedKasminaLayer], sync: LifecycleSync) -> None:
    """All-reduce what each layer measured on its rank's data this epoch, in place, on
    every rank: reconstruction-loss sums and counts (sum: the global mean over all
    ranks' batches), reported metrics and idle-chunk mean/variance (mean; a metric one
    rank did not report becomes NaN, so it fails guards rather than pass on one rank),
    blueprint faults (any rank). Two collectives for all layers together."""
    group = [layers] if isinstance(layers, ChunkedKasminaLayer) else list(layers)
    if not sync.distributed or not group:
        return
    values: dict[str, Tensor] = {}
    ops: dict[str, str] = {}
    for i, layer in enumerate(group):
        for name, op in _MEASUREMENTS.items():
            values[f"{i}.{name}"] = getattr(layer, name)
            ops[f"{i}.{name}"] = op
    with torch.no_grad():
        sync.reduce_metrics(values, ops, inplace=True)


# ---- DDP --------------------------------------------------------------------------------


def _settle(layer: ChunkedKasminaLayer) -> None:
    """Make the layer decide now (not at its next forward) which blueprint parameters
    train, so the signature below sees the final ``requires_grad`` flags."""
    if layer._plan is None:
        layer._build_plan()


def _signature(model: nn.Module) -> tuple[tuple[str, tuple[int, ...], str, bool], ...]:
    return tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters())


class _WithAuxiliary(nn.Module):
    """Returns ``(output, auxiliary losses)`` so DDP's graph walk (with
    ``find_unused_parameters=True``) sees the blueprints that learn from reconstruction."""

    def __init__(self, model: nn.Module, layers: list[ChunkedKasminaLayer]) -> None:
        super().__init__()
        self.model = model
        self._layers = tuple(layers)  # a tuple: not registered twice as submodules

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, list[Tensor]]:
        out = self.model(*args, **kwargs)
        return out, [layer.auxiliary_loss() for layer in self._layers]


class KasminaDDP:
    """``DistributedDataParallel`` for a model with ``ChunkedKasminaLayer`` s, rebuilt at
    epoch boundaries when the trainable parameter set changes (module docs, step 5).

    Call it like the model (``out = ddp(x)``); keep no reference to :attr:`module`'s
    older wrappers. Without an initialised process group (or with one rank) it calls
    the model directly, so a script runs unchanged in one process. ``ddp_kwargs`` go to
    ``DistributedDataParallel`` (defaults: ``find_unused_parameters=False``, no
    per-forward buffer broadcast).
    """

    def __init__(self, model: nn.Module, **ddp_kwargs: Any) -> None:
        self.model = model
        self.layers = kasmina_layers(model)
        self.kwargs = {"find_unused_parameters": False, **ddp_kwargs}
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        if "broadcast_buffers" not in ddp_kwargs and "forward_sync_buffers" not in ddp_kwargs:
            self.kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(ddp_kwargs.get("process_group")) > 1
        self.module: nn.Module | None = None
        self._sig: tuple[Any, ...] | None = None
        self.rebuilds = 0
        self.refresh()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module is None:
            return self.model(*args, **kwargs)
        out, _aux = self.module(*args, **kwargs)
        return out

    def refresh(self, optimizer: torch.optim.Optimizer | None = None, **group_options: Any) -> bool:
        """At an epoch boundary (after the commands): bring ``optimizer`` (if given) in
        line with every layer's blueprints, then rebuild the DDP wrapper if the set of
        parameters, their shapes or ``requires_grad`` changed. Returns True on a rebuild."""
        for layer in self.layers:
            _settle(layer)
            if optimizer is not None:
                layer.sync_optimizer(optimizer, **group_options)
        sig = _signature(self.model)
        if sig == self._sig:
            return False
        self._sig = sig
        if not self.active:
            return False
        kwargs = dict(self.kwargs)
        if self.module is not None and "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters:
            # Rebuilds find the ranks identical by construction; re-broadcasting rank 0's
            # parameters and buffers (the whole lifecycle state) would cost a copy of it
            # and hide a divergence that LifecycleSync.check_consistency should report.
            kwargs.setdefault("init_sync", False)
        self.module = None  # the old reducer (and its gradient hooks) goes first
        if not any(requires_grad for *_, requires_grad in sig):
            return True  # nothing trains: nothing for DDP to average (the model is called directly)
        try:
            self.module = DistributedDataParallel(_WithAuxiliary(self.model, self.layers), **kwargs)
        except RuntimeError as exc:
            raise DistributedSyncError(
                f"rank {dist.get_rank()}: rebuilding DDP failed; ranks may hold different blueprint parameters "
                f"(run LifecycleSync.check_consistency) ({exc})"
            ) from exc
        self.rebuilds += 1
        return True


# ---- checkpoints ------------------------------------------------------------------------


def _layer_tensors(layer: ChunkedKasminaLayer) -> dict[str, Tensor]:
    """Everything of the layer's state_dict but its ExtendedStateTensor (saved apart)."""
    return {k: v for k, v in layer.state_dict().items() if not k.startswith("state.") and isinstance(v, Tensor)}


def save_layer_checkpoint(
    layer: ChunkedKasminaLayer,
    manager: Any,
    sync: LifecycleSync,
    priority: str = "high",
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write the whole layer (lifecycle state, blueprint weights, strategy state, host
    weights, telemetry) once per job — rank 0 through ``manager.save_layer_state`` —
    then a barrier; returns the checkpoint id on every rank. Call on every rank at an
    epoch boundary (after :func:`sync_layer_measurements`)."""
    meta = {"world_size": sync.world_size, "boundary": sync.sequence, **dict(metadata or {})}
    ident = torch.zeros(_ID_BYTES, dtype=torch.uint8)
    failure = ""
    if sync.rank == 0:
        try:
            checkpoint_id = manager.save_layer_state(layer.layer_id, layer.state, _layer_tensors(layer), priority, metadata=meta)
            raw = checkpoint_id.encode()
            if len(raw) >= _ID_BYTES:
                raise ValueError(f"checkpoint id {checkpoint_id!r} is longer than {_ID_BYTES - 1} bytes")
            ident[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        except Exception as exc:  # every rank must hear about it, not hang in the barrier
            failure = f"{type(exc).__name__}: {exc}"
            ident[0] = 0
            ident[1:] = 255
    if sync.distributed:
        message = ident.to(sync.device)
        # from the group's rank 0, the one that saved (src= would name a global rank)
        sync._collective("checkpoint id broadcast", lambda: dist.broadcast(message, group=sync.group, group_src=0))
        ident = message.cpu()
        sync.barrier()
    if ident[0] == 0:
        raise DistributedSyncError(f"rank {sync.rank}: rank 0 failed to save the layer checkpoint: {failure or 'see rank 0'}")
    return bytes(ident[ident != 0].tolist()).decode()


def restore_layer_checkpoint(
    layer: ChunkedKasminaLayer,
    manager: Any,
    checkpoint_id: str | None = None,
    sync: LifecycleSync | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_layer_checkpoint` (the newest
    whole-layer checkpoint of the layer unless ``checkpoint_id``) into ``layer``, on any
    world size: every rank reads the file (a filesystem all ranks share) and, with a
    ``sync``, the ranks then prove they hold bitwise-identical layers. Blueprints are
    allocated as the saved state requires (``layer.load_state_dict``); call
    ``KasminaDDP.refresh(optimizer)`` afterwards. Returns the checkpoint's metadata (the
    ``world_size`` it was written on, its ``boundary``, and what the caller added)."""
    if checkpoint_id is None:
        newest = [c for c in manager.list_checkpoints(layer_id=layer.layer_id, limit=None) if c.kind == "layer"]
        if not newest:
            raise FileNotFoundError(f"no whole-layer checkpoint of layer {layer.layer_id!r} in {manager.active_dir}")
        checkpoint_id = newest[0].checkpoint_id
    loaded = manager.restore_checkpoint(checkpoint_id, target_device=layer.alpha.device)
    if loaded.get("kind") != "layer" or loaded.get("layer_id") != layer.layer_id:
        raise ValueError(f"checkpoint {checkpoint_id!r} is not a whole-layer checkpoint of layer {layer.layer_id!r}")
    full = {f"state.{k}": v for k, v in loaded["state"].items()}
    full.update(loaded["blueprints"])
    layer.load_state_dict(full)
    if sync is not None:
        sync.check_consistency(layer, what=f"layer {layer.layer_id!r} after restore")
    return dict(loaded.get("metadata", {}))
