"""experiments/paper/: every figure script runs end to end at reduced size (--quick), simulated, and writes its
PNG(s) and a Markdown table with the paper's numbers beside fastgen's."""
import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments" / "paper"))

SCRIPTS = {"throughput_latency": ("1.36 vs 0.67", 2), "effective_throughput": ("1.42", 1),
           "token_latency": ("3.7x", 1), "replica_scaling": ("23.7", 1)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_script_quick_writes_png_and_table(script, tmp_path):
    paper_number, figures = SCRIPTS[script]
    importlib.import_module(script).main(["--quick", "--executor", "simulated", "--out", str(tmp_path)])
    table = (tmp_path / f"{script}.md").read_text()
    assert paper_number in table and "splitfuse" in table and "simulated executor" in table
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == figures and all(p.stat().st_size > 5000 for p in pngs)


def test_quick_writes_to_scratch_never_over_the_committed_results():
    import hashlib
    import time

    from common import RESULTS, SCRATCH

    def hashes():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.rglob("*")) if p.is_file()}
    before, start = hashes(), time.time()
    importlib.import_module("token_latency").main(["--quick", "--executor", "simulated"])
    assert hashes() == before and before
    assert (SCRATCH / "token_latency" / "token_latency.png").stat().st_mtime >= start - 1
    assert not RESULTS.is_relative_to(SCRATCH) and not SCRATCH.is_relative_to(RESULTS)
