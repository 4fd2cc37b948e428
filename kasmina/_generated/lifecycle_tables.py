"""Generated from spec/lifecycle.yaml (sha256 d199b5287b8b0c95) by `python -m codegen`. Do not edit."""

from __future__ import annotations

from enum import IntEnum

SPEC_SHA256 = 'd199b5287b8b0c95f49a01489ba76faa776a0d62b98f2e79c3d46c62a5f2e45e'

# Layout of the per-seed buffers.
STATE_COLUMNS = (
    'LIFECYCLE_STATE',
    'BLUEPRINT_ID',
    'EPOCHS_IN_STATE',
    'GRAFTING_STRATEGY',
    'PARENT_STATE',
    'CHECKPOINT_ID',
    'EVALUATION_SCORE',
    'ERROR_COUNT',
)
METRIC_COLUMNS = ('loss', 'accuracy', 'stability', 'efficiency')
HISTORY_LENGTH = 10

# States, indexed by id.
NUM_STATES = 11
STATE_NAMES = (
    'DORMANT',
    'GERMINATED',
    'TRAINING',
    'GRAFTING',
    'STABILIZATION',
    'EVALUATING',
    'FINE_TUNING',
    'FOSSILIZED',
    'CULLED',
    'CANCELLED',
    'ROLLED_BACK',
)
STATE_KINDS = (
    'idle',
    'active',
    'active',
    'active',
    'active',
    'active',
    'active',
    'permanent',
    'retired',
    'retired',
    'retired',
)
STATE_MIN_EPOCHS = (0, 0, 100, 50, 20, 30, 50, 0, 20, 0, 20)
STATE_BLUEPRINT_RUNS = (False, False, True, True, True, True, True, True, False, False, False)
STATE_ALPHA_SOURCE = ('zero', 'zero', 'zero', 'strategy', 'one', 'one', 'one', 'one', 'zero', 'zero', 'zero')
STATE_LEARNS_FROM = (
    'none',
    'none',
    'reconstruction',
    'none',
    'none',
    'none',
    'task',
    'none',
    'none',
    'none',
    'none',
)
STATE_REQUIRES_BLUEPRINT = (False, True, True, True, True, True, True, True, False, False, False)
STATE_DESCRIPTIONS = (
    'Monitoring only; the chunk passes through unchanged.',
    'A blueprint is chosen and allocated, queued for training.',
    'The blueprint learns to reconstruct its chunk; the host is untouched.',
    'The blueprint output is blended in while alpha ramps from 0 to 1.',
    'The network settles around the fully grafted blueprint.',
    "The graft's effect on performance is measured.",
    'The blueprint is trained on the task loss.',
    'Permanently part of the network, frozen.',
    'The adaptation failed; the slot is recycled after the embargo.',
    'Stopped by a user or the system; the slot may be recycled at once.',
    'Emergency revert; the slot is recycled after the embargo.',
)

# Guard inputs and thresholds.
CONTEXT_FIELDS = (
    'reconstruction_loss',
    'performance_delta',
    'stability_score',
    'error_rate',
    'total_improvement',
    'final_stability',
)
BUILTINS = ('epochs_in_state', 'error_count')
PARAM_NAMES = (
    'reconstruction_threshold',
    'min_performance_delta',
    'min_stability',
    'cull_performance_delta',
    'cull_error_rate',
    'cull_error_count',
    'fossilize_improvement',
    'fossilize_stability',
)
PARAM_DEFAULTS = (0.01, 0.0, 0.8, -0.05, 0.1, 5.0, 0.01, 0.95)
OPS = ('lt', 'le', 'gt', 'ge', 'eq', 'ne')

