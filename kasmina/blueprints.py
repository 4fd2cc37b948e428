"""Blueprints: the small sub-modules a seed grows on its chunk, evaluated in batches.

A *blueprint kind* (:class:`BlueprintKind`) maps a chunk of width ``w`` to a chunk of
width ``w``. Each germinated seed owns its own parameters (a :class:`SeedBlueprint`,
allocated at germination and freed on recycle, so an optimizer can add and drop them
and keep per-seed state), but all seeds that share a kind and a chunk width are
evaluated in **one** call: :func:`evaluate_group` stacks their parameters
(``torch.stack`` of a cached list: one op per parameter name, whatever the number of
seeds) and runs the kind's batched formula (``bmm``/``baddbmm``) on a (K, N, w) input.

Kinds are registered by integer id in a :class:`BlueprintRegistry` (the id stored in the
BLUEPRINT_ID column; -1 means "no blueprint"). The default registry holds:

========  ===================  ==========================================================
id        name                 formula (x: a chunk, row vector)
========  ===================  ==========================================================
1         ``mlp``              ``relu(x W1 + b1) W2 + b2``, hidden = 2·w (default init)
2         ``low_rank``         ``x + (x A) B``, rank 4, B zero-initialised (identity)
3         ``residual_linear``  ``x + x W + b``, W and b zero-initialised (identity)
========  ===================  ==========================================================
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_BLUEPRINTS",
    "NO_BLUEPRINT",
    "BlueprintKind",
    "BlueprintRegistry",
    "LowRankBlueprint",
    "MLPBlueprint",
    "ResidualLinearBlueprint",
    "SeedBlueprint",
    "evaluate_group",
]

NO_BLUEPRINT = -1
"""The BLUEPRINT_ID of a seed without a blueprint."""


def _uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """``nn.Linear``'s default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


class BlueprintKind(ABC):
    """A family of blueprints: its parameters for a chunk width and its batched formula.

    Subclasses are small frozen dataclasses (their fields are the kind's settings) with a
    ``name``; :meth:`forward` must treat the leading K dimension as independent seeds.
    """

    name: ClassVar[str]

    @abstractmethod
    def init(self, width: int) -> dict[str, Tensor]:
        """Fresh float32 parameter values of one seed with a chunk of ``width`` features."""

    @abstractmethod
    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Outputs (K, N, w) of K seeds: ``params`` are stacked (K, ...) tensors and ``x``
        is (K, N, w), in the parameters' dtype."""

    @abstractmethod
    def flops_per_row(self, width: int) -> int:
        """Multiply-adds ×2 per input row of one seed (for benchmarks and planning)."""


@dataclass(frozen=True)
class MLPBlueprint(BlueprintKind):
    """Two-layer perceptron per chunk: ``relu(x W1 + b1) W2 + b2`` with ``hidden_ratio·w``
    hidden units (at least 1). Initialised like ``nn.Linear``."""

    hidden_ratio: float = 2.0
    name: ClassVar[str] = "mlp"

    def __post_init__(self) -> None:
        if not self.hidden_ratio > 0:
            raise ValueError(f"hidden_ratio={self.hidden_ratio!r}: must be > 0")

    def hidden(self, width: int) -> int:
        """Hidden units for a chunk of ``width`` features."""
        return max(1, round(self.hidden_ratio * width))

    def init(self, width: int) -> dict[str, Tensor]:
        h = self.hidden(width)
        return {
            "w1": _uniform((width, h), width),
            "b1": _uniform((h,), width),
            "w2": _uniform((h, width), h),
            "b2": _uniform((width,), h),
        }

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        hidden = torch.relu(torch.baddbmm(params["b1"].unsqueeze(1), x, params["w1"]))
        return torch.baddbmm(params["b2"].unsqueeze(1), hidden, params["w2"])

    def flops_per_row(self, width: int) -> int:
        return 4 * width * self.hidden(width)


@dataclass(frozen=True)
class LowRankBlueprint(BlueprintKind):
    """Low-rank residual adapter ``x + (x A) B`` with ``rank`` (at most the width); ``A``
    is initialised like ``nn.Linear`` and ``B`` to zero, so it starts as the identity."""

    rank: int = 4
    name: ClassVar[str] = "low_rank"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: must be an integer >= 1")

    def init(self, width: int) -> dict[str, Tensor]:
        r = min(self.rank, width)
        return {"a": _uniform((width, r), width), "b": torch.zeros(r, width)}

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return torch.baddbmm(x, torch.bmm(x, params["a"]), params["b"])

    def flops_per_row(self, width: int) -> int:
        return 4 * width * min(self.rank, width)


