"""Kasmina: morphogenetic training for PyTorch.

Seeds inside a host network germinate small sub-modules (blueprints), train them in
isolation, graft them in with a blending factor alpha, and keep or discard them, all
driven by the lifecycle in ``spec/lifecycle.yaml``.
"""

from ._extension import StaleExtensionError, backend, backend_description
from ._generated.lifecycle_tables import SPEC_SHA256
from .checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointRecovery,
    CheckpointWriteError,
    UnsafeCheckpointError,
)
from .grafting import (
    AdaptiveGrafting,
    DriftControlledGrafting,
    GraftingContext,
    GraftingStrategyBase,
    LinearGrafting,
    MomentumGrafting,
    StabilityGrafting,
)
from .lifecycle import CONTEXT_FIELDS, ExtendedLifecycle, Reason, StateTransition, TransitionContext
from .manager import LifecycleManager, TransitionResult
from .policy import LifecyclePolicy
from .state import ExtendedStateTensor

__version__ = "0.1.0"

__all__ = [
    "CONTEXT_FIELDS",
    "SPEC_SHA256",
    "AdaptiveGrafting",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecovery",
    "CheckpointWriteError",
    "DriftControlledGrafting",
    "ExtendedLifecycle",
    "ExtendedStateTensor",
    "GraftingContext",
    "GraftingStrategyBase",
    "LifecycleManager",
    "LifecyclePolicy",
    "LinearGrafting",
    "MomentumGrafting",
    "Reason",
    "StabilityGrafting",
    "StaleExtensionError",
    "StateTransition",
    "TransitionContext",
    "TransitionResult",
    "UnsafeCheckpointError",
    "__version__",
    "backend",
    "backend_description",
]
