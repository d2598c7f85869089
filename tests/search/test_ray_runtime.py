"""The local Ray that `study run` starts (study.search.ray_runtime.init_ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

PROBE = """
import json, ray
from ray._private import node
from study.search.ray_runtime import init_ray
build = node.Node.__init__
out = {}
for verbose in (False, True):
    init_ray(None, verbose, TEMP)
    out[str(verbose)] = sorted(ray._private.worker._global_node.all_processes)
    out["tasks_run"] = ray.get(ray.remote(lambda: 1).remote())
    ray.shutdown()
out["node_init_restored"] = node.Node.__init__ is build
print(json.dumps(out))
"""


def test_a_local_ray_starts_without_the_monitors_a_study_never_uses(tmp_path):
    """No autoscaler monitor, and no log monitor unless workers' output is shown (-v); the head
    otherwise starts as Ray's (GCS, raylet, the dashboard's API server), runs tasks, and Ray's own
    node constructor is left as it was for any later ray.init."""
    temp = f"/tmp/rt{tmp_path.name[-6:]}"  # Ray's socket paths must stay short
    r = subprocess.run(
        [sys.executable, "-c", PROBE.replace("TEMP", repr(temp))], capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    quiet, verbose = set(out["False"]), set(out["True"])
    assert {"gcs_server", "raylet"} <= quiet
    assert "monitor" not in quiet and "log_monitor" not in quiet
    assert "monitor" not in verbose and "log_monitor" in verbose
    assert out["tasks_run"] == 1
    assert out["node_init_restored"]
