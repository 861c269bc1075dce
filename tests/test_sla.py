"""The SLA follows the hardware: the paper's on the GPU configs, one scaled to this CPU's measured speed for
hardware=cpu (fastgen.calibration.sla), recorded with the measurements it was computed from."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastgen.conf import compose_config
from fastgen.metrics import SLAConfig
from fastgen.sim.cost_model import Profile
from fastgen.calibration.sla import derive, reference_speeds, scale, simulated_speeds
from tiny import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent


def test_the_sla_follows_the_hardware():
    assert compose_config(["hardware=a100-80gb"]).sla == SLAConfig()           # the paper's: 512, [2, 4, 6], 16
    assert compose_config(["hardware=h100-80gb", "executor=simulated"]).sla.name == "paper"
    cpu = compose_config([]).sla
    assert cpu.name == "cpu" and compose_config(["hardware=cpu-bf16"]).sla == cpu
    assert compose_config(["sla=paper"]).sla.prompt_tokens_per_s == 512.0
    assert compose_config(["sla.prompt_tokens_per_s=50"]).sla.prompt_tokens_per_s == 50.0
    assert cpu.describe().startswith("SLA cpu: TTFT <= prompt tokens / 94 tok/s")


def test_the_shipped_cpu_sla_is_derived_from_measured_speeds_not_tuned():
    """conf/hardware/cpu.yaml's `sla` is `scale` of the measurements it records; the reference speeds are the
    simulator's for the paper's deployment; this CPU's are the calibrated profile's, which lie between the step times
    calibration measured around the SLA's shapes."""
    shipped = compose_config([]).sla
    d = dict(shipped.derived_from)
    assert scale(SLAConfig(), "cpu", **d) == shipped
    ref = reference_speeds()
    assert d["reference_prefill_tokens_per_s"] == pytest.approx(ref.prefill_tokens_per_s, rel=1e-9)
    assert d["reference_decode_step_s"] == pytest.approx(ref.decode_step_s, rel=1e-9)
    cpu = compose_config(["executor=simulated"])
    here = simulated_speeds(cpu, int(d["prompt_tokens"]), int(d["decode_context"]))
    assert d["prefill_tokens_per_s"] == pytest.approx(here.prefill_tokens_per_s, rel=1e-9)
    assert d["decode_step_s"] == pytest.approx(here.decode_step_s, rel=1e-9)
    measured = Profile.load(cpu.hardware.sim.profile).meta["points"]
    single = [p for p in measured if len(p["query_lens"]) == 1 and 128 <= p["context_lens"][0] <= 512]
    prefill_rates = [p["query_lens"][0] / p["measured_s"] for p in single if p["query_lens"] == p["context_lens"]]
    decodes = [p["measured_s"] for p in single if p["query_lens"] == [1]]
    assert len(prefill_rates) == len(decodes) == 2
    assert min(prefill_rates) <= d["prefill_tokens_per_s"] <= max(prefill_rates)
    assert min(decodes) <= d["decode_step_s"] <= max(decodes)
    # the paper's SLA asks the reference for ~11% of its prompt rate; the CPU's asks the same of the CPU
    assert shipped.prompt_tokens_per_s / d["prefill_tokens_per_s"] == pytest.approx(
        512 / d["reference_prefill_tokens_per_s"], rel=0.01)


def test_derive_measures_one_request_on_the_real_executor():
    cfg = compose_config(["executor=real", "workload.prompt.mean=40", "workload.output.mean=8"])
    sla = derive(cfg, "tiny", repeats=1, model=tiny_hf_model("llama"))
    d = sla.derived_from
    assert (d["prompt_tokens"], d["decode_context"]) == (40, 44)
    assert d["prefill_tokens_per_s"] > 0 and 0 < d["decode_step_s"] < 10
    assert sla == scale(SLAConfig(), "tiny", **d) and sla.ema_span == 16
    assert sla.gen_tokens_per_s[1] == pytest.approx(4 * d["reference_decode_step_s"] / d["decode_step_s"], rel=0.05)


@pytest.mark.slow
def test_default_run_has_nonzero_effective_throughput_at_the_default_sla(tmp_path):
    """`python run.py` as the README says (the embedded SmolLM2-135M, splitfuse, the default workload): with the
    SLA scaled to the CPU, requests meet it, so the headline metric is not 0."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path}", "progress=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["sla"]["name"] == "cpu"
    effective = {k: v for k, v in metrics.items() if k.startswith("effective_throughput_g")}
    assert len(effective) == 3 and max(effective.values()) > 0, (effective, metrics["machine"])


def test_one_file_per_machine_states_its_datasheet_and_sla(tmp_path):
    """conf/hardware/<name>.yaml holds the real device, the simulated datasheet (hardware.sim) and the SLA
    (hardware.sla, which run.py's sla follows); fastgen.calibration.sla --write replaces only that file's `sla:`."""
    from fastgen.calibration.sla import to_yaml, write_into
    conf = ROOT / "conf"
    assert not (conf / "sla").exists() and not (conf / "device").exists()
    a100 = compose_config(["hardware=a100-80gb", "executor=simulated"])
    assert (a100.hardware.sim.peak_tflops, a100.hardware.sim.profile, a100.hardware.sla) == (312.0, "a100-80gb",
                                                                                             SLAConfig())
    cpu = compose_config([])
    assert cpu.sla == cpu.hardware.sla and cpu.hardware.sim.profile == "cpu"
    assert compose_config(["sla=paper"]).hardware.sla == cpu.sla       # the machine keeps its own
    with pytest.raises(ValueError, match="conf/hardware/cpu-bf16.yaml"):     # no bf16 datasheet measured yet
        bf16 = compose_config(["hardware=cpu-bf16", "executor=simulated"]).hardware
        bf16.sim.validate(bf16)
    shipped = (conf / "hardware" / "cpu.yaml").read_text()
    comment = shipped[shipped.index("# The paper"):shipped.index("\nsla:")]
    body = to_yaml(cpu.sla, "")
    block = comment + "\nsla:\n" + "".join(f"  {line}\n" for line in body.splitlines())
    for name in ("cpu", "a100-80gb"):
        (tmp_path / f"{name}.yaml").write_text((conf / "hardware" / f"{name}.yaml").read_text())
        write_into(tmp_path / f"{name}.yaml", block)
    assert (tmp_path / "cpu.yaml").read_text() == shipped
    gpu = (tmp_path / "a100-80gb.yaml").read_text()
    assert gpu.count("sla:") == 1 and gpu.endswith(block) and "profile: a100-80gb" in gpu
