"""ChunkedKasminaLayer: a host layer whose output chunks are seeds.

The last dimension of the host output (D features) is split into ``num_seeds``
contiguous chunks (the first ``D % S`` one feature wider, DESIGN §4). Every seed lives
through the lifecycle of ``spec/lifecycle.yaml``, and what its chunk does in each state
comes from the spec's flags (``STATE_BLUEPRINT_RUNS``, ``STATE_ALPHA_SOURCE``,
``STATE_LEARNS_FROM``):

* the output of chunk *i* is ``base_i + alpha_i · (blueprint_i(base_i) − base_i)``
  (``kasmina.ops.chunked_blend``), alpha 0, 1 or the seed's grafting strategy's value;
* a seed that learns from ``reconstruction`` (TRAINING) runs its blueprint on the
  *detached* chunk and learns to reproduce it: :meth:`ChunkedKasminaLayer.auxiliary_loss`
  (add it to the task loss); the host's gradients are untouched;
* a seed whose state learns from ``none`` has frozen blueprint parameters
  (``requires_grad=False``, grad cleared), ``task`` ones learn from the task loss;
* idle seeds (DORMANT) feed running per-chunk mean/variance telemetry.

Control goes through :meth:`ChunkedKasminaLayer.process_lifecycle_command` (or the
``germinate``/``transition``/``cancel``/``rollback``/``recycle`` shortcuts) and
:meth:`ChunkedKasminaLayer.step_epoch`, once per training epoch. The forward pass reads
the lifecycle state and never changes it; a blueprint with non-finite parameters or
output is cut off at once (its chunk returns the host output) and moved to ROLLED_BACK
(CANCELLED where that is the only way out) at the next ``step_epoch``.

Optimizer hook: germination allocates a seed's blueprint parameters and recycling frees
them. ``layer.new_parameters()`` returns the parameters allocated since its last call
(``optimizer.add_param_group({"params": layer.new_parameters()})``), and
``layer.sync_optimizer(optimizer)`` adds new and removes freed blueprint parameters
(with their optimizer state) in one call.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from ._generated.lifecycle_tables import (
    CONTEXT_FIELDS,
    EDGE_MATRIX,
    GRAFTING_STRATEGY_NAMES,
    NUM_STATES,
    STATE_ALPHA_SOURCE,
    STATE_BLUEPRINT_RUNS,
    STATE_KINDS,
    STATE_LEARNS_FROM,
    STATE_NAMES,
    STATE_REQUIRES_BLUEPRINT,
    ExtendedLifecycle,
    Reason,
    StateColumn,
)
from .blueprints import DEFAULT_BLUEPRINTS, NO_BLUEPRINT, BlueprintKind, BlueprintRegistry, SeedBlueprint, evaluate_group
from .grafting import GraftingConfig, GraftingContext, GraftingStrategyBase, create_strategy, strategy_class
from .lifecycle import StateTransition, TransitionContext
from .manager import LifecycleManager, TransitionResult
from .policy import LifecyclePolicy, resolve_state
from .state import ExtendedStateTensor

__all__ = ["ChunkLayout", "ChunkedKasminaLayer", "EpochReport", "LifecycleCommand"]

GRAFTING_SIGNALS = ("loss_variance", "accuracy_variance", "gradient_norm")
"""Metrics a caller may report for the grafting strategies besides the context fields."""

_COMMANDS = ("germinate", "transition", "cancel", "rollback", "recycle")
_STRATEGY_STATES = tuple(s for s in range(NUM_STATES) if STATE_ALPHA_SOURCE[s] == "strategy")
# States whose blueprint runs at a fixed alpha (entering one must not change the seed's alpha), and that alpha.
_FIXED_ALPHA_RUNS = tuple(bool(STATE_BLUEPRINT_RUNS[s]) and STATE_ALPHA_SOURCE[s] != "strategy" for s in range(NUM_STATES))
_FIXED_ALPHA = tuple(1.0 if STATE_ALPHA_SOURCE[s] == "one" else 0.0 for s in range(NUM_STATES))


# ---- chunk layout -------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkLayout:
    """Contiguous chunks of a last dimension of ``dim`` features, ``num_chunks`` of them;
    the first ``dim % num_chunks`` are one feature wider. Chunks of one width form a
    *region* (at most two), so a region viewed as (N, count, width) indexes its chunks."""

    dim: int
    num_chunks: int

    def __post_init__(self) -> None:
        if not 1 <= self.num_chunks <= self.dim:
            raise ValueError(f"num_seeds={self.num_chunks} must be between 1 and the output width {self.dim}")

    @property
    def regions(self) -> tuple[tuple[int, int, int, int], ...]:
        """(width, first chunk, number of chunks, feature offset) of each region."""
        q, r = divmod(self.dim, self.num_chunks)
        out = []
        if r:
            out.append((q + 1, 0, r, 0))
        if self.num_chunks > r:
            out.append((q, r, self.num_chunks - r, r * (q + 1)))
        return tuple(out)

    def region_of(self, chunk: int) -> int:
        """Index into :attr:`regions` of ``chunk``'s region."""
        return 0 if chunk < self.dim % self.num_chunks or self.dim % self.num_chunks == 0 else 1

    def width(self, chunk: int) -> int:
        """Features of ``chunk``."""
        return self.regions[self.region_of(chunk)][0]

    def start(self, chunk: int) -> int:
        """First feature of ``chunk``."""
        q, r = divmod(self.dim, self.num_chunks)
        return chunk * q + min(chunk, r)


