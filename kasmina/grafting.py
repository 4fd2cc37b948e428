"""Grafting strategies: how a GRAFTING seed's alpha ramps from 0 to 1, vectorised over seeds.

Every strategy works on all the seeds that use it at once. A call takes a
:class:`GraftingContext` of per-seed tensors (seed ids, epochs in state, the *real*
current alpha, metrics, watched weights) and the strategy keeps its per-seed state
(EMA of the watched weights, velocity, pause counters, stability counters, sub-strategy
scores, ramp lag) in tensors indexed by seed id over the layer's ``num_seeds``, so
a call costs the same few tensor ops for 10 seeds or 100K.

The protocol, once per lifecycle epoch for the seeds in GRAFTING:

* ``compute_alpha(ctx) -> (S,)`` — the new alpha of each seed in ``ctx.seed_ids``; it
  advances the strategy's per-seed state by one epoch, so call it once per epoch.
* ``on_epoch_end(ctx)`` — records what the epoch's metrics say (Adaptive's scores).
* ``should_abort(ctx) -> (S,) bool`` — ``error_rate > abort_error_rate`` (0.5).
* ``reset(seed_ids)`` — forget the seeds' state (a seed entering GRAFTING again).

Strategies are :class:`torch.nn.Module` objects whose state lives in buffers, so
``state_dict()`` / ``load_state_dict()`` carry it (a resumed run continues the same
ramp) and ``.to(device)`` moves it. They are registered by name and by the integer the
lifecycle stores in the GRAFTING_STRATEGY column; both come from the spec's
``GRAFTING_STRATEGY_NAMES``.

A metric that is not supplied (``None``) or NaN carries no information: it never
triggers a pause, a push, an abort or an instability.

The ramp lag: strategies that can pause or slow down (DriftControlled, Adaptive,
Stability) count the epochs the ramp has lost (``lag``: one per held epoch, half per
half-speed epoch), and their ramp is ``(epochs_in_state − lag) / ramp_epochs``. Without
pauses they coincide with Linear; after a pause the ramp resumes from the held alpha
instead of jumping to the wall-clock schedule, and it ends at exactly 1.0 (a multiple
of 0.5 divided by an integer is exact in float32).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._generated.lifecycle_tables import GRAFTING_STRATEGY_NAMES

__all__ = [
    "GRAFTING_STRATEGIES",
    "AdaptiveConfig",
    "AdaptiveGrafting",
    "DriftControlledConfig",
    "DriftControlledGrafting",
    "GraftingConfig",
    "GraftingContext",
    "GraftingStrategyBase",
    "LinearGrafting",
    "MomentumConfig",
    "MomentumGrafting",
    "StabilityConfig",
    "StabilityGrafting",
    "create_strategy",
    "strategy_class",
    "strategy_id",
]

# ---- configuration ----------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_int(name: str, value: Any, minimum: int) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name}={value!r}: must be an integer >= {minimum}",
    )


def _require_bound(name: str, value: Any) -> None:
    """A stability bound: a positive number (infinity: no bound)."""
    _require(
        isinstance(value, int | float) and not isinstance(value, bool) and value > 0,
        f"{name}={value!r}: must be a number > 0 (inf for no bound)",
    )


@dataclass(frozen=True)
class GraftingConfig:
    """Settings every strategy shares.

    Attributes:
        ramp_epochs: lifecycle epochs for alpha to go from 0 to 1 at full speed.
        abort_error_rate: ``should_abort`` is true where ``error_rate`` exceeds this.
    """

    ramp_epochs: int = 50
    abort_error_rate: float = 0.5

    def __post_init__(self) -> None:
        _require_int("ramp_epochs", self.ramp_epochs, 1)
        _require(0.0 <= self.abort_error_rate <= 1.0, f"abort_error_rate={self.abort_error_rate!r}: must be in [0, 1]")


@dataclass(frozen=True)
class DriftControlledConfig(GraftingConfig):
    """DriftControlled settings.

    Attributes:
        drift_threshold: relative drift ``‖w − ema‖ / ‖ema‖`` above which the ramp pauses.
        pause_epochs: epochs a detected drift holds alpha (the detecting epoch included).
        ema_decay: ``ema ← ema_decay·ema + (1 − ema_decay)·w``.
    """

    drift_threshold: float = 0.01
    pause_epochs: int = 10
    ema_decay: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.drift_threshold >= 0.0, f"drift_threshold={self.drift_threshold!r}: must be >= 0")
        _require_int("pause_epochs", self.pause_epochs, 1)
        _require(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay!r}: must be in [0, 1)")


@dataclass(frozen=True)
class MomentumConfig(GraftingConfig):
    """Momentum settings: ``velocity ← momentum·velocity + velocity_scale·performance_delta``.

    Attributes:
        momentum: decay of the velocity.
        velocity_scale: how strongly a performance delta pushes alpha.
    """

    momentum: float = 0.1
    velocity_scale: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.momentum < 1.0, f"momentum={self.momentum!r}: must be in [0, 1)")
        _require(
            0.0 <= self.velocity_scale < math.inf, f"velocity_scale={self.velocity_scale!r}: must be a finite number >= 0"
        )


@dataclass(frozen=True)
class AdaptiveConfig(DriftControlledConfig, MomentumConfig):
    """Adaptive settings: those of DriftControlled and Momentum, plus the switch.

    Attributes:
        momentum_delta: Momentum is used where ``performance_delta`` exceeds this (and
            the drift is at most half the drift threshold).
        score_decay: ``score ← score_decay·score + (1 − score_decay)·performance_delta``
            for the sub-strategy a seed used in the epoch.
    """

    momentum_delta: float = 0.01
    score_decay: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.score_decay < 1.0, f"score_decay={self.score_decay!r}: must be in [0, 1)")


@dataclass(frozen=True)
class StabilityConfig(GraftingConfig):
    """Stability settings.

    Attributes:
        window: a stability check runs every ``window`` epochs in GRAFTING.
        max_loss_variance, max_gradient_norm, max_accuracy_variance: a check is stable
            when every supplied metric is strictly below its bound.
        slow_factor: ramp speed after an unstable check (half speed).
        revert_after: after this many unstable checks in a row alpha returns to the
            alpha of the last stable check and holds it until a check is stable again.
    """

    window: int = 5
    max_loss_variance: float = 0.1
    max_gradient_norm: float = 10.0
    max_accuracy_variance: float = 0.05
    slow_factor: float = 0.5
    revert_after: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_int("window", self.window, 1)
        for name in ("max_loss_variance", "max_gradient_norm", "max_accuracy_variance"):
            _require_bound(name, getattr(self, name))
        _require(0.0 < self.slow_factor <= 1.0, f"slow_factor={self.slow_factor!r}: must be in (0, 1]")
        _require_int("revert_after", self.revert_after, 1)


# ---- context ----------------------------------------------------------------------

_METRIC_FIELDS = ("performance_delta", "error_rate", "loss_variance", "accuracy_variance", "gradient_norm")


@dataclass
class GraftingContext:
    """Per-seed inputs of one strategy call; every tensor is indexed like ``seed_ids``.

    Sequences and Python numbers are converted to tensors on ``seed_ids``' device (a
    number is broadcast to every seed). A metric left ``None`` or NaN is unknown.

    Attributes:
        seed_ids: (S,) ids of the seeds, each in ``[0, num_seeds)``, no duplicates.
        epochs_in_state: (S,) lifecycle epochs each seed has spent in GRAFTING.
        current_alpha: (S,) the alpha each seed is blended with now (the real one).
        performance_delta: (S,) change of the task metric the graft caused.
        error_rate: (S,) fraction of failing evaluations.
        loss_variance, accuracy_variance, gradient_norm: (S,) stability signals.
        watched: (S, W) the weights whose drift DriftControlled/Adaptive watch.
    """

    seed_ids: Tensor
    epochs_in_state: Tensor
    current_alpha: Tensor
    performance_delta: Tensor | None = None
    error_rate: Tensor | None = None
    loss_variance: Tensor | None = None
    accuracy_variance: Tensor | None = None
    gradient_norm: Tensor | None = None
    watched: Tensor | None = None

    def __post_init__(self) -> None:
        ids = torch.as_tensor(self.seed_ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"seed_ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
        self.seed_ids = ids.to(torch.long)
        if ids.numel() > 1 and torch.unique(self.seed_ids).numel() != ids.numel():
            repeated = self.seed_ids.sort().values
            raise ValueError(f"seed_ids must not repeat, got seed {int(repeated[1:][repeated[1:] == repeated[:-1]][0])} twice")
        self.epochs_in_state = self._per_seed("epochs_in_state", self.epochs_in_state)
        self.current_alpha = self._per_seed("current_alpha", self.current_alpha)
        for name in _METRIC_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, self._per_seed(name, value))
        if self.watched is not None:
            watched = torch.as_tensor(self.watched, device=self.seed_ids.device)
            if watched.dim() != 2 or watched.shape[0] != self.num_seeds_in_call:
                raise ValueError(f"watched must have shape ({self.num_seeds_in_call}, W), got {tuple(watched.shape)}")
            self.watched = watched.float()

    @property
    def num_seeds_in_call(self) -> int:
        """S, the number of seeds this context describes."""
        return int(self.seed_ids.shape[0])

    def _per_seed(self, name: str, value: Any) -> Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.seed_ids.device)
        if tensor.dim() == 0:
            return tensor.expand(self.num_seeds_in_call)
        if tuple(tensor.shape) != (self.num_seeds_in_call,):
            raise ValueError(f"{name} must have shape ({self.num_seeds_in_call},), got {tuple(tensor.shape)}")
        return tensor

    def metric(self, name: str) -> Tensor:
        """The (S,) tensor of a metric, all NaN when it was not supplied."""
        if name not in _METRIC_FIELDS:
            raise KeyError(f"unknown grafting metric {name!r}; known: {', '.join(_METRIC_FIELDS)}")
        value = getattr(self, name)
        if value is None:
            return torch.full((self.num_seeds_in_call,), float("nan"), device=self.seed_ids.device)
        return value

    def subset(self, mask: Tensor) -> GraftingContext:
        """The context restricted to the seeds where ``mask`` (S,) is true."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        return GraftingContext(**{k: (v[mask] if isinstance(v, Tensor) else v) for k, v in kwargs.items()})


