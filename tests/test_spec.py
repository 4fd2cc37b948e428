"""The spec loader: the default spec is valid, and each class of error is reported as
one line naming the file, the entry and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from codegen.spec_loader import DEFAULT_SPEC_PATH, SpecError, load_spec


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(DEFAULT_SPEC_PATH.read_text())


def _broken(tmp_path: Path, data: dict) -> SpecError:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    for line in info.value.errors:
        assert "broken.yaml: " in line, line
        assert "\n" not in line
    return info.value


def _state(raw: dict, name: str) -> dict:
    return next(s for s in raw["states"] if s["name"] == name)


def test_default_spec_matches_reference_facts() -> None:
    spec = load_spec()
    names = [s.name for s in spec.states]
    assert names[:3] == ["DORMANT", "GERMINATED", "TRAINING"] and names[-1] == "ROLLED_BACK"
    assert [s.id for s in spec.states] == list(range(11))
    assert len(spec.transitions) == 19  # 16 Phase 2 edges + 3 recycle edges
    bypass = {(t.source, t.target) for t in spec.transitions if t.bypass_min_epochs}
    assert all(target in ("CANCELLED", "ROLLED_BACK") for _, target in bypass)
    assert {t for _, t in bypass} == {"CANCELLED", "ROLLED_BACK"}
    assert len(spec.sha256) == 64


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("states: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken\.yaml: line \d+: not valid YAML"):
        load_spec(path)


def test_shape_error_names_entry(tmp_path: Path, raw: dict) -> None:
    _state(raw, "TRAINING")["min_epochs"] = "many"
    err = _broken(tmp_path, raw)
    assert any("states[2].min_epochs" in line and "schema" in line for line in err.errors)


def test_unknown_key_is_rejected(tmp_path: Path, raw: dict) -> None:
    raw["transitions"][0]["weight"] = 3
    err = _broken(tmp_path, raw)
    assert any("transitions[0]" in line and "weight" in line for line in err.errors)


def test_duplicate_state_name(tmp_path: Path, raw: dict) -> None:
    _state(raw, "GERMINATED")["name"] = "DORMANT"
    err = _broken(tmp_path, raw)
    assert any("states[1].name" in line and "used twice" in line for line in err.errors)


def test_duplicate_state_id(tmp_path: Path, raw: dict) -> None:
    _state(raw, "GERMINATED")["id"] = 0
    err = _broken(tmp_path, raw)
    assert any("states[1].id" in line and "used twice" in line for line in err.errors)


def test_ids_not_contiguous(tmp_path: Path, raw: dict) -> None:
    _state(raw, "ROLLED_BACK")["id"] = 42
    err = _broken(tmp_path, raw)
    assert any("not contiguous" in line for line in err.errors)


def test_edge_names_unknown_state(tmp_path: Path, raw: dict) -> None:
    raw["transitions"][3]["to"] = "LIMBO"
    err = _broken(tmp_path, raw)
    assert any("transitions[3].to" in line and "unknown state LIMBO" in line for line in err.errors)


def test_duplicate_edge(tmp_path: Path, raw: dict) -> None:
    raw["transitions"].append(dict(raw["transitions"][0]))
    err = _broken(tmp_path, raw)
    assert any("listed twice" in line for line in err.errors)


def test_unreachable_state(tmp_path: Path, raw: dict) -> None:
    raw["transitions"] = [t for t in raw["transitions"] if t["to"] != "FOSSILIZED"]
    err = _broken(tmp_path, raw)
    assert any("states[7]" in line and "unreachable" in line for line in err.errors)


def test_trap_state(tmp_path: Path, raw: dict) -> None:
    raw["transitions"] = [t for t in raw["transitions"] if t["from"] != "STABILIZATION"]
    err = _broken(tmp_path, raw)
    assert any("STABILIZATION is a trap" in line and "states[4]" in line for line in err.errors)


def test_permanent_state_with_way_out(tmp_path: Path, raw: dict) -> None:
    raw["transitions"].append({"from": "FOSSILIZED", "to": "DORMANT"})
    err = _broken(tmp_path, raw)
    assert any("permanent state FOSSILIZED has outgoing" in line for line in err.errors)


def test_retired_state_must_recycle(tmp_path: Path, raw: dict) -> None:
    raw["transitions"] = [t for t in raw["transitions"] if not (t["from"] == "CULLED" and t["to"] == "DORMANT")]
    raw["transitions"].append({"from": "CULLED", "to": "GERMINATED"})
    err = _broken(tmp_path, raw)
    assert any("cannot be recycled" in line for line in err.errors)


def _guarded(raw: dict, target: str) -> tuple[int, dict]:
    return next((i, t) for i, t in enumerate(raw["transitions"]) if t.get("guard") and t["to"] == target)


def test_guard_unknown_field(tmp_path: Path, raw: dict) -> None:
    i, t = _guarded(raw, "GRAFTING")
    t["guard"]["all"][0]["field"] = "vibes"
    err = _broken(tmp_path, raw)
    assert any(f"transitions[{i}].guard.all[0].field" in line and "vibes" in line for line in err.errors)


def test_guard_unknown_param(tmp_path: Path, raw: dict) -> None:
    i, t = _guarded(raw, "GRAFTING")
    t["guard"]["all"][0]["param"] = "nope"
    err = _broken(tmp_path, raw)
    assert any(f"transitions[{i}].guard.all[0].param" in line and "declare it" in line for line in err.errors)


def test_guard_unknown_builtin(tmp_path: Path, raw: dict) -> None:
    i, t = _guarded(raw, "CULLED")
    t["guard"]["any"][2]["builtin"] = "moon_phase"
    err = _broken(tmp_path, raw)
    assert any(f"transitions[{i}].guard.any[2].builtin" in line for line in err.errors)


def test_guard_unknown_op(tmp_path: Path, raw: dict) -> None:
    i, t = _guarded(raw, "GRAFTING")
    t["guard"]["all"][0]["op"] = "approx"
    err = _broken(tmp_path, raw)
    assert any(f"transitions[{i}].guard.all[0].op" in line and "lt, le, gt, ge, eq, ne" in line for line in err.errors)


@pytest.mark.parametrize("value", [float("inf"), -1.0e39])
def test_guard_value_not_float32(tmp_path: Path, raw: dict, value: float) -> None:
    i, t = _guarded(raw, "GRAFTING")
    del t["guard"]["all"][0]["param"]
    t["guard"]["all"][0]["value"] = value
    err = _broken(tmp_path, raw)
    assert any(f"transitions[{i}].guard.all[0].value" in line and "not a finite float32" in line for line in err.errors)


@pytest.mark.parametrize("value", [float("nan"), 1.0e39])
def test_param_default_not_float32(tmp_path: Path, raw: dict, value: float) -> None:
    raw["params"][0]["default"] = value
    err = _broken(tmp_path, raw)
    assert any("params[0].default" in line and "not a finite float32" in line for line in err.errors)


def test_names_that_differ_only_in_case_clash(tmp_path: Path, raw: dict) -> None:
    raw["layout"]["metric_columns"].append(raw["layout"]["metric_columns"][0].swapcase())  # both emit one upper-case name
    err = _broken(tmp_path, raw)
    assert any("layout.metric_columns" in line and "listed twice" in line for line in err.errors)


def test_float32_max_as_numpy_prints_it_is_a_float32(tmp_path: Path, raw: dict) -> None:
    raw["params"][0]["default"] = 3.4028235e38  # rounds to float32's largest value
    path = tmp_path / "max.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_spec(path).params[0].default == 3.4028235e38


def test_reason_codes_with_a_gap(tmp_path: Path, raw: dict) -> None:
    raw["reasons"][-1]["code"] = len(raw["reasons"]) + 3
    err = _broken(tmp_path, raw)
    assert any("reasons" in line and "not contiguous from 0" in line for line in err.errors)


def test_missing_reason(tmp_path: Path, raw: dict) -> None:
    raw["reasons"] = [r for r in raw["reasons"] if r["name"] != "MIN_EPOCHS"]
    err = _broken(tmp_path, raw)
    assert any("missing reason MIN_EPOCHS" in line for line in err.errors)


def test_reason_unknown_placeholder(tmp_path: Path, raw: dict) -> None:
    raw["reasons"][0]["message"] = "moved {sead_id}"
    err = _broken(tmp_path, raw)
    assert any("reasons[0].message" in line and "{sead_id}" in line for line in err.errors)


def test_missing_state_column(tmp_path: Path, raw: dict) -> None:
    raw["layout"]["state_columns"].remove("ERROR_COUNT")
    err = _broken(tmp_path, raw)
    assert any("layout.state_columns" in line and "ERROR_COUNT" in line for line in err.errors)


def test_all_errors_reported_at_once(tmp_path: Path, raw: dict) -> None:
    raw["transitions"][0]["to"] = "LIMBO"
    raw["params"][0]["default"] = float("inf")
    err = _broken(tmp_path, raw)
    assert len(err.errors) >= 2
