"""Reading request traces (JSONL or CSV) for replay; the format is documented in `fastgen.workloads`."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PROMPT_FIELDS = ("prompt", "prompt_token_ids", "prompt_tokens")


@dataclass
class TraceRecord:
    """One trace row; exactly one of the three prompt fields is set."""

    arrival_time: float
    output_tokens: int
    prompt: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_tokens: Optional[int] = None


def load_trace(path: str | Path) -> list[TraceRecord]:
    """Parse a `.csv` file, or JSONL for any other suffix; errors name the file, line and column."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            rows = [(i + 2, _blank_to_none(row)) for i, row in enumerate(csv.DictReader(f))]
        else:
            rows = [(i + 1, _json_object(line, f"{path}:{i + 1}"))
                    for i, line in enumerate(f) if line.strip()]
    return [_record(row, f"{path}:{lineno}") for lineno, row in rows]


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


def _record(row: dict[str, Any], where: str) -> TraceRecord:
    given = [name for name in PROMPT_FIELDS if row.get(name) is not None]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of {PROMPT_FIELDS}, got {given or 'none'}")
    for name in ("arrival_time", "output_tokens"):
        if row.get(name) is None:
            raise ValueError(f"{where}: missing column {name!r}")
    arrival = _number(row["arrival_time"], "arrival_time", where, float)
    if arrival < 0:
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