# ---- the base class ---------------------------------------------------------------


class GraftingStrategyBase(nn.Module, ABC):
    """A grafting strategy over the ``num_seeds`` seeds of one layer.

    Subclasses set ``name`` (one of the spec's ``GRAFTING_STRATEGY_NAMES``) and
    ``config_class``, declare their per-seed state with :meth:`_seed_buffer` and
    implement :meth:`_alpha`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[GraftingConfig]] = GraftingConfig

    def __init__(self, num_seeds: int, config: GraftingConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"num_seeds={num_seeds!r}: must be an integer >= 1")
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.num_seeds = num_seeds
        self.config = config
        # Follows .to(device), so even a strategy without per-seed state knows its device.
        self.register_buffer("_anchor", torch.empty(0, device=device), persistent=False)
        self._reset_values: dict[str, float] = {}

    @property
    def strategy_id(self) -> int:
        """The integer the GRAFTING_STRATEGY column stores for this strategy."""
        return strategy_id(self.name)

    def _seed_buffer(self, name: str, fill: float, dtype: torch.dtype = torch.float32, width: int | None = None) -> None:
        shape = (self.num_seeds,) if width is None else (self.num_seeds, width)
        self.register_buffer(name, torch.full(shape, fill, dtype=dtype, device=self._anchor.device))
        self._reset_values[name] = fill

    # -- public protocol --

    def compute_alpha(self, ctx: GraftingContext) -> Tensor:
        """New alpha in [0, 1] for each seed of ``ctx`` (S,), advancing the per-seed state
        by one epoch. Call it once per lifecycle epoch."""
        ids = self._check(ctx)
        alpha = self._alpha(ctx, ids)
        return torch.where(torch.isnan(alpha), ctx.current_alpha, alpha).clamp(0.0, 1.0)  # NaN: alpha stays

    def on_epoch_end(self, ctx: GraftingContext) -> None:
        """Record the epoch's outcome for the seeds of ``ctx`` (no-op unless overridden)."""
        self._check(ctx)

    def should_abort(self, ctx: GraftingContext) -> Tensor:
        """(S,) bool: the seed's error rate exceeds ``abort_error_rate`` (unknown: False)."""
        self._check(ctx)
        return ctx.metric("error_rate") > self.config.abort_error_rate

    def reset(self, seed_ids: Tensor | Sequence[int]) -> None:
        """Forget the state of ``seed_ids`` (as if they had never used this strategy)."""
        ids = self._check_ids(torch.as_tensor(seed_ids, dtype=torch.long, device=self._buffer_device()))
        for name, fill in self._reset_values.items():
            getattr(self, name)[ids] = fill

    def extra_repr(self) -> str:
        return f"num_seeds={self.num_seeds}, config={self.config}"

    # -- for subclasses --

    @abstractmethod
    def _alpha(self, ctx: GraftingContext, ids: Tensor) -> Tensor:
        """Unclamped (S,) alpha; update the state of ``ids``."""

    def _linear(self, epochs: Tensor) -> Tensor:
        return epochs / float(self.config.ramp_epochs)

    # -- checks --

    def _buffer_device(self) -> torch.device:
        return self._anchor.device

    def _check_ids(self, ids: Tensor) -> Tensor:
        if ids.dim() != 1:
            raise ValueError(f"seed_ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_seeds):
            bad = ids[(ids < 0) | (ids >= self.num_seeds)][0].item()
            raise ValueError(f"seed id {bad} is out of range for a strategy over {self.num_seeds} seeds")
        return ids

    def _check(self, ctx: GraftingContext) -> Tensor:
        if not isinstance(ctx, GraftingContext):
            raise TypeError(f"expected a GraftingContext, got {type(ctx).__name__}")
        device = self._buffer_device()
        if ctx.seed_ids.device != device:
            raise ValueError(f"the context is on {ctx.seed_ids.device} but {type(self).__name__} is on {device}")
        return self._check_ids(ctx.seed_ids)


# ---- shared formula pieces ----------------------------------------------------------


def _known(x: Tensor) -> Tensor:
    """x with NaN and infinities replaced by 0 (an unknown or unusable metric pushes nothing)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _DriftWatcher:
    """The EMA of the watched weights, as buffers ``ema`` (N, W) and ``has_ema`` (N,) of
    the owning strategy. The width W is fixed by the first call (or a loaded state)."""

    @staticmethod
    def drift(owner: GraftingStrategyBase, ids: Tensor, watched: Tensor | None, decay: float) -> Tensor:
        """Relative drift ``‖w − ema‖ / ‖ema‖`` against the previous EMA (0 on a seed's
        first call or without watched weights), then ``ema ← decay·ema + (1−decay)·w``."""
        if watched is None:
            return torch.zeros(ids.shape[0], device=ids.device)
        if owner.ema.shape[1] != watched.shape[1]:
            if owner.ema.shape[1] != 0:
                raise ValueError(
                    f"watched weights have width {watched.shape[1]}, but this strategy watches width {owner.ema.shape[1]}"
                )
            owner.ema = torch.zeros(owner.num_seeds, watched.shape[1], device=owner.ema.device)
        seen = owner.has_ema[ids]
        ema = torch.where(seen.unsqueeze(1), owner.ema[ids], watched)
        norm = torch.linalg.vector_norm(ema, dim=1)
        diff = torch.linalg.vector_norm(watched - ema, dim=1)
        unbounded = torch.where(diff > 0, torch.inf, 0.0)
        drift = torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(norm.dtype).tiny), unbounded)
        owner.ema[ids] = torch.lerp(ema, watched, 1.0 - decay)
        owner.has_ema[ids] = True
        return drift

    @staticmethod
    def resize_on_load(owner: GraftingStrategyBase, state_dict: dict[str, Any], prefix: str) -> None:
        incoming = state_dict.get(prefix + "ema")
        if isinstance(incoming, Tensor) and incoming.dim() == 2 and incoming.shape[0] == owner.num_seeds:
            if incoming.shape != owner.ema.shape:
                owner.ema = torch.zeros(incoming.shape, dtype=owner.ema.dtype, device=owner.ema.device)


# ---- the strategies ---------------------------------------------------------------


class LinearGrafting(GraftingStrategyBase):
    """``alpha = epochs_in_state / ramp_epochs``, clipped to [0, 1]. No per-seed state."""

    name = "linear"
    config_class = GraftingConfig

    def _alpha(self, ctx: GraftingContext, ids: Tensor) -> Tensor:
        return self._linear(ctx.epochs_in_state)


class DriftControlledGrafting(GraftingStrategyBase):
    """Pauses the ramp while the watched weights drift.

    ``drift = ‖w − ema‖ / ‖ema‖`` (the EMA before this epoch's update; 0 on the first
    call). A drift above ``drift_threshold`` holds the *current* alpha for
    ``pause_epochs`` epochs (drift is not re-checked while paused); otherwise the ramp
    follows the ramp: ``alpha = (epochs_in_state − lag) / ramp_epochs`` where ``lag``
    counts the held epochs.
    """

    name = "drift_controlled"
    config_class = DriftControlledConfig
    config: DriftControlledConfig

    def __init__(self, num_seeds: int, config: DriftControlledConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__(num_seeds, config, device=device)
        self._seed_buffer("lag", 0.0)
        self._seed_buffer("pause_left", 0, torch.int32)
        self._seed_buffer("has_ema", False, torch.bool)
        self._seed_buffer("ema", 0.0, width=0)

    def _alpha(self, ctx: GraftingContext, ids: Tensor) -> Tensor:
        cfg = self.config
        drift = _DriftWatcher.drift(self, ids, ctx.watched, cfg.ema_decay)
        pause_left = self.pause_left[ids]
        paused = pause_left > 0
        triggered = ~paused & (drift > cfg.drift_threshold)
        hold = paused | triggered
        self.pause_left[ids] = torch.where(paused, pause_left - 1, torch.where(triggered, cfg.pause_epochs - 1, 0)).int()
        lag = self.lag[ids] + hold.float()
        self.lag[ids] = lag
        return torch.where(hold, ctx.current_alpha, self._linear(ctx.epochs_in_state - lag))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _DriftWatcher.resize_on_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MomentumGrafting(GraftingStrategyBase):
    """Accelerates the ramp while the graft helps.

    ``velocity ← momentum·velocity + velocity_scale·performance_delta`` and
    ``alpha = max(current_alpha, epochs_in_state / ramp_epochs + velocity)``: alpha never
    falls below the current alpha (the monotone floor).
    """

    name = "momentum"
    config_class = MomentumConfig
    config: MomentumConfig

    def __init__(self, num_seeds: int, config: MomentumConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__(num_seeds, config, device=device)
        self._seed_buffer("velocity", 0.0)

    def _alpha(self, ctx: GraftingContext, ids: Tensor) -> Tensor:
        cfg = self.config
        velocity = cfg.momentum * self.velocity[ids] + cfg.velocity_scale * _known(ctx.metric("performance_delta"))
        self.velocity[ids] = velocity
        return torch.maximum(ctx.current_alpha, self._linear(ctx.epochs_in_state) + velocity)


class AdaptiveGrafting(GraftingStrategyBase):
    """Chooses a sub-strategy per seed and epoch.

    DriftControlled where the drift exceeds half the drift threshold (or a drift pause is
    running), else Momentum where ``performance_delta > momentum_delta``, else Linear.
    All three follow one ramp, ``(epochs_in_state − lag) / ramp_epochs`` with ``lag`` the
    epochs held by drift pauses (Momentum adds its velocity to it), so a switch never jumps, and
    alpha never falls below the current alpha. ``mode`` holds each seed's last choice
    (the sub-strategy's GRAFTING_STRATEGY id) and ``scores`` (N, 3) an EMA of the
    performance delta observed while each sub-strategy was in use (``on_epoch_end``).
    """

    name = "adaptive"
    config_class = AdaptiveConfig
    config: AdaptiveConfig
    SUB_STRATEGIES: ClassVar[tuple[str, ...]] = ("linear", "drift_controlled", "momentum")

    def __init__(self, num_seeds: int, config: AdaptiveConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__(num_seeds, config, device=device)
        self._seed_buffer("lag", 0.0)
        self._seed_buffer("pause_left", 0, torch.int32)
        self._seed_buffer("velocity", 0.0)
        self._seed_buffer("mode", strategy_id("linear"), torch.int64)
        self._seed_buffer("scores", 0.0, width=len(self.SUB_STRATEGIES))
        self._seed_buffer("has_ema", False, torch.bool)
        self._seed_buffer("ema", 0.0, width=0)
        # Column of `scores` for each sub-strategy id.
        column = torch.full((len(GRAFTING_STRATEGY_NAMES),), -1, dtype=torch.long, device=self._anchor.device)
        for col, sub in enumerate(self.SUB_STRATEGIES):
            column[strategy_id(sub)] = col
        self.register_buffer("_score_column", column, persistent=False)

    def _alpha(self, ctx: GraftingContext, ids: Tensor) -> Tensor:
        cfg = self.config
        drift = _DriftWatcher.drift(self, ids, ctx.watched, cfg.ema_decay)
        delta = ctx.metric("performance_delta")
        velocity = cfg.momentum * self.velocity[ids] + cfg.velocity_scale * _known(delta)
        self.velocity[ids] = velocity

        pause_left = self.pause_left[ids]
        paused = pause_left > 0
        use_drift = paused | (drift > cfg.drift_threshold / 2)
        use_momentum = ~use_drift & (delta > cfg.momentum_delta)
        triggered = use_drift & ~paused & (drift > cfg.drift_threshold)
        hold = paused | triggered
        self.pause_left[ids] = torch.where(paused, pause_left - 1, torch.where(triggered, cfg.pause_epochs - 1, 0)).int()

        lag = self.lag[ids] + hold.float()
        self.lag[ids] = lag
        ramp = self._linear(ctx.epochs_in_state - lag)
        alpha = torch.where(use_momentum, ramp + velocity, ramp)
        self.mode[ids] = torch.where(
            use_drift,
            strategy_id("drift_controlled"),
            torch.where(use_momentum, strategy_id("momentum"), strategy_id("linear")),
        )
        return torch.where(hold, ctx.current_alpha, torch.maximum(ctx.current_alpha, alpha))

    def on_epoch_end(self, ctx: GraftingContext) -> None:
        """Fold the epoch's performance delta into the score of the sub-strategy each seed
        used (seeds without a known delta keep their scores)."""
        ids = self._check(ctx)
        delta = ctx.metric("performance_delta")
        known = torch.isfinite(delta)
        rows, cols = ids[known], self._score_column[self.mode[ids[known]]]
        decay = self.config.score_decay
        self.scores[rows, cols] = decay * self.scores[rows, cols] + (1.0 - decay) * delta[known]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        _DriftWatcher.resize_on_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class StabilityGrafting(GraftingStrategyBase):
    """Slows down, then reverts, while the training is unstable.

    Every ``window`` epochs in GRAFTING a check is stable when every supplied metric is
    below its bound (loss variance < 0.1, gradient norm < 10, accuracy variance < 0.05);
    a stable check records the current alpha as the last stable one and resets the
    count of unstable checks in a row (``unstable_checks``). While that count is at
    least 1 the ramp advances at ``slow_factor`` speed; once it reaches
    ``revert_after`` alpha returns to the last stable alpha (and the ramp position to
    where it was then) until a check is stable again.
    """

    name = "stability"
    config_class = StabilityConfig
    config: StabilityConfig

    def __init__(self, num_seeds: int, config: StabilityConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__(num_seeds, config, device=device)
        self._seed_buffer("lag", 0.0)
        self._seed_buffer("unstable_checks", 0, torch.int32)
        self._seed_buffer("stable_alpha", 0.0)
        self._seed_buffer("stable_position", 0.0)

    def _alpha(self, ctx: GraftingContext, ids: Tensor) -> Tensor:
        cfg = self.config
        epochs = ctx.epochs_in_state
        check = (epochs > 0) & (torch.remainder(epochs, cfg.window) == 0)
        unstable = (
            (ctx.metric("loss_variance") >= cfg.max_loss_variance)
            | (ctx.metric("gradient_norm") >= cfg.max_gradient_norm)
            | (ctx.metric("accuracy_variance") >= cfg.max_accuracy_variance)
        )
        stable_check = check & ~unstable
        count = self.unstable_checks[ids]
        count = torch.where(check, torch.where(unstable, count + 1, 0), count).int()
        self.unstable_checks[ids] = count

        stable_alpha = torch.where(stable_check, ctx.current_alpha, self.stable_alpha[ids])
        # The ramp position the current alpha was computed at (the previous epoch's).
        lag = self.lag[ids]
        stable_position = torch.where(stable_check, epochs - 1 - lag, self.stable_position[ids])
        self.stable_alpha[ids] = stable_alpha
        self.stable_position[ids] = stable_position

        revert = count >= cfg.revert_after
        speed = torch.where(count > 0, cfg.slow_factor, 1.0)
        lag = torch.where(revert, epochs - stable_position, lag + (1.0 - speed))
        self.lag[ids] = lag
        return torch.where(revert, stable_alpha, self._linear(epochs - lag))


# ---- registry ---------------------------------------------------------------------

GRAFTING_STRATEGIES: dict[str, type[GraftingStrategyBase]] = {
    cls.name: cls for cls in (LinearGrafting, DriftControlledGrafting, MomentumGrafting, AdaptiveGrafting, StabilityGrafting)
}
"""Strategy classes by spec name (``GRAFTING_STRATEGY_NAMES``)."""


def strategy_id(name: str) -> int:
    """The GRAFTING_STRATEGY column value of a strategy name (from the spec)."""
    try:
        return GRAFTING_STRATEGY_NAMES.index(name)
    except ValueError:
        raise KeyError(f"unknown grafting strategy {name!r}; the spec names: {', '.join(GRAFTING_STRATEGY_NAMES)}") from None


def strategy_class(key: str | int) -> type[GraftingStrategyBase]:
    """The strategy class for a spec name or GRAFTING_STRATEGY id."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"a grafting strategy is named by str or int id, got {key!r}")
    if isinstance(key, int):
        if not 0 <= key < len(GRAFTING_STRATEGY_NAMES):
            raise KeyError(f"unknown grafting strategy id {key}; ids are 0..{len(GRAFTING_STRATEGY_NAMES) - 1}")
        key = GRAFTING_STRATEGY_NAMES[key]
    strategy_id(key)
    if key not in GRAFTING_STRATEGIES:
        raise KeyError(f"the spec names grafting strategy {key!r} but kasmina has no implementation of it")
    return GRAFTING_STRATEGIES[key]


def create_strategy(
    key: str | int,
    num_seeds: int,
    config: GraftingConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> GraftingStrategyBase:
    """A new strategy over ``num_seeds`` seeds, by spec name or GRAFTING_STRATEGY id."""
    return strategy_class(key)(num_seeds, config, device=device)
