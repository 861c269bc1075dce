"""fastgen's OpenMP spin count: set before torch loads, never over the user's own setting."""
import os
import subprocess
import sys

from fastgen.openmp import SPIN_COUNT, set_spin_count


def test_the_spin_count_is_set_only_before_torch_loads_and_never_over_the_users():
    env: dict[str, str] = {}
    assert set_spin_count(env, {}) == SPIN_COUNT and env == {"GOMP_SPINCOUNT": SPIN_COUNT}
    env = {"GOMP_SPINCOUNT": "300000"}
    assert set_spin_count(env, {}) == "300000" and env == {"GOMP_SPINCOUNT": "300000"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_spin_count(env, {}) is None and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert set_spin_count(env, {"torch": object()}) is None and env == {}


def test_importing_fastgen_sets_it_before_torch_is_loaded():
    code = ("import os, sys; assert 'torch' not in sys.modules; import fastgen; "
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [SPIN_COUNT, "True"]
