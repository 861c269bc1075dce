"""CausalLM: what every fastgen model family provides, and the one weight-loading routine they share."""
from __future__ import annotations

import re
from typing import ClassVar, Mapping

import torch
from torch import nn

from fastgen.distributed import Slice, current
from fastgen.kv.cache import KVCache
from fastgen.model_spec import ModelSpec, eos_ids
from fastgen.kernels.linear import affordable, reorder_weights
from fastgen.models.layers import ColumnParallelLinear, KernelUser, Reorderable, Sharded
from fastgen.models.weights import StateDictWeights, WeightSource
from fastgen.ragged import RaggedBatch


class CausalLM(nn.Module):
    """A decoder-only model running on a RaggedBatch over a blocked KV cache.

    Subclasses name their transformers `model_type`s, read a `ModelSpec` from a config (`describe`, which the
    simulator calls too, without building the model) and describe how transformers' parameter names map onto
    theirs: `packed` lists (fused module, transformers module, shard index) for projections fastgen fuses,
    `renames` lists plain substring renames, and `stacked` lists (pattern, stacked parameter, part, parts) for
    checkpoints that store each expert of a mixture separately: the regex `pattern` (its group: the expert index)
    names one expert's tensor, which fills part `part` of `parts` equal row blocks of that expert's slice of the
    [experts, ...] parameter. A tensor that already has a fused or stacked parameter's full shape loads whole.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    # Declared by each family itself (not inherited): every layer is one of fastgen.models.layers' tensor-parallel
    # layers or a replicated one (norms, small projections), so the family can be split over ranks.
    tensor_parallel: ClassVar[bool] = False
    packed: ClassVar[tuple[tuple[str, str, int], ...]] = ()
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    stacked: ClassVar[tuple[tuple[str, str, int, int], ...]] = ()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.spec = self.describe(config)
        self.parallel = current()     # the rank this model's shard belongs to (size 1: the whole model)

    @classmethod
    def describe(cls, config) -> ModelSpec:
        """The model's facts from its config. The default reads the Llama-style field names; families whose
        attention windows or MLP differ override `layer_windows` / this method."""
        return ModelSpec(
            model_type=config.model_type, num_layers=config.num_hidden_layers, hidden=config.hidden_size,
            intermediate=config.intermediate_size, num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
            windows=tuple(cls.layer_windows(config)), tied_embeddings=bool(config.tie_word_embeddings),
            eos_token_ids=eos_ids(getattr(config, "eos_token_id", None)))

    @classmethod
    def supports_tensor_parallel(cls) -> bool:
        return cls.__dict__.get("tensor_parallel", False)

    @classmethod
    def layer_windows(cls, config) -> list[int | None]:
        """Each layer's sliding attention window, None for full attention."""
        return [None] * config.num_hidden_layers

    def use_kernels(self, backend) -> "CausalLM":
        """Routes every layer's tensor math through `backend` (a fastgen.kernels backend), chosen once."""
        for module in self.modules():
            if isinstance(module, KernelUser):
                module.ops = backend
        return self

    def use_linear(self, mode: str) -> "CausalLM":
        """Runs every linear layer's GEMM the way `mode` (a resolved `hardware.linear`: plain, onednn, auto) says,
        reordering the weights once now (auto: only if the copy fits in memory, and timing the two GEMMs per weight
        shape; fastgen.kernels.linear); call it again after changing the weights."""
        layers = [m for m in self.modules() if isinstance(m, Reorderable)]
        mode = affordable(mode, sum(m.matrix().nbytes for m in layers))
        for module, reordered in zip(layers, reorder_weights([m.matrix() for m in layers], mode)):
            module.reordered = reordered
        return self

    def forward(self, batch: RaggedBatch, kv: KVCache) -> torch.Tensor:
        """Returns float32 logits [num_seqs, vocab] for the last scheduled token of each sequence."""
        raise NotImplementedError

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        self.load_weights(StateDictWeights(state_dict), source)

    def hf_to_fastgen(self, hf_name: str) -> tuple[str, int | tuple[int, int, int] | None]:
        """The fastgen parameter a checkpoint tensor goes into, and which part of it: a packed block's index, an
        expert's (expert, part, parts), or None for all of it."""
        name = hf_name
        for old, new in self.renames:
            name = name.replace(old, new)
        for pattern, target, part, parts in self.stacked:
            if match := re.search(pattern, name):
                return name[:match.start()] + target, (int(match.group(1)), part, parts)
        for fused, part, index in self.packed:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), index
        return name, None

    @torch.no_grad()
    def load_weights(self, weights: WeightSource, source: str = "checkpoint") -> None:
        """Copies the checkpoint's tensors into this model: for a tensor-parallel shard only this rank's slices,
        read one tensor (or one slice) at a time."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: dict[str, set] = {}
        for hf_name in weights.names():
            name, part = self.hf_to_fastgen(hf_name)
            if name == "lm_head.weight" and "lm_head.weight" not in params:
                continue   # tied: the embedding is the LM head
            if name not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"{source}: weight {hf_name!r} has no place in fastgen's "
                                 f"{type(self).__name__}; is this checkpoint for a different architecture?")
            module_name, attr = name.rsplit(".", 1)
            for region, target in self._targets(modules[module_name], attr, params[name], part, hf_name, source):
                try:
                    tensor = weights.read(hf_name, region)
                except RuntimeError:    # the region lies outside the checkpoint's tensor: not the expected shape
                    tensor = weights.read(hf_name)
                if target.shape != tensor.shape:
                    raise ValueError(f"{source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"fastgen expects {tuple(target.shape)}"
                                     + (f" (rank {self.parallel.rank}'s slice)" if self.parallel.size > 1 else ""))
                target.copy_(tensor)
            loaded.setdefault(name, set()).add(part)
        missing = []
        for n, p in self.named_parameters():
            expected, got = self._expected_parts(n, p, modules), loaded.get(n, set())
            if None not in got and got != expected:
                missing += [n] if not got else [f"{n}[{self._describe_part(s)}]" for s in sorted(expected - got)]
        if missing:
            raise ValueError(f"{source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def _targets(self, module: nn.Module, attr: str, dest: torch.Tensor, part, hf_name: str, source: str) \
            -> list[tuple[Slice | None, torch.Tensor]]:
        """Which region of a checkpoint tensor (None: all of it) goes into which view of the parameter: an
        expert's row block of a stacked parameter; this rank's slices of a tensor-parallel layer's (or packed
        block's) rows; else the whole parameter."""
        if isinstance(part, tuple):
            expert, index, parts = part
            if expert >= dest.shape[0]:
                raise ValueError(f"{source}: weight {hf_name!r} is for expert {expert}, but the config has "
                                 f"{dest.shape[0]} experts")
            rows = dest.shape[1] // parts
            return [(None, dest[expert].narrow(0, index * rows, rows))]
        if isinstance(module, Sharded):
            regions = module.shard(attr, part, self.parallel.rank)
            if regions is not None:
                return [(r, dest.narrow(r.dim, r.dest_offset, r.size)) for r in regions]
        return [(None, dest)]

    def _expected_parts(self, name: str, param: torch.Tensor, modules: dict[str, nn.Module]) -> set:
        """The parts a parameter is loaded from when the checkpoint splits it ({None}: one tensor)."""
        stacked = [(part, parts) for _, target, part, parts in self.stacked if name.endswith(target)]
        if stacked:
            return {(e, part, parts) for e in range(param.shape[0]) for part, parts in stacked}
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, ColumnParallelLinear) and len(module.parts) > 1:
            return set(range(len(module.parts)))
        return {None}

    @staticmethod
    def _describe_part(part) -> str:
        if isinstance(part, tuple):
            expert, index, parts = part
            return f"expert {expert}" + (f" part {index + 1}/{parts}" if parts > 1 else "")
        return f"shard {part}"

