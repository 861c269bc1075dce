"""Reading wandb's offline run directories back without an account or the network: a run's group, name, job type,
tags, config, summary and media, from its `run-<id>.wandb` file (wandb's record log: protobuf `Record`s in LevelDB's
log format; offline runs write no config.yaml or wandb-summary.json), so a sweep's table can be rebuilt from
what it logged (`python -m fastgen.analysis DIR --wandb`) and tests can check what reached wandb."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

BLOCK, HEADER = 32768, 7            # LevelDB log: 32 KiB blocks; crc32 (4), length (2), type (1) per chunk
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    dir: Path
    id: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)   # the last value of each key; media as wandb's refs
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)       # names of the artifacts it logged

    def media(self, key: str) -> Path:
        """The file a logged table or image `key` points to (files/media/...)."""
        return self.dir / "files" / self.summary[key]["path"]

    def table(self, key: str) -> list[dict[str, Any]]:
        """A logged wandb.Table's rows as dicts."""
        data = json.loads(self.media(key).read_text())
        return [dict(zip(data["columns"], row)) for row in data["data"]]


def records(path: str | Path) -> Iterator[bytes]:
    """The raw records of a .wandb file (checksums not verified: the file is read, not trusted for anything)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:               # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            chunks = [payload]
        elif kind == MIDDLE:
            chunks.append(payload)
        elif kind == LAST:
            yield b"".join(chunks + [payload])


def _items(items) -> dict[str, Any]:
    """A record's (nested) key -> JSON value items as a dict; nested keys a/b become {"a": {"b": ...}}."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _merge(into: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def read_run(run_dir: str | Path) -> OfflineRun:
    """One offline (or synced) run directory, `wandb/offline-run-<time>-<id>`."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run = OfflineRun(run_dir)
    for data in records(files[0]):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.group, run.name, run.job_type, run.tags = (r.run_id, r.run_group, r.display_name,
                                                                   r.job_type, list(r.tags))
            _merge(run.config, _items(r.config.update))
        elif kind == "config":
            _merge(run.config, _items(record.config.update))
        elif kind == "summary":
            _merge(run.summary, _items(record.summary.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "artifact":
            run.artifacts.append(record.artifact.name)
    run.config.pop("_wandb", None)
    return run


def find_runs(root: str | Path) -> list[OfflineRun]:
    """Every wandb run directory under `root` (offline-run-* and synced run-*), oldest first."""
    dirs = sorted({p.parent for p in Path(root).glob("**/wandb/*run-*/run-*.wandb")}, key=lambda p: p.name)
    return [read_run(d) for d in dirs]