# ---- commands and reports -----------------------------------------------------------


@dataclass(frozen=True)
class LifecycleCommand:
    """A controller's command to a layer.

    ``type`` is one of ``germinate`` (``seed_id``, ``blueprint`` id or name, ``strategy``
    name or id), ``transition`` (``seed_id``, ``from_state``, ``to_state``, optional
    ``context`` metrics that override the measured ones), ``cancel``, ``rollback`` and
    ``recycle`` (``seed_id``; from the seed's current state).
    """

    type: str
    seed_id: int
    blueprint: int | str | None = None
    strategy: int | str = "linear"
    from_state: Any = None
    to_state: Any = None
    context: Mapping[str, float] | TransitionContext | None = None

    def __post_init__(self) -> None:
        if self.type not in _COMMANDS:
            raise ValueError(f"unknown lifecycle command {self.type!r}; known: {', '.join(_COMMANDS)}")
        if self.type == "germinate" and self.blueprint is None:
            raise ValueError("a germinate command needs a blueprint (id or name)")
        if self.type == "transition" and (self.from_state is None or self.to_state is None):
            raise ValueError("a transition command needs from_state and to_state")

    @classmethod
    def from_mapping(cls, command: Mapping[str, Any]) -> LifecycleCommand:
        """Build from a dict such as ``{"type": "germinate", "seed_id": 3, "blueprint":
        "mlp"}`` (``blueprint_id`` is accepted for ``blueprint``)."""
        data = dict(command)
        if "blueprint_id" in data:
            data.setdefault("blueprint", data.pop("blueprint_id"))
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown lifecycle command field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


_FLOAT32_BUFFERS = ("chunk_mean", "chunk_var", "reconstruction_loss", "reported", "_recon_sum")


@dataclass
class EpochReport:
    """What :meth:`ChunkedKasminaLayer.step_epoch` did: seeds moved out because their
    blueprint produced non-finite values (``faulted``) or their strategy aborted
    (``aborted``), each mapped to the state it moved to, and the new alpha of every
    seed whose strategy was asked."""

    faulted: dict[int, str] = field(default_factory=dict)
    aborted: dict[int, str] = field(default_factory=dict)
    alphas: dict[int, float] = field(default_factory=dict)


@dataclass
class _Group:
    """Seeds of one role (``blend`` or ``reconstruct``), blueprint kind and chunk width."""

    kind: BlueprintKind
    width: int
    offset: int
    count: int
    seeds: Tensor
    local: Tensor
    stacks: dict[str, list[nn.Parameter]]


@dataclass
class _Plan:
    """What the forward pass runs for the current lifecycle state (rebuilt on changes)."""

    blend: list[_Group]
    reconstruct: list[_Group]
    idle: Tensor
    any_idle: bool


# ---- the layer ----------------------------------------------------------------------