@dataclass(frozen=True)
class ResidualLinearBlueprint(BlueprintKind):
    """Zero-initialised residual linear map ``x + x W + b``: the identity at germination."""

    name: ClassVar[str] = "residual_linear"

    def init(self, width: int) -> dict[str, Tensor]:
        return {"w": torch.zeros(width, width), "b": torch.zeros(width)}

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return x + torch.baddbmm(params["b"].unsqueeze(1), x, params["w"])

    def flops_per_row(self, width: int) -> int:
        return 2 * width * width


class BlueprintRegistry(Mapping[int, BlueprintKind]):
    """Blueprint kinds by id (ids >= 0, unique names); look up by id or by name."""

    def __init__(self, kinds: Mapping[int, BlueprintKind] | None = None) -> None:
        self._kinds: dict[int, BlueprintKind] = {}
        for kind_id, kind in (kinds or {}).items():
            self.register(kind_id, kind)

    def register(self, kind_id: int, kind: BlueprintKind) -> None:
        """Add ``kind`` under ``kind_id``; ids and names must be new."""
        if isinstance(kind_id, bool) or not isinstance(kind_id, int) or kind_id < 0:
            raise ValueError(f"blueprint id {kind_id!r}: must be an integer >= 0 ({NO_BLUEPRINT} means none)")
        if not isinstance(kind, BlueprintKind):
            raise TypeError(f"blueprint {kind_id} must be a BlueprintKind, got {type(kind).__name__}")
        if kind_id in self._kinds:
            raise ValueError(f"blueprint id {kind_id} is already registered ({self._kinds[kind_id].name})")
        if any(k.name == kind.name for k in self._kinds.values()):
            raise ValueError(f"a blueprint named {kind.name!r} is already registered")
        self._kinds[kind_id] = kind

    def resolve(self, key: int | str) -> int:
        """The id of a blueprint given by id or name; KeyError naming the key otherwise."""
        if isinstance(key, str):
            for kind_id, kind in self._kinds.items():
                if kind.name == key:
                    return kind_id
        elif not isinstance(key, bool) and isinstance(key, int) and key in self._kinds:
            return key
        known = ", ".join(f"{i} ({k.name})" for i, k in self._kinds.items())
        raise KeyError(f"unknown blueprint {key!r}; registered: {known}")

    @property
    def names(self) -> dict[str, int]:
        """Registered names and their ids."""
        return {kind.name: kind_id for kind_id, kind in self._kinds.items()}

    def __getitem__(self, key: int) -> BlueprintKind:
        return self._kinds[self.resolve(key)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def __repr__(self) -> str:
        return f"BlueprintRegistry({self._kinds!r})"


DEFAULT_BLUEPRINTS = BlueprintRegistry({1: MLPBlueprint(), 2: LowRankBlueprint(), 3: ResidualLinearBlueprint()})
"""The default kinds: 1 ``mlp``, 2 ``low_rank``, 3 ``residual_linear``."""


class SeedBlueprint(nn.Module):
    """The parameters of one seed's blueprint (kind ``kind_id`` on a chunk of ``width``).

    Calling it evaluates this seed alone on (N, w) inputs; the layer evaluates seeds in
    groups with :func:`evaluate_group` instead.
    """

    def __init__(
        self,
        kind: BlueprintKind,
        kind_id: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width={width}: a chunk has at least one feature")
        self.kind = kind
        self.kind_id = kind_id
        self.width = width
        values = kind.init(width)
        if not values:
            raise ValueError(f"blueprint kind {kind.name!r} has no parameters")
        for name, value in values.items():
            self.register_parameter(name, nn.Parameter(value.to(device=device, dtype=dtype)))  # drawn in float32 first

    def forward(self, x: Tensor) -> Tensor:
        params = {name: p.unsqueeze(0) for name, p in self.named_parameters()}
        return self.kind.forward(params, x.unsqueeze(0).to(next(iter(params.values())).dtype))[0].to(x.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind.name} (id {self.kind_id}), width={self.width}"


def evaluate_group(kind: BlueprintKind, stacks: Mapping[str, Sequence[Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate K seeds of one kind and width in one call.

    ``stacks`` maps each parameter name to the K seeds' parameters (a list or tuple, in
    seed order) and ``x`` is (K, N, w); returns (K, N, w) in ``x``'s dtype and a (K,) bool
    tensor saying which seeds have finite parameters. A seed with a non-finite parameter
    is evaluated with zeros instead, so neither its output nor any gradient (its input's
    included) carries the NaN/inf; gradients reach each seed's own parameters that
    require them.
    """
    params = {name: torch.stack(tensors) for name, tensors in stacks.items()}
    finite = torch.stack([torch.isfinite(v).flatten(1).all(1) for v in params.values()]).all(0)
    safe = {name: torch.where(finite.view(-1, *([1] * (v.dim() - 1))), v, 0.0) for name, v in params.items()}
    dtype = next(iter(params.values())).dtype
    return kind.forward(safe, x.to(dtype)).to(x.dtype), finite
