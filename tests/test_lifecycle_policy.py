"""LifecyclePolicy: spec defaults, validated overrides, kernel tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kasmina import ExtendedLifecycle as L
from kasmina import LifecyclePolicy
from kasmina._generated import lifecycle_tables as T


def test_default_comes_from_the_spec() -> None:
    policy = LifecyclePolicy.default()
    assert policy.min_epochs == T.STATE_MIN_EPOCHS
    assert policy.params == T.PARAM_DEFAULTS
    assert policy.as_dict()["params"]["reconstruction_threshold"] == T.PARAM_DEFAULTS[0]
    assert policy.min_epochs_of("training") == T.STATE_MIN_EPOCHS[L.TRAINING]


def test_defaults_equal_the_yaml_read_independently() -> None:
    """Against the spec file itself, not the generated tables the policy is built from: a
    generator or loader bug would pass the test above and codegen --check alike."""
    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "spec" / "lifecycle.yaml").read_text())
    policy = LifecyclePolicy.default()
    for state in spec["states"]:
        assert policy.min_epochs_of(state["name"]) == state["min_epochs"], state["name"]
    for param in spec["params"]:
        assert policy.param(param["name"]) == pytest.approx(float(param["default"]), rel=1e-7), param["name"]
    assert len(policy.params) == len(spec["params"]) and len(policy.min_epochs) == len(spec["states"])


def test_overrides_by_name_id_and_enum() -> None:
    base = LifecyclePolicy.default()
    policy = base.with_overrides(min_epochs={"TRAINING": 3, L.GRAFTING: 4, int(L.CULLED): 0}, params={"min_stability": 0.5})
    assert policy.min_epochs_of(L.TRAINING) == 3 and policy.min_epochs_of(L.GRAFTING) == 4
    assert policy.min_epochs_of(L.CULLED) == 0
    assert policy.param("min_stability") == 0.5
    assert base == LifecyclePolicy.default() and policy != base  # immutable
    assert hash(policy) == hash(
        base.with_overrides(min_epochs={"TRAINING": 3, "GRAFTING": 4, "CULLED": 0}, params={"min_stability": 0.5})
    )


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(min_epochs={"NOT_A_STATE": 1}), ValueError, "unknown lifecycle state 'NOT_A_STATE'"),
        (dict(min_epochs={T.NUM_STATES: 1}), ValueError, f"unknown lifecycle state id {T.NUM_STATES}"),
        (dict(min_epochs={"TRAINING": -1}), ValueError, "min_epochs of TRAINING must be in 0..2147483647, got -1"),
        (dict(min_epochs={"TRAINING": 2**31}), ValueError, "got 2147483648"),
        (dict(min_epochs={"TRAINING": 1.5}), TypeError, "min_epochs of TRAINING must be an int, got 1.5"),
        (dict(params={"no_such_param": 1.0}), ValueError, "unknown lifecycle param 'no_such_param'"),
        (dict(params={"min_stability": math.nan}), ValueError, "min_stability must be a finite float32 number, got nan"),
        (dict(params={"min_stability": 10**400}), ValueError, "min_stability must be a finite float32 number"),
        (dict(params={"min_stability": math.inf}), ValueError, "got inf"),
        (dict(params={"min_stability": 1e39}), ValueError, "got 1e\\+39"),
        (dict(params={"min_stability": "high"}), TypeError, "min_stability must be a number, got 'high'"),
    ],
)
def test_bad_overrides_name_the_value(overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        LifecyclePolicy.default().with_overrides(**overrides)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="min_epochs needs"):
        LifecyclePolicy((0,), T.PARAM_DEFAULTS)
    with pytest.raises(ValueError, match="params needs"):
        LifecyclePolicy(T.STATE_MIN_EPOCHS, (0.0,))


def test_tensors_for_the_kernels() -> None:
    policy = LifecyclePolicy.default().with_overrides(params={"min_stability": 0.7})
    min_epochs, params = policy.tensors("cpu")
    assert min_epochs.dtype == torch.int32 and min_epochs.shape == (T.NUM_STATES,)
    assert params.dtype == torch.float32 and params.shape == (len(T.PARAM_NAMES),)
    assert min_epochs.tolist() == list(policy.min_epochs)
    assert params[T.PARAM_NAMES.index("min_stability")].item() == pytest.approx(0.7)
    assert policy.tensors(torch.device("cpu"))[0] is min_epochs  # cached per device
