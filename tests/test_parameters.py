"""The batch flow's parameters are checked in `start`, before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchscore.batch.parameters import BatchParameters, ParameterError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_sensible_values_pass():
    BatchParameters().check()
    BatchParameters("all", 500, 1.5, "quarantine", 0.02, 0.1).check()
    BatchParameters(max_drift=float("inf")).check()  # never block on drift


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ({"max_bad_rows": 5.0}, "--max_bad_rows 5: must be a share of rows between 0 and 1"),
        ({"max_bad_rows": -0.1}, "--max_bad_rows -0.1: must be a share of rows between 0 and 1"),
        ({"max_drift": -1.0}, "--max_drift -1: must be a PSI of 0 or more"),
        ({"max_drift": float("nan")}, "--max_drift nan: must be a PSI of 0 or more"),
        (
            {"bad_rows": "quarnatine"},
            "--bad_rows 'quarnatine': must be one of 'reject', 'quarantine'",
        ),
        ({"shard_rows": -3}, "--shard_rows -3: must be a whole number of rows, 1 or more"),
        ({"models": "best"}, "--models 'best': must be one of 'champion', 'all'"),
        ({"ttl_days": -2.0}, "--ttl_days -2: must be 0 or more days"),
        ({"ttl_days": float("inf")}, "--ttl_days inf: must be 0 or more days"),
    ],
)
def test_each_bad_parameter_is_named_with_its_range(given, line):
    with pytest.raises(ParameterError) as info:
        BatchParameters(**given).check()
    assert str(info.value).startswith(line)
    assert "\n" not in str(info.value)


def test_an_input_path_naming_an_unset_variable_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("SRC_USER", "reader")
    monkeypatch.delenv("SRC_PASSWORD", raising=False)
    given = "https://${SRC_USER}:${SRC_PASSWORD}@host/x.csv"
    with pytest.raises(ParameterError) as info:
        BatchParameters(input_path=given).check()
    assert str(info.value) == (
        f"--input_path '{given}': must be resolvable: environment variable SRC_PASSWORD is "
        "not set where this step runs"
    )
    monkeypatch.setenv("SRC_PASSWORD", "pa55")
    BatchParameters(input_path=given).check()


@pytest.mark.parametrize(
    ("given", "what"),
    [
        ("https://reader:pa55@host/x.csv", "user info"),
        ("https://host/x.csv?X-Amz-Signature=abc&X-Amz-Date=1", "'X-Amz-Signature'"),
        ("https://acct.blob.core.windows.net/c/x.csv?sv=1&sig=abc", "'sig'"),
        ("https://host/x.csv?token=abc", "'token'"),
    ],
)
def test_credentials_written_out_pass_with_a_warning_that_never_shows_them(given, what, caplog):
    parameters = BatchParameters(input_path=given)
    parameters.check()  # it works: not refused
    (line,) = parameters.warnings()
    assert what in line and "Metaflow records parameter values" in line
    assert "${SRC_PASSWORD}" in line and "pa55" not in line and "abc" not in line
    parameters.warn()
    assert caplog.text.count("Metaflow records parameter values") == 1


@pytest.mark.parametrize(
    "given",
    [
        "",
        "s3://bucket/rows.parquet",
        "https://${SRC_USER}:${SRC_PASSWORD}@host/x.csv",
        "https://host/x.csv?X-Amz-Signature=${SIGNATURE}&page=2",
        "${SIGNED_URL}",
    ],
)
def test_an_input_path_without_written_out_credentials_gets_no_warning(given):
    assert BatchParameters(input_path=given).warnings() == []


def test_every_bad_parameter_gets_its_own_line():
    with pytest.raises(ParameterError) as info:
        BatchParameters("best", -3, -1.0, "quarnatine", 5.0, -1.0).check()
    names = [line.split()[0] for line in str(info.value).splitlines()]
    assert names == [
        "--models", "--shard_rows", "--ttl_days", "--bad_rows", "--max_bad_rows", "--max_drift"
    ]  # fmt: skip


@pytest.mark.flows
def test_the_flow_refuses_them_in_start_before_reading_anything(embedded_env, tmp_path):
    """No model trained and no input given: the parameters are refused all the same, first."""
    from metaflow import Runner

    params = {
        "max_bad_rows": 5, "max_drift": -1, "bad_rows": "quarnatine", "shard_rows": -3,
        "input_path": "https://${BATCHSCORE_TEST_UNSET}@host/x.csv",
    }  # fmt: skip
    flow = str(ROOT / "metaflow" / "batch_processing.py")
    with Runner(flow, env=embedded_env, cwd=str(tmp_path)).run(**params) as running:
        assert running.status == "failed"
        output = running.stdout + running.stderr
        run = running.run
    for line in (
        "--max_bad_rows 5: must be a share of rows between 0 and 1",
        "--max_drift -1: must be a PSI of 0 or more",
        "--bad_rows 'quarnatine': must be one of 'reject', 'quarantine'",
        "--shard_rows -3: must be a whole number of rows, 1 or more",
        "--input_path 'https://${BATCHSCORE_TEST_UNSET}@host/x.csv': must be resolvable: "
        "environment variable BATCHSCORE_TEST_UNSET is not set",
    ):
        assert output.count(line) == 1, output[-3000:]  # once: no retry
    assert "train_models.py" not in output  # refused before the database was asked
    assert "Traceback" not in output
    assert [step.id for step in run] == ["start"]
