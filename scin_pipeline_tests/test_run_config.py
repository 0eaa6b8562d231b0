"""Run config from the command line: --config FILE (Dagster run config, YAML) and --set KEY=VALUE."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance, RunsFilter

from scin_pipeline.cli import EXIT_USAGE, UserConfigError, main, user_run_config
from scin_pipeline.runner import RunConfigError, merge_run_config, validate_job_run_config
from scin_pipeline_tests.tiny_mirror import write_tiny_mirror

GATE = "quality_filtered_index"


def test_merge_is_deep_and_the_override_wins():
    base = {"ops": {"a": {"config": {"x": 1, "y": 2}}, "b": {"config": {"z": 3}}}, "resources": {"r": 1}}
    merged = merge_run_config(base, {"ops": {"a": {"config": {"y": 20}}}, "resources": {"r": {"config": {}}}})
    assert merged == {
        "ops": {"a": {"config": {"x": 1, "y": 20}}, "b": {"config": {"z": 3}}},
        "resources": {"r": {"config": {}}},
    }
    assert base["ops"]["a"]["config"]["y"] == 2  # not modified in place


def test_files_merge_in_order_and_set_takes_op_dot_field(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("ops:\n  image_quality:\n    config:\n      workers: 2\n      dark_relative_min: 0.3\n")
    second = tmp_path / "b.yaml"
    second.write_text("ops:\n  image_quality:\n    config:\n      workers: 1\n")
    config = user_run_config(
        [str(first), str(second)],
        [f"{GATE}.max_quarantined_fraction=0.2", "resources.storage.config.data_root=/x", "image_quality.workers=3"],
    )
    assert config["ops"]["image_quality"]["config"] == {"workers": 3, "dark_relative_min": 0.3}
    assert config["ops"][GATE]["config"]["max_quarantined_fraction"] == 0.2  # a float, read as YAML
    assert config["resources"]["storage"]["config"]["data_root"] == "/x"


@pytest.mark.parametrize("bad", ["novalue", "=1", "a=1", "a..b=1"])
def test_a_malformed_set_is_named(bad):
    with pytest.raises(UserConfigError, match="--set"):
        user_run_config([], [bad])


def test_validation_names_the_key():
    validate_job_run_config("curation_job", {"ops": {GATE: {"config": {"max_quarantined_fraction": 0.2}}}})
    with pytest.raises(RunConfigError, match=rf"unknown key ops\.{GATE}\.config\.max_quarantined_fractio\b"):
        validate_job_run_config("curation_job", {"ops": {GATE: {"config": {"max_quarantined_fractio": 0.2}}}})
    with pytest.raises(RunConfigError, match=rf"ops\.{GATE}\.config\.max_quarantined_fraction: .*Float"):
        validate_job_run_config("curation_job", {"ops": {GATE: {"config": {"max_quarantined_fraction": "lots"}}}})


def test_a_bad_key_in_a_config_file_is_one_line_naming_it_and_nothing_runs(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"ops:\n  {GATE}:\n    config:\n      max_quarantine_fraction: 0.5\n")
    data = tmp_path / "data"
    assert main(["run", "--source", str(mirror), "--data-root", str(data), "--config", str(bad)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"ops.{GATE}.config.max_quarantine_fraction" in err and "max_quarantined_fraction" in err
    if (data / "dagster_home").is_dir():  # validated before any run was created
        with DagsterInstance.from_config(str(data / "dagster_home")) as instance:
            assert not instance.get_runs(RunsFilter())
    missing = tmp_path / "nope.yaml"
    assert main(["run", "--source", str(mirror), "--data-root", str(data), "--config", str(missing)]) == EXIT_USAGE
    assert "nope.yaml" in capsys.readouterr().err


def test_a_config_file_relaxing_the_quarantine_gate_reaches_the_run(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    data = tmp_path / "data"
    select = ["--select", f"+key:{GATE}"]
    args = ["run", "--source", str(mirror), "--data-root", str(data), *select]
    assert main(args) == 1  # the tiny mirror has more broken files than the default 10 %
    assert "quarantined_fraction_below_threshold" in capsys.readouterr().out
    relaxed = tmp_path / "relaxed.yaml"
    relaxed.write_text(f"ops:\n  {GATE}:\n    config:\n      max_quarantined_fraction: 1.0\n")
    assert main([*args, "--config", str(relaxed)]) == 0
    assert main([*args, "--set", f"{GATE}.max_quarantined_fraction=1"]) == 0
    with DagsterInstance.from_config(str(data / "dagster_home")) as instance:
        runs = instance.get_runs(RunsFilter(job_name="curation_job"))  # newest first
        given = [r.run_config.get("ops", {}).get(GATE, {}).get("config", {}) for r in runs]
        assert [c.get("max_quarantined_fraction") for c in given] == [1, 1.0, None]
        # What the runner builds is still there: the user's file is merged over it, not instead of it.
        assert runs[0].run_config["resources"]["storage"]["config"]["data_root"] == str(data.resolve())
