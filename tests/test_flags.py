"""FeatureFlags: loading, validation, deterministic rollout, and what each switch does."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from kasmina.flags import FeatureFlagError, FeatureFlags, rollout_bucket

SEED_DOCUMENT = {
    "extended_lifecycle": {
        "enabled": False,
        "rollout_percentage": 0,
        "features": {"use_11_states": True, "enable_checkpoints": True, "adaptive_grafting": True},
    }
}


def doc(**section) -> dict:
    out = json.loads(json.dumps(SEED_DOCUMENT))
    features = section.pop("features", None)
    out["extended_lifecycle"].update(section)
    if features is not None:
        out["extended_lifecycle"]["features"].update(features)
    return out


def test_seed_document_loads_from_dict_json_and_path(tmp_path):
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(SEED_DOCUMENT))
    for source in (SEED_DOCUMENT, json.dumps(SEED_DOCUMENT), str(path), path):
        flags = FeatureFlags.load(source)
        assert flags == FeatureFlags()
        assert flags.to_dict() == SEED_DOCUMENT


def test_missing_keys_take_defaults():
    flags = FeatureFlags.load({"extended_lifecycle": {"enabled": True, "rollout_percentage": 25.5}})
    assert flags == FeatureFlags(enabled=True, rollout_percentage=25.5)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({}, "missing the 'extended_lifecycle' section"),
        ({"extended_lifecycle": {}, "extra": 1}, "unknown key 'extra'"),
        ({"extended_lifecycle": []}, "extended_lifecycle must be a JSON object"),
        (doc(enabeld=True), "unknown key 'enabeld'"),
        (doc(features={"use_12_states": True}), "extended_lifecycle.features: unknown key 'use_12_states'"),
        (doc(enabled="yes"), 'extended_lifecycle.enabled must be true or false, got "yes"'),
        (doc(enabled=1), "extended_lifecycle.enabled must be true or false, got 1"),
        (doc(rollout_percentage=101), "rollout_percentage must be a number from 0 to 100, got 101"),
        (doc(rollout_percentage=-1), "got -1"),
        (doc(rollout_percentage="50"), 'got "50"'),
        (doc(rollout_percentage=True), "got true"),
        (doc(features={"enable_checkpoints": None}), "extended_lifecycle.features.enable_checkpoints must be true or false"),
        (doc(features={"use_11_states": False}), "no 4-state mode"),
    ],
)
def test_invalid_documents_name_the_bad_key_or_value(document, fragment):
    with pytest.raises(FeatureFlagError) as info:
        FeatureFlags.load(document)
    assert fragment in str(info.value)


def test_bad_json_text_and_missing_file(tmp_path):
    with pytest.raises(FeatureFlagError, match="not valid JSON"):
        FeatureFlags.load("{not json")
    with pytest.raises(FeatureFlagError, match="cannot read"):
        FeatureFlags.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc(rollout_percentage=200)))
    with pytest.raises(FeatureFlagError, match=r"bad\.json: .*rollout_percentage"):
        FeatureFlags.load(bad)
    with pytest.raises(FeatureFlagError, match="expected a dict"):
        FeatureFlags.load(42)  # type: ignore[arg-type]


def test_rollout_bucket_is_sha256_and_stable_across_processes():
    ids = [f"model.layer{i}" for i in range(50)]
    here = [rollout_bucket(i) for i in ids]
    assert here == [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") % 100 for i in ids]
    code = (
        "import sys, json; from kasmina.flags import rollout_bucket; print(json.dumps([rollout_bucket(i) for i in sys.argv[1:]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *ids],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "KASMINA_DISABLE_EXTENSION": "1", "PATH": ""},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    with pytest.raises(FeatureFlagError, match="non-empty string"):
        rollout_bucket("")


def test_rollout_percentage_selects_buckets_monotonically():
    ids = [f"layer{i}" for i in range(400)]
    assert not any(FeatureFlags(enabled=False, rollout_percentage=100).is_enabled_for(i) for i in ids)
    assert not any(FeatureFlags(enabled=True, rollout_percentage=0).is_enabled_for(i) for i in ids)
    assert all(FeatureFlags(enabled=True, rollout_percentage=100).is_enabled_for(i) for i in ids)
    previous: set[str] = set()
    for pct in (1, 10, 25, 50, 100):
        chosen = {i for i in ids if FeatureFlags(enabled=True, rollout_percentage=pct).is_enabled_for(i)}
        assert previous <= chosen
        assert chosen == {i for i in ids if rollout_bucket(i) < pct}
        previous = chosen
    quarter = len({i for i in ids if rollout_bucket(i) < 25}) / len(ids)
    assert 0.15 < quarter < 0.35


def test_adaptive_grafting_switch():
    assert FeatureFlags().check_strategy("adaptive") == "adaptive"
    off = FeatureFlags(adaptive_grafting=False)
    assert off.check_strategy("linear") == "linear"
    assert off.check_strategy(0) == "linear"
    with pytest.raises(FeatureFlagError, match="adaptive_grafting=false"):
        off.check_strategy("adaptive")
    with pytest.raises(FeatureFlagError, match="adaptive_grafting=false"):
        off.check_strategy(3)
    with pytest.raises(FeatureFlagError, match="unknown grafting strategy 'bogus'"):
        off.check_strategy("bogus")
    with pytest.raises(FeatureFlagError, match="unknown grafting strategy id 99"):
        off.check_strategy(99)


def test_wrap_disabled_is_the_host_itself_and_enabled_is_a_seeded_layer(tmp_path):
    from torch import nn

    from kasmina.layer import ChunkedKasminaLayer

    host = nn.Linear(6, 4)
    ids = [f"block{i}" for i in range(40)]
    half = FeatureFlags(enabled=True, rollout_percentage=50)
    for layer_id in ids:
        wrapped = half.wrap(host, layer_id, num_seeds=2)
        if rollout_bucket(layer_id) < 50:
            assert isinstance(wrapped, ChunkedKasminaLayer) and wrapped.base_layer is host
            assert wrapped.layer_id == layer_id
        else:
            assert wrapped is host  # an exact pass-through: the very same module
    assert FeatureFlags().wrap(host, "block0", num_seeds=2) is host

    everyone = FeatureFlags(enabled=True, rollout_percentage=100)
    layer = everyone.wrap(host, "enc", num_seeds=2, checkpoint_dir=tmp_path / "ck")
    assert layer.lifecycle.checkpoint_manager is not None and (tmp_path / "ck" / "active").is_dir()
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), host(x))  # all seeds dormant: the host's output, bit for bit
    no_ckpt = FeatureFlags(enabled=True, rollout_percentage=100, enable_checkpoints=False)
    layer = no_ckpt.wrap(host, "enc", num_seeds=2, checkpoint_dir=tmp_path / "other")
    assert layer.lifecycle.checkpoint_manager is None and not (tmp_path / "other").exists()
    with pytest.raises(FeatureFlagError, match="pass checkpoint_dir"):
        everyone.wrap(host, "enc", num_seeds=2, checkpoint_manager=object())


def test_apply_wraps_keeps_and_unwraps():
    from torch import nn

    from kasmina import LifecyclePolicy
    from kasmina.layer import ChunkedKasminaLayer

    host = nn.Linear(6, 4)
    on = FeatureFlags(enabled=True, rollout_percentage=100)
    off = FeatureFlags(enabled=False)
    layer = on.apply(host, "enc", num_seeds=2)
    assert isinstance(layer, ChunkedKasminaLayer) and on.apply(layer, "enc", num_seeds=2) is layer
    assert off.apply(host, "enc", num_seeds=2) is host
    assert off.apply(layer, "enc", num_seeds=2) is host  # nothing contributes: back to the host

    policy = LifecyclePolicy.default().with_overrides(min_epochs={"TRAINING": 0, "GRAFTING": 1})
    grown = ChunkedKasminaLayer(host, 2, layer_id="enc", policy=policy)
    assert grown.germinate(1, "mlp").success
    assert grown.transition(1, "GERMINATED", "TRAINING").success
    assert grown.transition(1, "TRAINING", "GRAFTING", {"reconstruction_loss": 0.0}).success
    grown.step_epoch()  # the ramp of one epoch: alpha 1
    with pytest.raises(FeatureFlagError, match=r"seeds \[1\] contribute"):
        off.apply(grown, "enc", num_seeds=2)
