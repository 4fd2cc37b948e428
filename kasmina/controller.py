"""A reusable lifecycle controller for a :class:`~kasmina.ChunkedKasminaLayer`.

The seed document calls the component that drives seeds through the lifecycle "Tamiyo".
:class:`SeedController` is a plain, deterministic version of it. Once per epoch, after
the training loop has called ``layer.step_epoch()`` and measured the validation set, the
loop calls :meth:`SeedController.step`; the controller then

* **measures** what the guards judge, for every seed at once:

  - ``reconstruction_loss``: measured by the layer while the seed is in TRAINING;
  - ``performance_delta`` (and ``total_improvement``): the seed's effect on validation,
    by ablation: ``(L_without − L_with) / L_without`` where ``L_without`` is the
    validation loss with the seed's chunk replaced by the host output (the network as
    it was before the seed germinated) and ``L_with`` the loss of the full network.
    Positive means the seed helps; 0.01 means it removes 1 % of the loss;
  - ``stability_score`` (and ``final_stability``): the fraction of validation
    predictions unchanged since the previous epoch (1 = nothing moved);

* **decides**, one request per seed, batched into one ``request_transitions`` call:

  ========================  ===============================================================
  state                     request
  ========================  ===============================================================
  DORMANT                   germinate one seed when validation loss has plateaued
                            (``plateau_patience`` epochs without a ``plateau_min_delta``
                            relative improvement) and fewer than ``max_active`` are active
  GERMINATED                → TRAINING
  TRAINING                  → GRAFTING (guard: reconstruction converged); → CULLED once
                            ``training_budget`` × its minimum epochs have passed
  GRAFTING                  → STABILIZATION once alpha has reached 1
  STABILIZATION             → EVALUATING
  EVALUATING                → FINE_TUNING when the delta is positive (guard: delta and
                            stability), else → CULLED (guard: clearly negative); when
                            the request is still refused after ``evaluation_budget`` ×
                            its minimum epochs, → ROLLED_BACK (no measurable benefit)
  FINE_TUNING               → FOSSILIZED (guard: improvement and final stability); → CULLED
                            when the delta is not positive, or FOSSILIZED is still
                            refused, after the budget
  grafted states            → ROLLED_BACK on instability: validation loss above
                            ``rollback_loss_ratio`` × its value at germination, or (while
                            alpha is moving) stability below the policy's ``min_stability``
  CULLED/CANCELLED/ROLLED   → DORMANT (recycle; the lifecycle enforces the embargo)
  ========================  ===============================================================

Every threshold a guard uses comes from the layer's :class:`~kasmina.LifecyclePolicy`;
the controller only chooses which request to make, and the lifecycle judges it. The
controller keeps a record of every seed's life (:attr:`SeedController.lives`) read from
the state tensor's history, so moves the layer makes itself (a faulted blueprint rolled
back) are recorded too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._generated.lifecycle_tables import (
    CONTEXT_FIELDS,
    HISTORY_LENGTH,
    NUM_STATES,
    STATE_ALPHA_SOURCE,
    STATE_KINDS,
    STATE_NAMES,
    ExtendedLifecycle,
    Reason,
    StateColumn,
)
from .policy import LifecyclePolicy

__all__ = ["ControllerConfig", "Decision", "SeedController", "SeedLife", "ablate_chunks", "scaled_policy"]

S = ExtendedLifecycle
_NONE = -1
_RETIRED = tuple(s for s in range(NUM_STATES) if STATE_KINDS[s] == "retired")
_ACTIVE = tuple(s for s in range(NUM_STATES) if STATE_KINDS[s] == "active")
_GRAFTED = tuple(s for s in range(NUM_STATES) if STATE_KINDS[s] == "active" and STATE_ALPHA_SOURCE[s] != "zero")
_MOVING_ALPHA = (S.GRAFTING, S.STABILIZATION)
_FIELD = {name: i for i, name in enumerate(CONTEXT_FIELDS)}

AblationFn = Callable[[Tensor], Tensor]
"""``ablate(seed_ids) -> (K,)`` validation losses with each seed's chunk replaced by the
host output (see :func:`ablate_chunks`)."""


def scaled_policy(total_epochs: int, fraction: float = 0.35, base: LifecyclePolicy | None = None) -> LifecyclePolicy:
    """A policy whose minimum epochs are the spec's, scaled so that a seed's whole happy
    path (the sum over the active states) takes about ``fraction`` of ``total_epochs``.

    Every non-zero minimum stays at least 1; guard thresholds are left as they are."""
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    base = base if base is not None else LifecyclePolicy.default()
    path = sum(base.min_epochs[s] for s in _ACTIVE) or 1
    scale = fraction * total_epochs / path
    scaled = {STATE_NAMES[s]: (max(1, round(m * scale)) if m > 0 else 0) for s, m in enumerate(base.min_epochs)}
    return base.with_overrides(min_epochs=scaled)


def ablate_chunks(layer: Any, output: Tensor, base_output: Tensor, seed_ids: Tensor) -> Tensor:
    """(K, *output.shape): copies of the layer's ``output`` in which copy ``k`` has seed
    ``seed_ids[k]``'s chunk replaced by the host's ``base_output`` (the chunk as if the
    seed did not exist). One batched ``where``; feed the copies to the rest of the network
    to measure each seed's contribution."""
    layout = layer.layout
    widths = torch.tensor([layout.width(c) for c in range(layout.num_chunks)], device=output.device)
    chunk_of_feature = torch.repeat_interleave(torch.arange(layout.num_chunks, device=output.device), widths)
    mask = chunk_of_feature.unsqueeze(0) == seed_ids.to(output.device).unsqueeze(1)  # (K, D)
    mask = mask.view(mask.shape[0], *([1] * (output.dim() - 1)), mask.shape[1])
    return torch.where(mask, base_output.unsqueeze(0), output.unsqueeze(0))


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of :class:`SeedController` (see the module docs for how each is used)."""

    plateau_patience: int = 4
    plateau_min_delta: float = 0.01
    max_active: int = 2
    blueprints: tuple[str | int, ...] = ("mlp",)
    strategy: str = "linear"
    training_budget: float = 2.0
    evaluation_budget: float = 2.0
    rollback_loss_ratio: float = 1.5

    def __post_init__(self) -> None:
        if not isinstance(self.plateau_patience, int) or self.plateau_patience < 1:
            raise ValueError(f"plateau_patience must be an int >= 1, got {self.plateau_patience!r}")
        if not 0.0 <= self.plateau_min_delta < 1.0:
            raise ValueError(f"plateau_min_delta must be in [0, 1), got {self.plateau_min_delta!r}")
        if not isinstance(self.max_active, int) or self.max_active < 1:
            raise ValueError(f"max_active must be an int >= 1, got {self.max_active!r}")
        if not self.blueprints:
            raise ValueError("blueprints must name at least one blueprint kind")
        for name in ("training_budget", "evaluation_budget"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be >= 1 (a multiple of the state's minimum epochs), got {getattr(self, name)!r}")
        if not self.rollback_loss_ratio > 1.0:
            raise ValueError(f"rollback_loss_ratio must be > 1, got {self.rollback_loss_ratio!r}")


@dataclass(frozen=True)
class Decision:
    """One request the controller made: ``accepted`` tells whether the lifecycle took it;
    ``why`` is the controller's motive, ``reason`` the lifecycle's answer."""

    epoch: int
    seed: int
    from_state: str
    to_state: str
    accepted: bool
    why: str
    reason: str


@dataclass
class SeedLife:
    """One life of a seed slot, from germination to the end of the run or its recycling."""

    seed: int
    blueprint: str
    strategy: str
    germinated_epoch: int
    path: list[tuple[int, str]] = field(default_factory=list)
    last_delta: float = math.nan
    ended_epoch: int | None = None

    @property
    def outcome(self) -> str:
        """The last state of this life."""
        return self.path[-1][1] if self.path else "GERMINATED"


class SeedController:
    """Drives the seeds of ``layer`` through the lifecycle (module docs).

    Args:
        layer: a :class:`~kasmina.ChunkedKasminaLayer`.
        config: the controller's settings.
        flags: optional :class:`~kasmina.FeatureFlags`; its ``check_strategy`` vets the
            grafting strategy (``adaptive_grafting=false`` refuses ``adaptive``).
    """

    def __init__(self, layer: Any, config: ControllerConfig | None = None, flags: Any = None) -> None:
        self.layer = layer
        self.config = config if config is not None else ControllerConfig()
        if flags is not None:
            flags.check_strategy(self.config.strategy)
        for blueprint in self.config.blueprints:
            layer.blueprint_registry.resolve(blueprint)
        n = layer.num_seeds
        self.best_loss = math.inf
        self.plateau = 0
        self.next_blueprint = 0
        self.germ_loss = torch.full((n,), math.nan)
        self.delta = torch.full((n,), math.nan)
        self.prev_predictions: Tensor | None = None
        self.stability = math.nan
        self.lives: list[SeedLife] = []
        self._current: dict[int, int] = {}  # seed -> index into lives
        self._seen = layer.state.history_count.detach().cpu().clone()

    # ---- the epoch step ----------------------------------------------------------------
    def step(self, epoch: int, val_loss: float, val_predictions: Tensor, ablate: AblationFn | None = None) -> list[Decision]:
        """Measure, decide and request transitions for every seed; returns the decisions.

        ``val_loss``: validation loss of the full network; ``val_predictions``: (N,)
        predicted classes on the validation set; ``ablate``: validation losses without
        given seeds (without it, performance deltas are unknown and no seed passes an
        evaluation)."""
        if not math.isfinite(val_loss):
            raise ValueError(f"val_loss must be finite, got {val_loss}")
        self._observe(epoch)
        self._measure(val_loss, val_predictions, ablate)
        decisions = self._request(epoch, val_loss)
        self._observe(epoch)  # close recycled lives before a slot is germinated again
        decisions += self._germinate(epoch, val_loss)
        self._observe(epoch)
        return decisions

    def _measure(self, val_loss: float, predictions: Tensor, ablate: AblationFn | None) -> None:
        predictions = predictions.detach().cpu()
        if self.prev_predictions is not None and self.prev_predictions.shape == predictions.shape:
            self.stability = float((predictions == self.prev_predictions).float().mean())
        self.prev_predictions = predictions.clone()
        alpha = self.layer.get_alpha().detach().cpu()
        self.delta.fill_(math.nan)
        running = torch.nonzero(alpha > 0).flatten()
        if ablate is not None and running.numel():
            without = ablate(running).detach().cpu().double()
            self.delta[running] = ((without - val_loss) / without).float()
        live = torch.nonzero(self._states_cpu() != int(S.DORMANT)).flatten()
        if live.numel():
            self.layer.report_metrics(
                live,
                performance_delta=self.delta[live],
                total_improvement=self.delta[live],
                stability_score=self.stability,
                final_stability=self.stability,
            )

    def _request(self, epoch: int, val_loss: float) -> list[Decision]:
        policy: LifecyclePolicy = self.layer.lifecycle.policy
        states = self._states_cpu()
        epochs = self.layer.state.state[:, StateColumn.EPOCHS_IN_STATE].detach().cpu().long()
        alpha = self.layer.get_alpha().detach().cpu()
        min_epochs = torch.tensor(policy.min_epochs)[states]
        delta_ok = self.delta > policy.param("min_performance_delta")
        unstable_loss = val_loss > self.config.rollback_loss_ratio * self.germ_loss  # False where NaN
        unstable_net = not (self.stability >= policy.param("min_stability")) and not math.isnan(self.stability)

        target = torch.full_like(states, _NONE)
        why = [""] * states.numel()

        def choose(mask: Tensor, to: int, motive: str) -> None:
            pick = mask & (target == _NONE)
            target[pick] = to
            for seed in torch.nonzero(pick).flatten().tolist():
                why[seed] = motive

        in_state = {s: states == int(s) for s in S}
        over = {
            S.TRAINING: epochs >= math.ceil(self.config.training_budget * policy.min_epochs_of(S.TRAINING)),
            S.EVALUATING: epochs >= math.ceil(self.config.evaluation_budget * policy.min_epochs_of(S.EVALUATING)),
            S.FINE_TUNING: epochs >= math.ceil(self.config.evaluation_budget * policy.min_epochs_of(S.FINE_TUNING)),
        }
        grafted = torch.isin(states, torch.tensor([int(s) for s in _GRAFTED]))
        moving = torch.isin(states, torch.tensor([int(s) for s in _MOVING_ALPHA]))
        spike = f"unstable: val loss {val_loss:.4f} > {self.config.rollback_loss_ratio}x its value at germination"
        choose(grafted & unstable_loss, S.ROLLED_BACK, spike)
        if unstable_net:
            choose(moving, S.ROLLED_BACK, f"unstable: stability {self.stability:.3f} < min_stability")
        choose(in_state[S.GERMINATED], S.TRAINING, "start training")
        choose(in_state[S.TRAINING] & over[S.TRAINING], S.CULLED, "reconstruction did not converge within the training budget")
        choose(in_state[S.TRAINING] & (epochs >= min_epochs), S.GRAFTING, "reconstruction converged")
        choose(in_state[S.GRAFTING] & (alpha >= 1.0), S.STABILIZATION, "grafting ramp complete")
        choose(in_state[S.STABILIZATION] & (epochs >= min_epochs), S.EVALUATING, "stabilized")
        choose(in_state[S.EVALUATING] & delta_ok & (epochs >= min_epochs), S.FINE_TUNING, "positive evaluation")
        choose(in_state[S.EVALUATING] & ~delta_ok & (epochs >= min_epochs), S.CULLED, "negative evaluation")
        choose(in_state[S.FINE_TUNING] & ~delta_ok & over[S.FINE_TUNING], S.CULLED, "no improvement after fine-tuning")
        choose(in_state[S.FINE_TUNING] & (epochs >= min_epochs), S.FOSSILIZED, "fine-tuned")
        retired = torch.isin(states, torch.tensor(_RETIRED))
        choose(retired & (epochs >= min_epochs), S.DORMANT, "recycle the slot")

        decisions = self._submit(epoch, states, target, why)
        # Second phase: a seed whose request out of EVALUATING or FINE_TUNING was refused
        # past the state's budget leaves it anyway: an evaluation that was neither good
        # nor clearly bad is rolled back, a fine-tuning that did not fossilize is culled.
        fallback = torch.zeros_like(target).fill_(_NONE)
        for d in decisions:
            if d.accepted:
                continue
            if d.from_state == "EVALUATING" and over[S.EVALUATING][d.seed]:
                fallback[d.seed] = int(S.ROLLED_BACK)
                why[d.seed] = (
                    f"no measurable benefit within the evaluation budget (delta {float(self.delta[d.seed]):+.4f}, "
                    f"{d.to_state} refused: {d.reason})"
                )
            elif d.from_state == "FINE_TUNING" and d.to_state == "FOSSILIZED" and over[S.FINE_TUNING][d.seed]:
                fallback[d.seed] = int(S.CULLED)
                why[d.seed] = f"not fossilized within the fine-tuning budget (FOSSILIZED refused: {d.reason})"
        if (fallback != _NONE).any():
            decisions += self._submit(epoch, self._states_cpu(), fallback, why)
        return decisions

    def _submit(self, epoch: int, states: Tensor, target: Tensor, why: list[str]) -> list[Decision]:
        ids = torch.nonzero(target != _NONE).flatten()
        if not ids.numel():
            return []
        context = self._context(ids)
        codes = self.layer.lifecycle.request_transitions(ids, states[ids], target[ids], context).cpu().tolist()
        out = []
        for seed, src, dst, code in zip(ids.tolist(), states[ids].tolist(), target[ids].tolist(), codes, strict=True):
            out.append(Decision(epoch, seed, STATE_NAMES[src], STATE_NAMES[dst], code == Reason.OK, why[seed], Reason(code).name))
        return out

    def _context(self, ids: Tensor) -> Tensor:
        """(K, F) context in ``CONTEXT_FIELDS`` order: what the layer measured and was told."""
        layer = self.layer
        reported = layer.reported[ids.to(layer.reported.device), : len(CONTEXT_FIELDS)].detach().cpu().clone()
        recon = layer.reconstruction_loss[ids.to(layer.reconstruction_loss.device)].detach().cpu()
        column = _FIELD["reconstruction_loss"]
        reported[:, column] = torch.where(torch.isnan(reported[:, column]), recon, reported[:, column])
        return reported

    def _germinate(self, epoch: int, val_loss: float) -> list[Decision]:
        if val_loss < self.best_loss * (1.0 - self.config.plateau_min_delta):
            self.best_loss = val_loss
            self.plateau = 0
            return []
        self.plateau += 1
        states = self._states_cpu()
        active = int(torch.isin(states, torch.tensor(_ACTIVE)).sum())
        dormant = torch.nonzero(states == int(S.DORMANT)).flatten()
        if self.plateau < self.config.plateau_patience or active >= self.config.max_active or not dormant.numel():
            return []
        # The dormant chunk whose activations vary most carries the most signal to build on.
        variance = self.layer.chunk_var.detach().cpu()[dormant].nan_to_num(-1.0)
        seed = int(dormant[int(torch.argmax(variance))])
        blueprint = self.config.blueprints[self.next_blueprint % len(self.config.blueprints)]
        result = self.layer.germinate(seed, blueprint, self.config.strategy)
        if result.success:
            self.next_blueprint += 1
            self.plateau = 0
            self.germ_loss[seed] = val_loss
            name = self.layer.blueprint_registry[self.layer.blueprint_registry.resolve(blueprint)].name
            self._current[seed] = len(self.lives)
            self.lives.append(SeedLife(seed, name, self.config.strategy, epoch))
        why = f"validation loss plateaued for {self.config.plateau_patience} epochs"
        return [Decision(epoch, seed, "DORMANT", "GERMINATED", result.success, why, result.code.name)]

    # ---- bookkeeping -------------------------------------------------------------------
    def _states_cpu(self) -> Tensor:
        return self.layer.state.state[:, StateColumn.LIFECYCLE_STATE].detach().cpu().long()

    def _observe(self, epoch: int) -> None:
        """Record every transition committed since the last call (whoever made it)."""
        counts = self.layer.state.history_count.detach().cpu()
        changed = torch.nonzero(counts != self._seen).flatten().tolist()
        if not changed:
            return
        history = self.layer.state.history.detach().cpu()
        for seed in changed:
            for n in range(int(self._seen[seed]), int(counts[seed])):
                src, dst = history[seed, n % HISTORY_LENGTH].tolist()
                self._record(epoch, seed, src, dst)
        self._seen = counts.clone()

    def _record(self, epoch: int, seed: int, src: int, dst: int) -> None:
        index = self._current.get(seed)
        if index is None:  # a life the controller did not start (e.g. germinated by hand)
            if dst != int(S.GERMINATED):
                return
            self._current[seed] = index = len(self.lives)
            bp = int(self.layer.state.state[seed, StateColumn.BLUEPRINT_ID])
            name = self.layer.blueprint_registry[bp].name if bp in self.layer.blueprint_registry else str(bp)
            self.lives.append(SeedLife(seed, name, "?", epoch))
        life = self.lives[index]
        if dst == int(S.DORMANT):  # recycled: this life is over
            life.ended_epoch = epoch
            del self._current[seed]
            self.germ_loss[seed] = math.nan
            return
        life.path.append((epoch, STATE_NAMES[dst]))
        if not math.isnan(float(self.delta[seed])):
            life.last_delta = float(self.delta[seed])
        if STATE_KINDS[dst] == "retired" or STATE_NAMES[dst] == "FOSSILIZED":
            life.ended_epoch = epoch

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue a run exactly (plain values and tensors)."""
        return {
            "best_loss": self.best_loss,
            "plateau": self.plateau,
            "next_blueprint": self.next_blueprint,
            "germ_loss": self.germ_loss.clone(),
            "delta": self.delta.clone(),
            "prev_predictions": None if self.prev_predictions is None else self.prev_predictions.clone(),
            "stability": self.stability,
            "lives": [asdict(life) for life in self.lives],
            "current": {str(k): v for k, v in self._current.items()},
            "seen": self._seen.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best_loss = float(state["best_loss"])
        self.plateau = int(state["plateau"])
        self.next_blueprint = int(state["next_blueprint"])
        self.germ_loss = state["germ_loss"].clone().float()
        self.delta = state["delta"].clone().float()
        prev = state["prev_predictions"]
        self.prev_predictions = None if prev is None else prev.clone()
        self.stability = float(state["stability"])
        self.lives = [
            SeedLife(**{**life, "path": [(int(e), str(s)) for e, s in life["path"]]}) for life in state["lives"]
        ]
        self._current = {int(k): int(v) for k, v in state["current"].items()}
        self._seen = state["seen"].clone()

    # ---- queries -----------------------------------------------------------------------
    def active_count(self) -> int:
        """Seeds in an active state (GERMINATED … FINE_TUNING)."""
        return int(torch.isin(self._states_cpu(), torch.tensor(_ACTIVE)).sum())

