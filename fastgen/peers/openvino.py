"""OpenVINO GenAI as a peer: its ContinuousBatchingPipeline, Intel's CPU-optimised serving loop with Dynamic SplitFuse
of its own (`SchedulerConfig.dynamic_split_fuse`), from PyPI in its own virtual environment, never a fastgen
dependency, run as a subprocess (openvino_worker.py; token ids in and out through JSON files).

The one command that makes the venv (`ensure_venv` runs it when the venv is missing):

    python -m venv /work/venvs/openvino && /work/venvs/openvino/bin/pip install "torch==2.13.0+cpu" \\
        openvino-genai==2026.4.1.0 "optimum-intel[openvino]==2.2.0"

The model is the float32 Hugging Face directory vLLM reads (fastgen.peers.vllm.export_hf_dir), converted once with
optimum-intel (`optimum-cli export openvino --weight-format fp32`) into OpenVINO IR beside it. Each setting states
its set-up: the scheduler's knobs and the CPU plugin's precision hints (float32 rows: INFERENCE_PRECISION_HINT and
KV_CACHE_PRECISION f32; `precision: default` leaves both to OpenVINO, which picks bf16 / u8 KV where it likes).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fastgen.peers.offline import warmup_requests
from fastgen.peers.venv import ensure_peer_venv, venv_bin

WORKER = Path(__file__).with_name("openvino_worker.py")
PRECISIONS = ("f32", "default")


@dataclass
class OpenVINOSetting:
    name: str = "splitfuse-f32"
    precision: str = "f32"                    # f32: inference and KV cache in float32 | default: OpenVINO's choice
    dynamic_split_fuse: bool = True
    max_num_batched_tokens: Optional[int] = 768    # fastgen's token budget; None: OpenVINO's default
    max_num_seqs: Optional[int] = None


@dataclass
class OpenVINOConfig:
    venv: str = "/work/venvs/openvino"
    requirements: list[str] = field(default_factory=lambda: [
        "torch==2.13.0+cpu", "openvino-genai==2026.4.1.0", "optimum-intel[openvino]==2.2.0"])
    ir_dir: str = "/work/venvs/models/smollm2-135m-f32-ov"   # made from the float32 HF directory if missing
    cache_size_gb: float = 2.0                               # KV cache = fastgen's KV pool
    settings: list[OpenVINOSetting] = field(default_factory=lambda: [OpenVINOSetting()])
    timeout_s: float = 3600.0


def create_venv_command(cfg: OpenVINOConfig) -> str:
    import sys
    pip = venv_bin(cfg.venv, "pip")
    return (f"{sys.executable} -m venv {cfg.venv} && {pip} install " + " ".join(f'"{r}"' for r in cfg.requirements)
            + f" && {pip} uninstall -y torchvision")


def ensure_venv(cfg: OpenVINOConfig, log: Callable[[str], Any] = print) -> None:
    ensure_peer_venv(cfg.venv, create_venv_command(cfg), "OpenVINO", log)


def convert_command(cfg: OpenVINOConfig, hf_dir: Path) -> list[str]:
    return [str(venv_bin(cfg.venv, "optimum-cli")), "export", "openvino", "--model", str(hf_dir), "--task",
            "text-generation-with-past", "--weight-format", "fp32", cfg.ir_dir]


def ensure_ir(cfg: OpenVINOConfig, hf_dir: Path, log: Callable[[str], Any] = print) -> Path:
    """The OpenVINO IR of the float32 HF directory (converted with optimum-intel once)."""
    ir = Path(cfg.ir_dir)
    if (ir / "openvino_model.xml").exists():
        return ir
    command = convert_command(cfg, hf_dir)
    log(f"converting {hf_dir} to OpenVINO IR: {' '.join(command)}")
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"optimum-intel's conversion failed; run by hand: {' '.join(command)}")
    return ir


def scheduler_config(cfg: OpenVINOConfig, setting: OpenVINOSetting) -> dict[str, Any]:
    out: dict[str, Any] = {"cache_size": max(1, round(cfg.cache_size_gb)), "enable_prefix_caching": False,
                           "dynamic_split_fuse": setting.dynamic_split_fuse}
    if setting.max_num_batched_tokens is not None:
        out["max_num_batched_tokens"] = setting.max_num_batched_tokens
    if setting.max_num_seqs is not None:
        out["max_num_seqs"] = setting.max_num_seqs
    return out


def properties(setting: OpenVINOSetting) -> dict[str, str]:
    if setting.precision not in PRECISIONS:
        raise ValueError(f"openvino setting {setting.name!r}: precision must be one of {PRECISIONS}, "
                         f"got {setting.precision!r}")
    return {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"} if setting.precision == "f32" else {}


def setup_line(cfg: OpenVINOConfig, setting: OpenVINOSetting) -> str:
    """The row's set-up, as the results table states it."""
    props = properties(setting) or {"precision": "OpenVINO's default"}
    return "; ".join(f"{k}={v}" for k, v in {**scheduler_config(cfg, setting), **props}.items())


def openvino_offline(cfg: OpenVINOConfig, setting: OpenVINOSetting, workloads: dict[str, list], out: Path) -> dict:
    """One pipeline (one start-up) runs every workload in turn; see openvino_worker.py."""
    job = {"model": cfg.ir_dir, "scheduler": scheduler_config(cfg, setting), "properties": properties(setting),
           "runs": {name: {"warmup": [[r.prompt, r.max_new_tokens] for r in warmup_requests(reqs)],
                           "requests": [[r.prompt, r.max_new_tokens] for r in reqs]}
                    for name, reqs in workloads.items()}}
    job_path, result_path, log_path = out / "job.json", out / "result.json", out / "openvino.log"
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    # -P: the worker's folder is not put first on sys.path, where this module would shadow the `openvino` package
    with open(log_path, "w") as logf:
        proc = subprocess.run([str(venv_bin(cfg.venv)), "-P", str(WORKER), str(job_path), str(result_path)],
                              stdout=logf, stderr=subprocess.STDOUT, timeout=cfg.timeout_s)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"OpenVINO offline run failed (exit {proc.returncode}); its log: {log_path}")
    return json.loads(result_path.read_text())
