"""Both flows compile for Argo Workflows offline: `argo-workflows create --only-json`.

No Kubernetes cluster and no metadata service are contacted (`--only-json` skips both; the
service URL below does not even resolve). The code package *is* uploaded to the S3
datastore, which is why the compile runs against the moto S3 server of `conftest.py`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.flows

IMAGE = "registry.example/batchscore-runner:test"
NAMESPACE = "batchscore"
SECRET = "batchscore-env"
SERVICE_URL = "http://metaflow-service.invalid:8080"  # never contacted with --only-json

TRAIN_STEPS = {
    "start",
    "load_and_prepare_data",
    "train_model",
    "join_models",
    "evaluate",
    "store_results",
    "end",
}
BATCH_STEPS = {"start", "load_data", "load_model", "batch_processing", "ingest_redis", "end"}


@pytest.fixture
def argo_env(s3_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The whole environment of the compile: nothing METAFLOW_* leaks in from the caller."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "BATCHSCORE_"))}
    (tmp_path / "metaflow-home").mkdir()  # no ~/.metaflowconfig profile is read
    return {
        **base,
        **s3_env,
        "METAFLOW_USER": os.environ["METAFLOW_USER"],
        "METAFLOW_HOME": str(tmp_path / "metaflow-home"),
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "metaflow-local"),
        "BATCHSCORE_HOME": str(tmp_path / "home"),
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": SERVICE_URL,
        "METAFLOW_KUBERNETES_NAMESPACE": NAMESPACE,
        "METAFLOW_KUBERNETES_CONTAINER_IMAGE": IMAGE,
        "METAFLOW_KUBERNETES_SECRETS": SECRET,
    }


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text` that has a `kind`: tolerant of lines around it."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\s*\{", text, flags=re.MULTILINE):
        try:
            obj, _ = decoder.raw_decode(text, match.end() - 1)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "kind" in obj:
            return obj
    raise AssertionError(f"no JSON object in the output:\n{text[:2000]}")


def compile_flow(flow_file: str, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "metaflow" / flow_file),
            "--datastore=s3",
            "argo-workflows",
            "create",
            "--only-json",
        ],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return extract_json(proc.stdout)


def quantity(value: str) -> float:
    """'2.0' -> 2.0, '4096.0M' -> 4096.0 (Metaflow writes memory in M)."""
    return float(value.removesuffix("M"))


def step_templates(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metaflow step name -> its pod template (hooks and DAG templates left out)."""
    steps = {}
    for tpl in template["spec"]["templates"]:
        name = tpl.get("metadata", {}).get("annotations", {}).get("metaflow/step_name")
        if name and "container" in tpl:
            steps[name] = tpl
    return steps


