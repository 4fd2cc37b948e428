"""Feature flags for rolling the extended lifecycle out layer by layer.

The flag document is the seed document's JSON::

    {
      "extended_lifecycle": {
        "enabled": false,
        "rollout_percentage": 0,
        "features": {
          "use_11_states": true,
          "enable_checkpoints": true,
          "adaptive_grafting": true
        }
      }
    }

What each switch does:

``enabled``
    Master switch. When false, no layer gets seeds: :meth:`FeatureFlags.wrap` returns
    the host module itself, an exact pass-through, and :meth:`FeatureFlags.apply`
    unwraps a seeded layer back to its host (refused while a seed contributes).
``rollout_percentage``
    0–100. A layer id is hashed with SHA-256 into a bucket 0–99 (the same on every
    process and machine); the layer is enabled when ``enabled`` is true and its bucket is
    below the percentage. Raising the percentage only ever adds layers.
``features.use_11_states``
    Must be true: Kasmina implements the 11-state lifecycle of ``spec/lifecycle.yaml``
    and has no 4-state mode, so ``false`` is refused when the flags are loaded.
``features.enable_checkpoints``
    When false, wrapped layers get no checkpoint manager (nothing is written to disk).
``features.adaptive_grafting``
    When false, the ``adaptive`` grafting strategy is refused
    (:meth:`FeatureFlags.check_strategy`, used by :class:`kasmina.controller.SeedController`).

Missing keys take the values above; unknown keys are errors (a typo must not silently
turn a feature off).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._generated.lifecycle_tables import GRAFTING_STRATEGY_NAMES

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FeatureFlagError", "FeatureFlags", "rollout_bucket"]

_TOP_KEY = "extended_lifecycle"
_SECTION_KEYS = ("enabled", "rollout_percentage", "features")
_FEATURE_KEYS = ("use_11_states", "enable_checkpoints", "adaptive_grafting")
_ADAPTIVE = "adaptive"


class FeatureFlagError(ValueError):
    """The flag document is invalid, or a request conflicts with the flags."""


def rollout_bucket(layer_id: str) -> int:
    """The rollout bucket (0–99) of a layer id: SHA-256 of its UTF-8 bytes, modulo 100.

    Stable across processes, Python versions and machines (unlike ``hash()``)."""
    if not isinstance(layer_id, str) or not layer_id:
        raise FeatureFlagError(f"layer id must be a non-empty string, got {layer_id!r}")
    digest = hashlib.sha256(layer_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def _require_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise FeatureFlagError(f"{key} must be true or false, got {json.dumps(value)}")
    return value


def _require_keys(section: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise FeatureFlagError(f"{where} must be a JSON object, got {json.dumps(section)}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise FeatureFlagError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    return section


@dataclass(frozen=True)
class FeatureFlags:
    """Validated feature flags; build with :meth:`load`, :meth:`from_dict` or :meth:`from_json`."""

    enabled: bool = False
    rollout_percentage: float = 0.0
    use_11_states: bool = True
    enable_checkpoints: bool = True
    adaptive_grafting: bool = True

    def __post_init__(self) -> None:
        for key in ("enabled", "use_11_states", "enable_checkpoints", "adaptive_grafting"):
            _require_bool(getattr(self, key), key)
        pct = self.rollout_percentage
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
            raise FeatureFlagError(f"{_TOP_KEY}.rollout_percentage must be a number from 0 to 100, got {json.dumps(pct)}")
        if not self.use_11_states:
            raise FeatureFlagError(
                f"{_TOP_KEY}.features.use_11_states=false cannot be honoured: Kasmina implements only the "
                "11-state lifecycle of spec/lifecycle.yaml (there is no 4-state mode); set it to true or remove it"
            )

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> FeatureFlags:
        """Validate a parsed flag document (the seed document's JSON shape)."""
        top = _require_keys(document, (_TOP_KEY,), "feature flags")
        if _TOP_KEY not in top:
            raise FeatureFlagError(f"feature flags: missing the {_TOP_KEY!r} section")
        section = _require_keys(top[_TOP_KEY], _SECTION_KEYS, _TOP_KEY)
        features = _require_keys(section.get("features", {}), _FEATURE_KEYS, f"{_TOP_KEY}.features")
        kwargs: dict[str, Any] = {}
        if "enabled" in section:
            kwargs["enabled"] = _require_bool(section["enabled"], f"{_TOP_KEY}.enabled")
        if "rollout_percentage" in section:
            kwargs["rollout_percentage"] = section["rollout_percentage"]
        for key in _FEATURE_KEYS:
            if key in features:
                kwargs[key] = _require_bool(features[key], f"{_TOP_KEY}.features.{key}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> FeatureFlags:
        """Parse and validate a JSON string."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FeatureFlagError(f"feature flags: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
        return cls.from_dict(document)

    @classmethod
    def load(cls, source: dict[str, Any] | str | os.PathLike[str]) -> FeatureFlags:
        """Load flags from a dict, a JSON string, or the path of a JSON file.

        A ``str`` that starts with ``{`` (after whitespace) is JSON text; any other
        ``str`` or path-like is a file name."""
        if isinstance(source, dict):
            return cls.from_dict(source)
        if isinstance(source, str) and source.lstrip().startswith("{"):
            return cls.from_json(source)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise FeatureFlagError(f"feature flags: cannot read {path} ({exc.strerror})") from exc
            try:
                return cls.from_json(text)
            except FeatureFlagError as exc:
                raise FeatureFlagError(f"{path}: {exc}") from exc
        raise FeatureFlagError(f"feature flags: expected a dict, JSON text or a path, got {type(source).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The flag document these flags were loaded from (with defaults filled in)."""
        return {
            _TOP_KEY: {
                "enabled": self.enabled,
                "rollout_percentage": self.rollout_percentage,
                "features": {key: getattr(self, key) for key in _FEATURE_KEYS},
            }
        }

    # ---- decisions -----------------------------------------------------------------
    def is_enabled_for(self, layer_id: str) -> bool:
        """Whether the extended lifecycle is rolled out to this layer id."""
        bucket = rollout_bucket(layer_id)
        return self.enabled and bucket < self.rollout_percentage

    def check_strategy(self, strategy: str | int) -> str:
        """Return the grafting strategy's name, or refuse it when the flags forbid it."""
        if isinstance(strategy, bool) or not isinstance(strategy, (str, int)):
            raise FeatureFlagError(f"grafting strategy must be a name or an id, got {strategy!r}")
        if isinstance(strategy, int):
            if not 0 <= strategy < len(GRAFTING_STRATEGY_NAMES):
                raise FeatureFlagError(f"unknown grafting strategy id {strategy} (known: 0..{len(GRAFTING_STRATEGY_NAMES) - 1})")
            name = GRAFTING_STRATEGY_NAMES[strategy]
        else:
            if strategy not in GRAFTING_STRATEGY_NAMES:
                raise FeatureFlagError(f"unknown grafting strategy {strategy!r} (known: {', '.join(GRAFTING_STRATEGY_NAMES)})")
            name = strategy
        if name == _ADAPTIVE and not self.adaptive_grafting:
            raise FeatureFlagError(
                f"grafting strategy {name!r} is disabled by {_TOP_KEY}.features.adaptive_grafting=false; pick another strategy"
            )
        return name

    def apply(
        self,
        module: nn.Module,
        layer_id: str,
        num_seeds: int,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        **layer_kwargs: Any,
    ) -> nn.Module:
        """Bring ``module`` in line with the flags: wrap a plain host the rollout covers
        (:meth:`wrap`), keep a seeded layer it covers, and unwrap a seeded layer it no
        longer covers back to its host, which is exact only while no seed contributes
        to the output; a layer with a contributing seed (alpha > 0, e.g. FOSSILIZED) is
        refused rather than silently changed."""
        from .layer import ChunkedKasminaLayer

        if not isinstance(module, ChunkedKasminaLayer):
            return self.wrap(module, layer_id, num_seeds, checkpoint_dir, **layer_kwargs)
        if self.is_enabled_for(layer_id):
            return module
        contributing = (module.get_alpha() > 0).nonzero().flatten().tolist()
        if contributing:
            raise FeatureFlagError(
                f"layer {layer_id!r} is outside the rollout but seeds {contributing} contribute to its output; "
                "unwrapping it would change the model (keep it enabled, or retire those seeds first)"
            )
        return module.base_layer

    def wrap(
        self,
        host: nn.Module,
        layer_id: str,
        num_seeds: int,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        **layer_kwargs: Any,
    ) -> nn.Module:
        """Give ``host`` seeds if the rollout covers ``layer_id``, else return ``host`` itself.

        Returns a :class:`kasmina.ChunkedKasminaLayer` around ``host`` when enabled; the
        host object unchanged (an exact pass-through) otherwise. With
        ``enable_checkpoints`` on and a ``checkpoint_dir``, the layer gets a
        :class:`kasmina.CheckpointManager` there; with it off, it gets none."""
        if not self.is_enabled_for(layer_id):
            return host
        from .layer import ChunkedKasminaLayer

        if "checkpoint_manager" in layer_kwargs:
            raise FeatureFlagError("pass checkpoint_dir, not checkpoint_manager: the flags decide whether a layer checkpoints")
        manager = None
        if self.enable_checkpoints and checkpoint_dir is not None:
            from .checkpoint import CheckpointManager

            manager = CheckpointManager(checkpoint_dir)
        return ChunkedKasminaLayer(host, num_seeds, layer_id=layer_id, checkpoint_manager=manager, **layer_kwargs)