class ChunkedKasminaLayer(nn.Module):
    """A host layer with ``num_seeds`` seeds on the chunks of its output (module docs).

    Args:
        base_layer: the host module; its output's last dimension is chunked.
        num_seeds: number of seeds (chunks), 1..D.
        layer_id: name of the layer (checkpoints, logs).
        blueprints: the blueprint kinds seeds may germinate (default: ``DEFAULT_BLUEPRINTS``).
        policy: minimum epochs and guard thresholds (default: the spec's).
        checkpoint_manager: handed to the :class:`LifecycleManager`.
        out_features: D, when ``base_layer`` has no ``out_features``.
        strategy_configs: grafting settings by strategy name; by default every strategy
            ramps over the policy's minimum epochs of the strategy-driven state
            (GRAFTING), so GRAFTING can end exactly when alpha reaches 1.
        telemetry_momentum: weight of a new batch in the running chunk statistics.
    """

    alpha: Tensor
    fault: Tensor
    chunk_mean: Tensor
    chunk_var: Tensor
    reconstruction_loss: Tensor
    reported: Tensor

    def __init__(
        self,
        base_layer: nn.Module,
        num_seeds: int,
        layer_id: str = "layer",
        blueprints: BlueprintRegistry | None = None,
        policy: LifecyclePolicy | None = None,
        checkpoint_manager: Any = None,
        *,
        out_features: int | None = None,
        strategy_configs: Mapping[str, GraftingConfig] | None = None,
        telemetry_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
        dim = out_features if out_features is not None else getattr(base_layer, "out_features", None)
        if not isinstance(dim, int):
            raise ValueError(
                f"cannot tell the output width of {type(base_layer).__name__}: pass out_features= (the size of its last dim)"
            )
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, int):
            raise TypeError(f"num_seeds must be an int, got {num_seeds!r}")
        if not 0.0 < telemetry_momentum <= 1.0:
            raise ValueError(f"telemetry_momentum={telemetry_momentum!r}: must be in (0, 1]")
        self.layout = ChunkLayout(dim, num_seeds)
        self.num_seeds = num_seeds
        self.layer_id = layer_id
        self.blueprint_registry = blueprints if blueprints is not None else DEFAULT_BLUEPRINTS
        if not isinstance(self.blueprint_registry, BlueprintRegistry):
            raise TypeError(f"blueprints must be a BlueprintRegistry, got {type(blueprints).__name__}")
        self.telemetry_momentum = telemetry_momentum
        device = _device_of(base_layer)

        self.base_layer = base_layer
        self.state = ExtendedStateTensor(num_seeds, device=device)
        self.lifecycle = self._make_lifecycle(checkpoint_manager, policy)

        ramp = max(1, max((self.lifecycle.policy.min_epochs[s] for s in _STRATEGY_STATES), default=1))
        configs = dict(strategy_configs or {})
        unknown = sorted(set(configs) - set(GRAFTING_STRATEGY_NAMES))
        if unknown:
            raise ValueError(f"unknown grafting strategy name(s) {unknown}; known: {', '.join(GRAFTING_STRATEGY_NAMES)}")
        self.strategies = nn.ModuleDict(
            {
                name: create_strategy(
                    name, num_seeds, configs.get(name, strategy_class(name).config_class(ramp_epochs=ramp)), device=device
                )
                for name in GRAFTING_STRATEGY_NAMES
            }
        )
        self.seed_blueprints = nn.ModuleDict()

        def per_seed(fill: float, dtype: torch.dtype = torch.float32, width: int | None = None) -> Tensor:
            shape = (num_seeds,) if width is None else (num_seeds, width)
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.register_buffer("alpha", per_seed(0.0))
        self.register_buffer("fault", per_seed(False, torch.bool))
        self.register_buffer("chunk_mean", per_seed(math.nan))
        self.register_buffer("chunk_var", per_seed(math.nan))
        self.register_buffer("reconstruction_loss", per_seed(math.nan))
        self.register_buffer("reported", per_seed(math.nan, width=len(CONTEXT_FIELDS) + len(GRAFTING_SIGNALS)))
        self.register_buffer("_recon_sum", per_seed(0.0), persistent=False)
        self.register_buffer("_recon_count", per_seed(0, torch.int32), persistent=False)

        self._plan: _Plan | None = None
        self._aux: Tensor | None = None
        self._pending: dict[int, tuple[int, int]] = {}
        self._new_params: list[nn.Parameter] = []
        self._released: weakref.WeakSet[nn.Parameter] = weakref.WeakSet()
        self.register_load_state_dict_post_hook(_after_load)

    # ---- forward ----------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Host output with every seed's chunk behaviour applied (module docs)."""
        base = self.base_layer(x)
        if base.shape[-1] != self.layout.dim:
            raise ValueError(f"the host output has {base.shape[-1]} features but the layer was built for {self.layout.dim}")
        plan = self._plan if self._plan is not None else self._build_plan()
        flat = base.reshape(-1, self.layout.dim)
        self._aux = None
        if self.training and flat.shape[0]:  # an empty batch has no statistics and nothing to reconstruct
            if plan.any_idle:
                self._update_telemetry(flat.detach(), plan.idle)
            if plan.reconstruct:
                self._aux = self._reconstruct(flat.detach(), plan.reconstruct)
        if not plan.blend:
            return base
        blueprint_out = flat.new_empty(flat.shape)
        for group in plan.blend:
            out = self._run_group(group, _gather(group, flat))
            region = blueprint_out.narrow(1, group.offset, group.count * group.width).view(-1, group.count, group.width)
            region.index_copy_(1, group.local, out.transpose(0, 1))
        alpha = self.alpha.float().masked_fill(self.fault, 0.0)
        return ops.chunked_blend(flat, blueprint_out, alpha, self.layout.num_chunks).view(base.shape)

    def auxiliary_loss(self) -> Tensor:
        """Sum over the seeds that learn from reconstruction of their mean squared
        reconstruction error on the last (training) forward pass; 0 when there are none.
        Its gradient reaches only those seeds' blueprint parameters."""
        if self._aux is None:
            return self.alpha.new_zeros(())
        return self._aux

    def _run_group(self, group: _Group, x: Tensor) -> Tensor:
        """(K, N, w) blueprint outputs of a group on (K, N, w) inputs; flags the seeds
        whose parameters are not finite, or whose outputs are not finite on finite inputs
        (a non-finite input is the host's doing, not the blueprint's)."""
        out, finite_params = evaluate_group(group.kind, group.stacks, x)
        finite_in = torch.isfinite(x.detach()).flatten(1).all(1)
        ok = finite_params & (torch.isfinite(out.detach()).flatten(1).all(1) | ~finite_in)
        with torch.no_grad():
            self.fault[group.seeds] = self.fault[group.seeds] | ~ok
        return out

    def _reconstruct(self, inputs: Tensor, groups: list[_Group]) -> Tensor:
        total = inputs.new_zeros((), dtype=torch.float32)
        for group in groups:
            target = _gather(group, inputs).float()
            out = self._run_group(group, target)
            loss = (out.float() - target).square().mean((1, 2))
            ok = torch.isfinite(loss) & ~self.fault[group.seeds]
            loss = torch.where(ok, loss, 0.0)
            total = total + loss.sum()
            with torch.no_grad():
                self._recon_sum.index_add_(0, group.seeds, loss.detach().to(self._recon_sum.dtype))
                self._recon_count.index_add_(0, group.seeds, ok.int())
        return total

    @torch.no_grad()
    def _update_telemetry(self, flat: Tensor, idle: Tensor) -> None:
        moments = ops.chunk_moments(flat.float(), self.layout.num_chunks)  # per chunk: E[x], E[x * x]
        chunk_mean = moments[0]
        chunk_var = (moments[1] - chunk_mean.square()).clamp_min(0.0)
        m = self.telemetry_momentum
        for buf, new in (
            (self.chunk_mean, chunk_mean.to(self.chunk_mean.dtype)),
            (self.chunk_var, chunk_var.to(self.chunk_var.dtype)),
        ):
            updated = torch.where(torch.isnan(buf), new, torch.lerp(buf, new, m))
            buf.copy_(torch.where(idle, updated, buf))

    # ---- plan -------------------------------------------------------------------------

    def _build_plan(self) -> _Plan:
        """Group running seeds by (role, kind, width) and set requires_grad per state.
        Runs on lifecycle changes only (a Python pass over the seeds)."""
        states = self.state.state[:, StateColumn.LIFECYCLE_STATE].tolist()
        device = self.alpha.device
        buckets: dict[tuple[str, int, int], list[int]] = {}
        missing = []
        for name in self.seed_blueprints:
            self._set_trainable(int(name), states[int(name)])
        for seed, s in enumerate(states):
            if not STATE_BLUEPRINT_RUNS[s]:
                continue
            bp = self.seed_blueprints[str(seed)] if str(seed) in self.seed_blueprints else None
            if bp is None:
                missing.append(seed)
                continue
            role = "reconstruct" if STATE_LEARNS_FROM[s] == "reconstruction" else "blend"
            buckets.setdefault((role, bp.kind_id, self.layout.region_of(seed)), []).append(seed)
        if missing:
            self.fault[torch.tensor(missing, device=device)] = True
        plan = _Plan([], [], torch.tensor([STATE_KINDS[s] == "idle" for s in states], device=device), False)
        plan.any_idle = any(STATE_KINDS[s] == "idle" for s in states)
        for (role, kind_id, region), seeds in sorted(buckets.items()):
            width, first, count, offset = self.layout.regions[region]
            modules = [self.seed_blueprints[str(s)] for s in seeds]
            names = [n for n, _ in modules[0].named_parameters()]
            group = _Group(
                kind=self.blueprint_registry[kind_id],
                width=width,
                offset=offset,
                count=count,
                seeds=torch.tensor(seeds, dtype=torch.long, device=device),
                local=torch.tensor([s - first for s in seeds], dtype=torch.long, device=device),
                stacks={n: [getattr(m, n) for m in modules] for n in names},
            )
            (plan.reconstruct if role == "reconstruct" else plan.blend).append(group)
        self._plan = plan
        return plan

    def _set_trainable(self, seed: int, state: int) -> None:
        """Blueprint parameters learn in states that learn from something, else they are
        frozen (``requires_grad=False`` and no stale gradient an optimizer could apply)."""
        bp = self.blueprint(seed)
        if bp is None:
            return
        trainable = STATE_LEARNS_FROM[state] != "none"
        for p in bp.parameters():
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None

    def _invalidate(self) -> None:
        self._plan = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Device moves apply to every tensor; a dtype cast (``.half()``, ``.double()``)
        leaves the bookkeeping buffers float32, the type guards compare in (a bfloat16
        stability of 0.95 would read 0.949)."""
        self._invalidate()
        kept = {name: self._buffers[name] for name in _FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    # ---- blueprints -------------------------------------------------------------------

    def _allocate(self, seed: int, kind_id: int) -> None:
        kind = self.blueprint_registry[kind_id]
        bp = SeedBlueprint(kind, kind_id, self.layout.width(seed), device=self.alpha.device, dtype=self.alpha.dtype)
        self._free(seed)
        self.seed_blueprints[str(seed)] = bp
        self._new_params.extend(bp.parameters())

    def _free(self, seed: int) -> None:
        key = str(seed)
        if key in self.seed_blueprints:
            for p in self.seed_blueprints[key].parameters():
                self._released.add(p)
            del self.seed_blueprints[key]

    def blueprint(self, seed_id: int) -> SeedBlueprint | None:
        """The blueprint module of a seed, or None when it has none."""
        return self.seed_blueprints[str(seed_id)] if str(seed_id) in self.seed_blueprints else None

    def new_parameters(self) -> list[nn.Parameter]:
        """Blueprint parameters allocated since the last call that still exist (give them
        to the optimizer: ``optimizer.add_param_group({"params": layer.new_parameters()})``)."""
        live = {id(p) for p in self.seed_blueprints.parameters()}
        fresh = [p for p in self._new_params if id(p) in live]
        self._new_params = []
        return fresh

    def sync_optimizer(self, optimizer: torch.optim.Optimizer, **group_options: Any) -> int:
        """Make ``optimizer`` match the layer's blueprints: remove freed blueprint
        parameters (and their state) from its groups and add the blueprint parameters it
        lacks as one new group with ``group_options``. Returns the number added."""
        released = set(self._released)
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if p not in released]
            for p in group["params"]:
                if p in released:
                    optimizer.state.pop(p, None)
            group["params"] = kept
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.seed_blueprints.parameters() if id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, **group_options})
        self._new_params = []
        self._released = weakref.WeakSet()
        return len(missing)

    # ---- lifecycle control ------------------------------------------------------------

    def process_lifecycle_command(self, command: LifecycleCommand | Mapping[str, Any]) -> TransitionResult:
        """Carry out a :class:`LifecycleCommand` (or its dict form); the result says why
        when the lifecycle refuses. Malformed commands raise and change nothing."""
        if not isinstance(command, LifecycleCommand):
            command = LifecycleCommand.from_mapping(command)
        seed = command.seed_id
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed_id must be an int, got {seed!r}")
        if command.type == "germinate":
            return self._germinate(seed, command.blueprint, command.strategy, command.context)
        if command.type == "transition":
            return self._transition(seed, command.from_state, command.to_state, command.context)
        target = {
            "cancel": ExtendedLifecycle.CANCELLED,
            "rollback": ExtendedLifecycle.ROLLED_BACK,
            "recycle": ExtendedLifecycle.DORMANT,
        }[command.type]
        current = self.state.lifecycle_state(seed) if 0 <= seed < self.num_seeds else target
        return self._transition(seed, current, target, command.context)

    def germinate(self, seed_id: int, blueprint: int | str, strategy: int | str = "linear") -> TransitionResult:
        """DORMANT -> GERMINATED with a new blueprint of kind ``blueprint`` (id or name) and
        the grafting ``strategy`` (name or id)."""
        return self.process_lifecycle_command(LifecycleCommand("germinate", seed_id, blueprint, strategy))

    def transition(
        self, seed_id: int, from_state: Any, to_state: Any, context: Mapping[str, float] | None = None
    ) -> TransitionResult:
        """Request ``from_state -> to_state``; the context is the measured and reported
        metrics, overridden by ``context``."""
        return self.process_lifecycle_command(
            LifecycleCommand("transition", seed_id, from_state=from_state, to_state=to_state, context=context)
        )

    def cancel(self, seed_id: int) -> TransitionResult:
        """Move a seed from its current state to CANCELLED."""
        return self.process_lifecycle_command(LifecycleCommand("cancel", seed_id))

    def rollback(self, seed_id: int) -> TransitionResult:
        """Move a seed from its current state to ROLLED_BACK."""
        return self.process_lifecycle_command(LifecycleCommand("rollback", seed_id))

    def recycle(self, seed_id: int) -> TransitionResult:
        """Return a retired seed to DORMANT (after its embargo), freeing its blueprint."""
        return self.process_lifecycle_command(LifecycleCommand("recycle", seed_id))

    def _germinate(self, seed: int, blueprint: Any, strategy: Any, context: Any) -> TransitionResult:
        kind_id = self.blueprint_registry.resolve(blueprint)
        strategy_id = GRAFTING_STRATEGY_NAMES.index(strategy_class(strategy).name)
        self._pending[seed] = (kind_id, strategy_id)
        try:
            return self._transition(seed, ExtendedLifecycle.DORMANT, ExtendedLifecycle.GERMINATED, context)
        finally:
            self._pending.pop(seed, None)

    def _transition(self, seed: int, from_state: Any, to_state: Any, context: Any) -> TransitionResult:
        src, dst = resolve_state(from_state), resolve_state(to_state)
        metrics = self.measured_context(seed) if 0 <= seed < self.num_seeds else {}
        if isinstance(context, TransitionContext):
            metrics.update(context.performance_metrics)
        elif context is not None:
            metrics.update(context)
        if 0 <= seed < self.num_seeds:
            refusal = self._continuity_refusal(seed, src, dst, metrics)
            if refusal is not None:
                return refusal
        result = self.lifecycle.request_transition(seed, src, dst, metrics)
        return result

    def _continuity_refusal(self, seed: int, src: int, dst: int, metrics: dict[str, float]) -> TransitionResult | None:
        """A refusal when the move would make the seed's output jump: the blueprint keeps
        running in ``dst`` but alpha would change (e.g. GRAFTING -> STABILIZATION before
        the ramp reached 1). Retiring moves remove the contribution on purpose."""
        if not _FIXED_ALPHA_RUNS[dst]:
            return None
        current = float(self.alpha[seed])
        target = _FIXED_ALPHA[dst]
        if current == target:
            return None
        row = self.state.state[seed].tolist()
        ctx = TransitionContext.from_row(seed, dst, row, metrics)
        if row[StateColumn.LIFECYCLE_STATE] != src or StateTransition(self.lifecycle.policy).judge(src, dst, ctx) != Reason.OK:
            return None  # the lifecycle refuses anyway and says why
        message = (
            f"seed {seed}: {STATE_NAMES[src]} -> {STATE_NAMES[dst]} would move alpha from {current:.6g} to {target:g}; "
            f"the output must not jump, so wait until the grafting ramp reaches {target:g}"
        )
        return TransitionResult(False, Reason.GUARD_FAILED, message, seed, src, dst)

    def _output_jumps(self, ids: Tensor, src: Tensor, dst: Tensor, context: Tensor) -> Tensor:
        """(K,) the requests of a batch that :meth:`_continuity_refusal` refuses (the
        rare candidates, whose alpha would change while the blueprint keeps running, are
        judged one by one)."""
        device = ids.device
        fixed = torch.tensor(_FIXED_ALPHA_RUNS, device=device)
        target = torch.tensor(_FIXED_ALPHA, device=device)
        known = (ids >= 0) & (ids < self.num_seeds) & (dst >= 0) & (dst < NUM_STATES)
        to = dst.clamp(0, NUM_STATES - 1)
        alpha = self.alpha.detach().float().to(device)[ids.clamp(0, self.num_seeds - 1)]
        candidates = known & fixed[to] & (alpha != target[to])
        vetoed = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for k in torch.nonzero(candidates).flatten().tolist():
            metrics = {n: v for n, v in zip(CONTEXT_FIELDS, context[k].tolist(), strict=True) if not math.isnan(v)}
            vetoed[k] = self._continuity_refusal(int(ids[k]), int(src[k]), int(dst[k]), metrics) is not None
        return vetoed

    def _on_transition(self, seed: int, src: ExtendedLifecycle, dst: ExtendedLifecycle, context: TransitionContext) -> None:
        """Follow a committed transition (any path through ``self.lifecycle``)."""
        dst_id = int(dst)
        with torch.no_grad():
            source = STATE_ALPHA_SOURCE[dst_id]
            if source != "strategy":
                self.alpha[seed] = 1.0 if source == "one" else 0.0
            elif STATE_ALPHA_SOURCE[int(src)] != "strategy":
                for strategy in self.strategies.values():
                    strategy.reset([seed])
            if STATE_KINDS[dst_id] == "idle":
                self._free(seed)
                self.state.update_blueprint([seed], NO_BLUEPRINT)
                self.fault[seed] = False
                self.alpha[seed] = 0.0
                self.reported[seed] = math.nan
                self.reconstruction_loss[seed] = math.nan
                self._recon_sum[seed] = 0.0
                self._recon_count[seed] = 0
            if STATE_REQUIRES_BLUEPRINT[dst_id] and str(seed) not in self.seed_blueprints:
                pending = self._pending.get(seed)
                if pending is not None:
                    self.state.update_blueprint([seed], pending[0], pending[1])
                kind_id = int(self.state.state[seed, StateColumn.BLUEPRINT_ID])
                if kind_id in self.blueprint_registry:
                    self._allocate(seed, kind_id)
                # else: the plan flags the seed as faulted when its blueprint should run.
            self._set_trainable(seed, dst_id)
        self._invalidate()

    # ---- metrics ----------------------------------------------------------------------

    def report_metrics(self, seed_ids: int | Sequence[int] | Tensor, **metrics: Any) -> None:
        """Tell the layer metrics it cannot measure, per seed: any context field
        (``performance_delta``, ``stability_score``, ``error_rate``,
        ``total_improvement``, ``final_stability``, ``reconstruction_loss``) and the
        grafting signals ``loss_variance``, ``accuracy_variance``, ``gradient_norm``.
        Each value is a number or one value per seed; NaN clears a metric."""
        names = (*CONTEXT_FIELDS, *GRAFTING_SIGNALS)
        unknown = sorted(set(metrics) - set(names))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(names)}")
        ids = torch.as_tensor([seed_ids] if isinstance(seed_ids, int) else seed_ids, dtype=torch.long)
        if ids.dim() != 1 or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_seeds)):
            raise ValueError(f"seed ids must be in 0..{self.num_seeds - 1}, got {ids.tolist()}")
        ids = ids.to(self.alpha.device)
        values = {}
        for name, value in metrics.items():
            tensor = torch.as_tensor(value, dtype=torch.float32, device=ids.device)
            if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] != ids.shape[0]):
                raise ValueError(f"{name} needs one value or {ids.shape[0]} values, got shape {tuple(tensor.shape)}")
            values[names.index(name)] = tensor.expand(ids.shape[0])
        with torch.no_grad():
            for column, tensor in values.items():
                self.reported[ids, column] = tensor
        if "stability_score" in metrics:
            self.state.update_performance(ids, stability=values[names.index("stability_score")])

    def measured_context(self, seed_id: int) -> dict[str, float]:
        """The transition context the layer would send for a seed: its measured
        reconstruction loss (mean over this epoch's training batches, else the last
        epoch's) and the reported metrics; unknown ones are left out."""
        count = int(self._recon_count[seed_id])
        recon = float(self._recon_sum[seed_id]) / count if count else float(self.reconstruction_loss[seed_id])
        row = self.reported[seed_id, : len(CONTEXT_FIELDS)].tolist()
        metrics = {name: v for name, v in zip(CONTEXT_FIELDS, row, strict=True) if not math.isnan(v)}
        if "reconstruction_loss" not in metrics and not math.isnan(recon):
            metrics["reconstruction_loss"] = recon
        return metrics

    # ---- epochs -----------------------------------------------------------------------

    def step_epoch(self) -> EpochReport:
        """End a lifecycle epoch: close the epoch's reconstruction measurements, move
        seeds whose blueprint produced non-finite values out, advance every seed's epoch
        counter, then ask each grafting strategy for the new alpha of its seeds (and
        move out the seeds it aborts)."""
        report = EpochReport()
        with torch.no_grad():
            measured = self._recon_count > 0
            self.reconstruction_loss.copy_(
                torch.where(measured, self._recon_sum / self._recon_count.clamp_min(1), self.reconstruction_loss)
            )
            self._recon_sum.zero_()
            self._recon_count.zero_()
            ids = torch.nonzero(measured).flatten()
            if ids.numel():
                self.state.update_performance(ids, loss=self.reconstruction_loss[ids])
        report.faulted = self._retire(torch.nonzero(self.fault).flatten())
        self.lifecycle.step_epoch()
        self._advance_grafting(report)
        self._invalidate()
        return report

    def _advance_grafting(self, report: EpochReport) -> None:
        states = self.state.state
        in_strategy = torch.isin(
            states[:, StateColumn.LIFECYCLE_STATE], torch.tensor(_STRATEGY_STATES, device=states.device, dtype=states.dtype)
        )
        ids = torch.nonzero(in_strategy).flatten()
        if not ids.numel():
            return
        strategy_ids = states[ids, StateColumn.GRAFTING_STRATEGY]
        epochs = states[ids, StateColumn.EPOCHS_IN_STATE]
        watched = self._watched(ids)
        reported = self.reported[ids]
        aborted = []
        for sid in torch.unique(strategy_ids).tolist():
            sel = strategy_ids == sid
            seeds = ids[sel]
            metric = {
                name: reported[sel, self._metric_column(name)] for name in ("performance_delta", "error_rate", *GRAFTING_SIGNALS)
            }
            ctx = GraftingContext(
                seeds, epochs[sel], self.alpha[seeds].float(), watched=None if watched is None else watched[sel], **metric
            )
            strategy: GraftingStrategyBase = self.strategies[GRAFTING_STRATEGY_NAMES[sid]]
            new_alpha = strategy.compute_alpha(ctx)
            abort = strategy.should_abort(ctx)
            strategy.on_epoch_end(ctx)
            with torch.no_grad():
                self.alpha[seeds] = new_alpha.to(self.alpha.dtype)
            aborted.append(seeds[abort])
            report.alphas.update(zip(seeds.tolist(), new_alpha.tolist(), strict=True))
        report.aborted = self._retire(torch.cat(aborted))
        for seed in report.aborted:  # retired this epoch: the alpha it now has
            report.alphas[seed] = float(self.alpha[seed])

    @staticmethod
    def _metric_column(name: str) -> int:
        return (*CONTEXT_FIELDS, *GRAFTING_SIGNALS).index(name)

    def _watched(self, ids: Tensor) -> Tensor | None:
        """(K, W) host weights feeding each seed's chunk (rows of a weight whose first
        dimension is the output width, zero-padded to the widest chunk), or None."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 1 or weight.shape[0] != self.layout.dim:
            return None
        rows = weight.detach().reshape(self.layout.dim, -1).float()
        widest = self.layout.regions[0][0]
        parts = []
        for width, _, count, offset in self.layout.regions:
            block = rows.narrow(0, offset, count * width).reshape(count, width * rows.shape[1])
            parts.append(nn.functional.pad(block, (0, (widest - width) * rows.shape[1])))
        return torch.cat(parts)[ids]

    def _retire(self, ids: Tensor) -> dict[int, str]:
        """Move ``ids`` to ROLLED_BACK, or CANCELLED where that is the only retiring edge;
        seeds with neither edge (e.g. FOSSILIZED) stay, their contribution cut off."""
        if not ids.numel():
            return {}
        seeds = ids.tolist()
        current = self.state.state[ids, StateColumn.LIFECYCLE_STATE].tolist()
        moves = {}
        for seed, s in zip(seeds, current, strict=True):
            for target in (ExtendedLifecycle.ROLLED_BACK, ExtendedLifecycle.CANCELLED):
                if EDGE_MATRIX[s][target] >= 0:
                    moves[seed] = (s, int(target))
                    break
        if not moves:
            return {}
        self.state.increment_error_count(list(moves))
        codes = self.lifecycle.request_transitions(
            list(moves), [m[0] for m in moves.values()], [m[1] for m in moves.values()]
        ).tolist()
        return {seed: STATE_NAMES[m[1]] for (seed, m), code in zip(moves.items(), codes, strict=True) if code == Reason.OK}

    # ---- queries ----------------------------------------------------------------------

    def get_alpha(self) -> Tensor:
        """(S,) the alpha each chunk is blended with now (0 for faulted seeds)."""
        return self.alpha.float().masked_fill(self.fault, 0.0)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id!r}, num_seeds={self.num_seeds}, out_features={self.layout.dim}"

    # ---- persistence ------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Copy/pickle support: the manager (it holds a lock) is rebuilt on the copy with
        the same policy and checkpoint manager; its log and cached forward state are not
        carried over."""
        state = dict(self.__dict__)
        manager = state.pop("lifecycle")
        state["_lifecycle_args"] = (manager.checkpoint_manager, manager.policy)
        state.update(_plan=None, _aux=None, _pending={}, _released=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        checkpoint_manager, policy = state.pop("_lifecycle_args")
        super().__setstate__(state)
        self._released = weakref.WeakSet()
        self.lifecycle = self._make_lifecycle(checkpoint_manager, policy)

    def _make_lifecycle(self, checkpoint_manager: Any, policy: LifecyclePolicy | None) -> LifecycleManager:
        """The layer's manager: checkpoints go under the layer's id and carry the seed's
        blueprint weights; every committed transition reaches :meth:`_on_transition`."""
        return LifecycleManager(
            self.state,
            checkpoint_manager=checkpoint_manager,
            policy=policy,
            layer_id=self.layer_id,
            blueprint_state=self._blueprint_state,
            follow=self._on_transition,  # before the checkpoint: it holds the blueprint the seed now has
            veto=self._output_jumps,
        )

    def _blueprint_state(self, seed_id: int) -> dict[str, Tensor] | None:
        blueprint = self.blueprint(seed_id)
        return None if blueprint is None else {k: v.detach() for k, v in blueprint.state_dict().items()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        """Allocate the blueprints the incoming state has (kind from its BLUEPRINT_ID
        column) and free those it lacks, so their weights can be loaded."""
        incoming = state_dict.get(prefix + "state.state")
        bp_prefix = prefix + "seed_blueprints."
        wanted = {int(key[len(bp_prefix) :].split(".", 1)[0]) for key in state_dict if key.startswith(bp_prefix)}
        if incoming is not None and tuple(incoming.shape) == tuple(self.state.state.shape):
            kinds = incoming[:, StateColumn.BLUEPRINT_ID].tolist()
            bad = [s for s in wanted if not 0 <= s < self.num_seeds or kinds[s] not in self.blueprint_registry]
            if bad:
                error_msgs.append(f"{prefix}seed_blueprints: seed {bad[0]} has weights but no registered blueprint kind")
            else:
                for name in list(self.seed_blueprints):
                    if int(name) not in wanted:
                        self._free(int(name))
                for seed in sorted(wanted):
                    bp = self.blueprint(seed)
                    if bp is None or bp.kind_id != kinds[seed]:
                        self._allocate(seed, kinds[seed])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _gather(group: _Group, flat: Tensor) -> Tensor:
    """(K, N, w) chunks of the group's seeds from (N, D) features."""
    region = flat.narrow(1, group.offset, group.count * group.width).view(-1, group.count, group.width)
    return region.index_select(1, group.local).transpose(0, 1)


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    with torch.no_grad():  # this epoch's measurements belong to the state that was replaced
        module._recon_sum.zero_()  # type: ignore[operator]
        module._recon_count.zero_()  # type: ignore[operator]
    module._aux = None
    module._invalidate()  # type: ignore[operator]


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
