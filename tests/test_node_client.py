"""README.md's Redis layout, read by a client in another language: the Node.js example
(`examples/node/read_prediction.mjs`, no dependency) against one Redis and the cluster.
Skipped where node is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ROOT
from test_online import META, _model, _version, store  # noqa: F401

from batchscore.rows.keys import row_keys

NODE = shutil.which("node")
SCRIPT = ROOT / "examples" / "node" / "read_prediction.mjs"
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def _read(url: str, prefix: str, key: str):
    done = subprocess.run(
        [NODE, str(SCRIPT), url, prefix, key], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("scheme", ["feature_hash", "id"])
def test_node_reads_what_every_reader_returns(store, topology_url, scheme):  # noqa: F811
    version = _version(0)
    if scheme == "id":
        keys = ["007", "customer-42", "été"]
        store.stage(version, META)
    else:
        keys = row_keys(np.arange(9.0).reshape(3, 3))
        store.stage(version, {**META, "key_scheme": "feature_hash"})
    proba = np.array([0.25, 0.31, 0.999999])
    champion, other = _model("svc", 0.31), _model("tree", 0.5)
    outputs = [
        (champion, (proba >= 0.31).astype(int), proba),
        (other, (1 - proba >= 0.5).astype(int), 1 - proba),
    ]
    store.write(version, 0, keys, outputs)
    assert store.publish(version, 3, 1)
    for key in keys:
        assert _read(topology_url, store.prefix, key) == store.get(key)
    absent = "0" * 64 if scheme == "feature_hash" else "nobody"
    assert _read(topology_url, store.prefix, absent) is None