# Edges, indexed by edge id: (from state id, to state id).
NUM_EDGES = 19
EDGES = (
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (4, 5),
    (5, 6),
    (6, 7),
    (2, 8),
    (5, 8),
    (6, 8),
    (1, 9),
    (2, 9),
    (3, 10),
    (4, 10),
    (5, 10),
    (6, 10),
    (8, 0),
    (9, 0),
    (10, 0),
)
EDGE_BYPASS_MIN_EPOCHS = (
    False,
    False,
    False,
    False,
    False,
    False,
    False,
    False,
    False,
    False,
    True,
    True,
    True,
    True,
    True,
    True,
    False,
    False,
    False,
)
# Guard id per edge, -1 for an unguarded edge.
EDGE_GUARD = (-1, -1, 0, -1, -1, 1, 2, -1, 3, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1)
# EDGE_MATRIX[from][to] is the edge id, or -1 where there is no edge.
EDGE_MATRIX = (
    (-1, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1),
    (-1, -1, 1, -1, -1, -1, -1, -1, -1, 10, -1),
    (-1, -1, -1, 2, -1, -1, -1, -1, 7, 11, -1),
    (-1, -1, -1, -1, 3, -1, -1, -1, -1, -1, 12),
    (-1, -1, -1, -1, -1, 4, -1, -1, -1, -1, 13),
    (-1, -1, -1, -1, -1, -1, 5, -1, 8, -1, 14),
    (-1, -1, -1, -1, -1, -1, -1, 6, 9, -1, 15),
    (-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
    (16, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
    (17, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
    (18, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
)

# Guards, indexed by guard id. A clause is
# (lhs_is_builtin, lhs_index, op_index, rhs_is_value, rhs_param_index, rhs_value):
# lhs_index indexes CONTEXT_FIELDS or BUILTINS, op_index indexes OPS, and the right
# side is PARAM_NAMES[rhs_param_index] or the literal rhs_value.
GUARD_NAMES = (
    'reconstruction_converged',
    'evaluation_passed',
    'fine_tuning_converged',
    'evaluation_failed',
)
GUARD_IS_ANY = (False, False, False, True)
GUARD_CLAUSES = (
    ((False, 0, 1, False, 0, 0.0),),
    ((False, 1, 2, False, 1, 0.0), (False, 2, 3, False, 2, 0.0)),
    ((False, 4, 3, False, 6, 0.0), (False, 5, 3, False, 7, 0.0)),
    ((False, 1, 0, False, 3, 0.0), (False, 3, 2, False, 4, 0.0), (True, 1, 2, False, 5, 0.0)),
)

GRAFTING_STRATEGY_NAMES = ('linear', 'drift_controlled', 'momentum', 'adaptive', 'stability')

# Reasons, indexed by code.
REASON_NAMES = (
    'OK',
    'UNKNOWN_SEED',
    'STALE_FROM_STATE',
    'INVALID_EDGE',
    'MIN_EPOCHS',
    'GUARD_FAILED',
    'DUPLICATE_IN_BATCH',
)
REASON_MESSAGES = (
    'seed {seed_id}: {from_state} -> {to_state}',
    'seed {seed_id} does not exist (the layer has {num_seeds} seeds)',
    'seed {seed_id} is in {actual_state}, not {from_state}',
    'no transition {from_state} -> {to_state} in the lifecycle',
    'seed {seed_id} has spent {epochs_in_state} of the {min_epochs} epochs {from_state} requires before -> {to_state}',
    "seed {seed_id}: guard '{guard}' of {from_state} -> {to_state} failed: {detail}",
    'seed {seed_id} appears more than once in the batch; each request for it was rejected',
)


class StateColumn(IntEnum):
    """Columns of the int32 per-seed state tensor."""

    LIFECYCLE_STATE = 0
    BLUEPRINT_ID = 1
    EPOCHS_IN_STATE = 2
    GRAFTING_STRATEGY = 3
    PARENT_STATE = 4
    CHECKPOINT_ID = 5
    EVALUATION_SCORE = 6
    ERROR_COUNT = 7


class MetricColumn(IntEnum):
    """Columns of the float32 per-seed metrics tensor."""

    LOSS = 0
    ACCURACY = 1
    STABILITY = 2
    EFFICIENCY = 3


class Reason(IntEnum):
    """Every answer to a transition request."""

    OK = 0
    UNKNOWN_SEED = 1
    STALE_FROM_STATE = 2
    INVALID_EDGE = 3
    MIN_EPOCHS = 4
    GUARD_FAILED = 5
    DUPLICATE_IN_BATCH = 6


class ExtendedLifecycle(IntEnum):
    """The lifecycle states of a seed."""

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    GRAFTING = 3
    STABILIZATION = 4
    EVALUATING = 5
    FINE_TUNING = 6
    FOSSILIZED = 7
    CULLED = 8
    CANCELLED = 9
    ROLLED_BACK = 10

    @property
    def kind(self) -> str:
        """idle, active, permanent or retired."""
        return STATE_KINDS[self]

    @property
    def is_terminal(self) -> bool:
        """The seed's journey has ended here (permanent or retired)."""
        return STATE_KINDS[self] in ("permanent", "retired")

    @property
    def is_active(self) -> bool:
        """A blueprint is being developed in this state."""
        return STATE_KINDS[self] == "active"

    @property
    def requires_blueprint(self) -> bool:
        """A blueprint is allocated to a seed in this state."""
        return STATE_REQUIRES_BLUEPRINT[self]

    @property
    def blueprint_runs(self) -> bool:
        """The layer evaluates the blueprint in this state."""
        return STATE_BLUEPRINT_RUNS[self]

    @property
    def alpha_source(self) -> str:
        """zero, strategy or one."""
        return STATE_ALPHA_SOURCE[self]

    @property
    def learns_from(self) -> str:
        """none, reconstruction or task."""
        return STATE_LEARNS_FROM[self]

    @property
    def min_epochs(self) -> int:
        """Default minimum lifecycle epochs in this state (the spec's)."""
        return STATE_MIN_EPOCHS[self]
