"""Kasmina: morphogenetic training for PyTorch.

Seeds inside a host network germinate small sub-modules (blueprints), train them in
isolation, graft them in with a blending factor alpha, and keep or discard them, all
driven by the lifecycle in ``spec/lifecycle.yaml``.
"""

from ._extension import StaleExtensionError, backend, backend_description
from ._generated.lifecycle_tables import SPEC_SHA256
from .blueprints import (
    DEFAULT_BLUEPRINTS,
    BlueprintKind,
    BlueprintRegistry,
    LowRankBlueprint,
    MLPBlueprint,
    ResidualLinearBlueprint,
)
from .checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointRecovery,
    CheckpointWriteError,
    UnsafeCheckpointError,
)
from .controller import ControllerConfig, SeedController
from .distributed import (
    CommandBatch,
    CommandKind,
    DistributedSyncError,
    LifecycleSync,
    RankDivergenceError,
    SeedCommand,
)
from .distributed_layer import (
    KasminaDDP,
    apply_layer_commands,
    restore_layer_checkpoint,
    save_layer_checkpoint,
    sync_layer_measurements,
)
from .flags import FeatureFlagError, FeatureFlags
from .grafting import (
    AdaptiveGrafting,
    DriftControlledGrafting,
    GraftingContext,
    GraftingStrategyBase,
    LinearGrafting,
    MomentumGrafting,
    StabilityGrafting,
)
from .layer import ChunkedKasminaLayer, EpochReport, LifecycleCommand
from .lifecycle import CONTEXT_FIELDS, ExtendedLifecycle, Reason, StateTransition, TransitionContext
from .manager import LifecycleManager, TransitionResult
from .policy import LifecyclePolicy
from .state import ExtendedStateTensor
from .telemetry import ExtendedTelemetry

__version__ = "0.1.0"

__all__ = [
    "CONTEXT_FIELDS",
    "DEFAULT_BLUEPRINTS",
    "SPEC_SHA256",
    "AdaptiveGrafting",
    "BlueprintKind",
    "BlueprintRegistry",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecovery",
    "CheckpointWriteError",
    "ChunkedKasminaLayer",
    "CommandBatch",
    "CommandKind",
    "ControllerConfig",
    "DistributedSyncError",
    "DriftControlledGrafting",
    "EpochReport",
    "ExtendedLifecycle",
    "ExtendedStateTensor",
    "ExtendedTelemetry",
    "FeatureFlagError",
    "FeatureFlags",
    "GraftingContext",
    "GraftingStrategyBase",
    "KasminaDDP",
    "LifecycleCommand",
    "LifecycleManager",
    "LifecyclePolicy",
    "LifecycleSync",
    "LinearGrafting",
    "LowRankBlueprint",
    "MLPBlueprint",
    "MomentumGrafting",
    "RankDivergenceError",
    "Reason",
    "ResidualLinearBlueprint",
    "SeedCommand",
    "SeedController",
    "StabilityGrafting",
    "StaleExtensionError",
    "StateTransition",
    "TransitionContext",
    "TransitionResult",
    "UnsafeCheckpointError",
    "__version__",
    "apply_layer_commands",
    "backend",
    "backend_description",
    "restore_layer_checkpoint",
    "save_layer_checkpoint",
    "sync_layer_measurements",
]
