"""Where a checkpoint's tensors come from, read one slice at a time, so that a tensor-parallel rank loads only its
shard: an in-memory state dict, safetensors files (each rank reads just its rows from the file), or rank 0
broadcasting each full tensor in turn to ranks that keep their slice of it (for sources only rank 0 can read:
an in-memory model, a GGUF file that transformers de-quantises whole).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from fastgen.distributed import Slice


class WeightSource(ABC):
    """Named tensors of a checkpoint in transformers' naming."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor's name, in a fixed order."""

    @abstractmethod
    def read(self, name: str, region: Slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only `region` of it."""


def narrow(t: torch.Tensor, region: Slice | None) -> torch.Tensor:
    return t if region is None else t.narrow(region.dim, region.start, region.size)


class StateDictWeights(WeightSource):
    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.state_dict = state_dict

    def names(self) -> list[str]:
        return list(self.state_dict)

    def read(self, name: str, region: Slice | None = None) -> torch.Tensor:
        return narrow(self.state_dict[name], region)


class MappedWeights(WeightSource):
    """Another source's tensors passed through `convert(name, tensor)`: a family whose checkpoint layout differs
    from fastgen's by more than names (Falcon's per-group QKV rows) converts whole tensors as they are read."""

    def __init__(self, source: WeightSource, convert: Callable[[str, torch.Tensor], torch.Tensor]):
        self.source, self.convert = source, convert

    def names(self) -> list[str]:
        return self.source.names()

    def read(self, name: str, region: Slice | None = None) -> torch.Tensor:
        return narrow(self.convert(name, self.source.read(name)), region)


class SafetensorsWeights(WeightSource):
    """The *.safetensors files of a Hugging Face directory (an index file's shards, or every file), read lazily:
    a region costs only its own bytes."""

    def __init__(self, directory: str | Path):
        from safetensors import SafetensorError, safe_open

        self.directory = directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(directory.glob("*.safetensors"))]
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors weight file (fastgen reads safetensors "
                                    "checkpoints)")
        self.files, self.where = [], {}
        for file_name in files:
            path = directory / file_name
            if not path.exists():
                raise FileNotFoundError(f"weight file {path} is missing (listed in {index.name})")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"weight file {path} is corrupt or unreadable: {e}") from e
            self.files.append(handle)
            self.where.update((k, (handle, path)) for k in keys)

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, name: str, region: Slice | None = None) -> torch.Tensor:
        from safetensors import SafetensorError

        handle, path = self.where[name]
        try:
            if region is None:
                return handle.get_tensor(name)
            piece = handle.get_slice(name)
            index = [slice(None)] * len(piece.get_shape())
            index[region.dim] = slice(region.start, region.start + region.size)
            return piece[tuple(index)]
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"weight file {path} is corrupt or unreadable: {e}") from e


class BroadcastWeights(WeightSource):
    """Rank 0 reads each full tensor from `source` and broadcasts it (over `group`); every rank keeps its region
    of it. The other ranks pass source=None. Names, shapes and dtypes are broadcast first; then every rank must
    read the same names in the same order, as the weight loader does."""

    def __init__(self, source: WeightSource | None, group=None):
        self.source, self.group = source, group
        meta = [None]
        if source is not None:
            meta = [[(n, *self._shape_dtype(source.read(n))) for n in source.names()]]
        dist.broadcast_object_list(meta, src=0, group=group)
        self.meta = {name: (shape, dtype) for name, shape, dtype in meta[0]}
        self._last: tuple[str, torch.Tensor] | None = None

    @staticmethod
    def _shape_dtype(t: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(t.shape), t.dtype

    def names(self) -> list[str]:
        return list(self.meta)

    def read(self, name: str, region: Slice | None = None) -> torch.Tensor:
        if self._last is None or self._last[0] != name:      # a packed tensor may be read for several regions
            if self.source is not None:
                full = self.source.read(name).contiguous()
            else:
                shape, dtype = self.meta[name]
                full = torch.empty(shape, dtype=dtype)
            dist.broadcast(full, src=0, group=self.group)
            self._last = (name, full)
        return narrow(self._last[1], region)
