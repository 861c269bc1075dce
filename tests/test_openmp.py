"""fastgen's OpenMP wait policy: set before torch loads, never over the user's own setting."""
import os
import subprocess
import sys

from fastgen.openmp import WAIT_POLICY, set_wait_policy


def test_the_wait_policy_is_set_only_before_torch_loads_and_never_over_the_users():
    env: dict[str, str] = {}
    assert set_wait_policy(env, {}) == WAIT_POLICY and env == {"OMP_WAIT_POLICY": WAIT_POLICY}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_wait_policy(env, {}) == "ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "10000"}
    assert set_wait_policy(env, {}) is None and "OMP_WAIT_POLICY" not in env
    env = {}
    assert set_wait_policy(env, {"torch": object()}) is None and env == {}


def test_importing_fastgen_sets_it_before_torch_is_loaded():
    code = "import os, sys; import fastgen; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [WAIT_POLICY, "True"]
