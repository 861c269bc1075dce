"""Reading request traces (JSONL or CSV, optionally gzipped) for replay; the format is documented in
`fastgen.workloads`."""
from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PROMPT_FIELDS = ("prompt", "prompt_token_ids", "prompt_tokens")
DATA_DIR = Path(__file__).parent / "data"


@dataclass
class TraceRecord:
    """One trace row; exactly one of the three prompt fields is set. `arrival_time` is None in a file of
    requests without times (lengths to pair with an arrival process)."""

    arrival_time: Optional[float]
    output_tokens: int
    prompt: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_tokens: Optional[int] = None


def resolve_trace_path(path: str | Path) -> Path:
    """`path` as given if it exists, else the shipped trace of that name in fastgen/workloads/data/."""
    given = Path(path)
    if given.exists():
        return given.resolve()
    if (DATA_DIR / given).exists():
        return DATA_DIR / given
    shipped = ", ".join(sorted(p.name for p in DATA_DIR.iterdir() if ".csv" in p.suffixes or ".jsonl" in p.suffixes))
    raise FileNotFoundError(f"trace {str(path)!r} not found (relative paths are taken from the working directory); "
                            f"shipped traces, usable by name: {shipped}")


def load_trace(path: str | Path, require_arrival_time: bool = True) -> list[TraceRecord]:
    """Parse a `.csv` (or `.csv.gz`) file, or JSONL (`.gz` too) for any other suffix; errors name the file, line
    and column. A path that does not exist may name a shipped trace (`resolve_trace_path`)."""
    path = resolve_trace_path(path)
    suffixes = [s.lower() for s in path.suffixes]
    opener = gzip.open if suffixes[-1:] == [".gz"] else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        if ".csv" in suffixes[-2:]:
            rows = [(i + 2, _blank_to_none(row)) for i, row in enumerate(csv.DictReader(f))]
        else:
            rows = [(i + 1, _json_object(line, f"{path}:{i + 1}"))
                    for i, line in enumerate(f) if line.strip()]
    return [_record(row, f"{path}:{lineno}", require_arrival_time) for lineno, row in rows]


def _blank_to_none(row: dict[str, Any]) -> dict[str, Any]:
    """CSV has no null: an empty cell means the column is absent for that row."""
    return {k: (None if v is None or not v.strip() else v) for k, v in row.items() if k is not None}


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each JSONL line must be an object")
    return row


def _record(row: dict[str, Any], where: str, require_arrival_time: bool = True) -> TraceRecord:
    given = [name for name in PROMPT_FIELDS if row.get(name) is not None]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of {PROMPT_FIELDS}, got {given or 'none'}")
    for name in ("arrival_time", "output_tokens") if require_arrival_time else ("output_tokens",):
        if row.get(name) is None:
            hint = (" (replay needs one per row; a file of requests without times pairs with an arrival process: "
                    "workload.arrival=poisson, gamma or closed_loop)" if name == "arrival_time" else "")
            raise ValueError(f"{where}: missing column {name!r}{hint}")
    arrival = None if row.get("arrival_time") is None else _number(row["arrival_time"], "arrival_time", where, float)
    if arrival is not None and arrival < 0:
        raise ValueError(f"{where}: arrival_time must be >= 0 seconds, got {arrival}")
    output_tokens = _positive_int(row["output_tokens"], "output_tokens", where)
    record = TraceRecord(arrival_time=arrival, output_tokens=output_tokens)
    field_name = given[0]
    value = row[field_name]
    if field_name == "prompt":
        record.prompt = str(value)
    elif field_name == "prompt_tokens":
        record.prompt_tokens = _positive_int(value, field_name, where)
    else:
        ids = value.split() if isinstance(value, str) else value
        if not isinstance(ids, list) or not ids:
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list (space-separated in CSV)")
        record.prompt_token_ids = [_number(t, field_name, where, int) for t in ids]
        if min(record.prompt_token_ids) < 0:
            raise ValueError(f"{where}: prompt_token_ids must be >= 0")
    return record


def _number(value: Any, name: str, where: str, kind: type) -> Any:
    """Convert a JSON number or CSV string to `kind`; JSON booleans, and floats where ints are due, fail."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise TypeError
        return kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}") from None


def _positive_int(value: Any, name: str, where: str) -> int:
    number = _number(value, name, where, int)
    if number < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {number}")
    return number
