"""CausalLM: what every fastgen model family provides, and the one weight-loading routine they share."""
from __future__ import annotations

import re
from typing import ClassVar, Mapping

import torch
from torch import nn

from fastgen.kv.cache import KVCache
from fastgen.model_spec import ModelSpec, eos_ids
from fastgen.models.layers import KernelUser
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
    packed: ClassVar[tuple[tuple[str, str, int], ...]] = ()
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    stacked: ClassVar[tuple[tuple[str, str, int, int], ...]] = ()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.spec = self.describe(config)

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
    def layer_windows(cls, config) -> list[int | None]:
        """Each layer's sliding attention window, None for full attention."""
        return [None] * config.num_hidden_layers

    def use_kernels(self, backend) -> "CausalLM":
        """Routes every layer's tensor math through `backend` (a fastgen.kernels backend), chosen once."""
        for module in self.modules():
            if isinstance(module, KernelUser):
                module.ops = backend
        return self

    def forward(self, batch: RaggedBatch, kv: KVCache) -> torch.Tensor:
        """Returns float32 logits [num_seqs, vocab] for the last scheduled token of each sequence."""
        raise NotImplementedError

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: dict[str, set] = {}
        for hf_name, tensor in state_dict.items():
            name = hf_name
            for old, new in self.renames:
                name = name.replace(old, new)
            shard = None
            for pattern, target, part, parts in self.stacked:
                if match := re.search(pattern, name):
                    name, shard = name[:match.start()] + target, (int(match.group(1)), part, parts)
                    break
            else:
                for fused, part, index in self.packed:
                    if f".{part}." in name:
                        name, shard = name.replace(f".{part}.", f".{fused}."), index
                        break
            if name == "lm_head.weight" and "lm_head.weight" not in params:
                continue   # tied: the embedding is the LM head
            if name not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"{source}: weight {hf_name!r} has no place in fastgen's "
                                 f"{type(self).__name__}; is this checkpoint for a different architecture?")
            dest = params[name]
            if isinstance(shard, tuple):
                expert, part, parts = shard
                if expert >= dest.shape[0]:
                    raise ValueError(f"{source}: weight {hf_name!r} is for expert {expert}, but the config has "
                                     f"{dest.shape[0]} experts")
                rows = dest.shape[1] // parts
                dest = dest[expert].narrow(0, part * rows, rows)
            elif shard is not None:
                sizes = modules[name.rsplit(".", 1)[0]].shard_sizes
                dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
            if dest.shape != tensor.shape:
                raise ValueError(f"{source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"fastgen expects {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.setdefault(name, set()).add(shard)
        missing = []
        for n, p in self.named_parameters():
            expected = self._expected_shards(n, p, modules)
            got = loaded.get(n, set())
            if got != {None} and got != expected:
                missing += [n] if not got else [f"{n}[{self._describe_shard(s)}]" for s in sorted(expected - got)]
        if missing:
            raise ValueError(f"{source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def _expected_shards(self, name: str, param: torch.Tensor, modules: dict[str, nn.Module]) -> set:
        """The parts a parameter is loaded from when the checkpoint splits it ({None}: one tensor)."""
        stacked = [(part, parts) for _, target, part, parts in self.stacked if name.endswith(target)]
        if stacked:
            return {(e, part, parts) for e in range(param.shape[0]) for part, parts in stacked}
        sizes = getattr(modules[name.rsplit(".", 1)[0]], "shard_sizes", None)
        return set(range(len(sizes))) if sizes else {None}

    @staticmethod
    def _describe_shard(shard) -> str:
        if isinstance(shard, tuple):
            expert, part, parts = shard
            return f"expert {expert}" + (f" part {part + 1}/{parts}" if parts > 1 else "")
        return f"shard {shard}"