def dag_tasks(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every DAG task of every DAG template, by task name."""
    return {
        task["name"]: task
        for tpl in template["spec"]["templates"]
        if "dag" in tpl
        for task in tpl["dag"]["tasks"]
    }


def check_common(
    template: dict[str, Any], flow_name: str, steps: set[str], env: dict[str, str]
) -> dict[str, dict[str, Any]]:
    assert template["apiVersion"] == "argoproj.io/v1alpha1"
    assert template["kind"] == "WorkflowTemplate"
    assert template["metadata"]["namespace"] == NAMESPACE
    assert template["metadata"]["name"] == flow_name.lower()
    assert template["spec"]["entrypoint"] == flow_name

    by_step = step_templates(template)
    assert set(by_step) == steps
    tasks = dag_tasks(template)
    # Exactly one DAG task per step, running that step's pod template.
    step_template_names = sorted(tpl["name"] for tpl in by_step.values())
    assert (
        sorted(t["template"] for t in tasks.values() if t["template"] in step_template_names)
        == step_template_names
    )

    endpoint = env["METAFLOW_S3_ENDPOINT_URL"]
    bucket = env["METAFLOW_DATASTORE_SYSROOT_S3"].removeprefix("s3://").split("/")[0]
    for name, tpl in by_step.items():
        container = tpl["container"]
        assert container["image"] == IMAGE, name
        pod_env = {e["name"]: e.get("value") for e in container["env"]}
        assert pod_env["METAFLOW_S3_ENDPOINT_URL"] == endpoint, name
        assert pod_env["METAFLOW_DATASTORE_SYSROOT_S3"] == env["METAFLOW_DATASTORE_SYSROOT_S3"]
        assert pod_env["METAFLOW_DEFAULT_DATASTORE"] == "s3", name
        assert pod_env["METAFLOW_DEFAULT_METADATA"] == "service", name
        assert pod_env["METAFLOW_SERVICE_URL"] == SERVICE_URL, name
        # Credentials come from the secret, never from the template.
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(pod_env), name
        secret_refs = [(ref.get("secretRef") or {}).get("name") for ref in container["envFrom"]]
        assert SECRET in secret_refs, name
        # The step runs from the code package uploaded to the moto bucket.
        command = " ".join(container["command"])
        assert f"step {name} " in command, name
        assert f'download_file("{bucket}", "' in command, name

    # The code package really landed in the S3 datastore (moto).
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    package_key = re.search(
        rf'download_file\("{bucket}", "([^"]+)"', " ".join(by_step["start"]["container"]["command"])
    ).group(1)
    assert s3.head_object(Bucket=bucket, Key=package_key)["ContentLength"] > 0
    return by_step


def check_foreach(template: dict[str, Any], parent: str, child: str, join: str) -> None:
    """`parent` fans out (withParam) into a DAG template running `child`; `join` waits for all."""
    tasks = dag_tasks(template)
    fan_out = [t for t in tasks.values() if "withParam" in t]
    assert len(fan_out) == 1, fan_out
    (task,) = fan_out
    parent_task = parent.replace("_", "-")
    assert f"tasks.{parent_task}.outputs.parameters.num-splits" in task["withParam"]
    assert task["depends"] == f"{parent_task}.Succeeded"
    (foreach_tpl,) = [t for t in template["spec"]["templates"] if t["name"] == task["template"]]
    assert [t["template"] for t in foreach_tpl["dag"]["tasks"]] == [child.replace("_", "-")]
    assert tasks[join.replace("_", "-")]["depends"] == f"{task['name']}.Succeeded"


def check_resources(tpl: dict[str, Any], cpu: float, memory_mb: float) -> None:
    requests = tpl["container"]["resources"]["requests"]
    assert quantity(requests["cpu"]) == cpu, requests
    assert quantity(requests["memory"]) == memory_mb, requests


def check_retries(tpl: dict[str, Any], limit: int) -> None:
    assert tpl["retryStrategy"]["limit"] == limit, tpl.get("retryStrategy")


def test_train_models_compiles_for_argo(argo_env: dict[str, str], tmp_path: Path) -> None:
    template = compile_flow("train_models.py", argo_env, tmp_path / "cwd")
    by_step = check_common(template, "TrainModelsFlow", TRAIN_STEPS, argo_env)
    check_foreach(template, "load_and_prepare_data", "train_model", "join_models")
    check_resources(by_step["train_model"], cpu=2, memory_mb=4096)  # @resources(cpu=2, memory=4096)
    assert by_step["train_model"]["activeDeadlineSeconds"] == 2 * 3600  # @timeout(hours=2)
    for name in ("load_and_prepare_data", "store_results"):  # @retry(times=2)
        check_retries(by_step[name], 2)


def test_batch_processing_compiles_for_argo(argo_env: dict[str, str], tmp_path: Path) -> None:
    template = compile_flow("batch_processing.py", argo_env, tmp_path / "cwd")
    by_step = check_common(template, "BatchProcessingFlow", BATCH_STEPS, argo_env)
    # ingest_redis (the Redis pointer switch) waits for every shard.
    check_foreach(template, "load_model", "batch_processing", "ingest_redis")
    check_resources(by_step["batch_processing"], cpu=2, memory_mb=4096)
    assert by_step["batch_processing"]["activeDeadlineSeconds"] == 2 * 3600
    for name in ("start", "load_data", "load_model", "batch_processing", "ingest_redis"):
        check_retries(by_step[name], 2)
