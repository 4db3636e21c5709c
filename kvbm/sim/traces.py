"""Trace readers and writers for the simulator.

A trace is a list of requests in arrival order; each request names the blocks of its
prompt by chained prefix-hash ids (`hash_ids`), so two requests that share the first k ids
share a k-block prefix. That is all the simulator needs to replay prefix caching.

Formats
    mooncake   JSONL, one object per request: `timestamp` (ms from trace start),
               `input_length`, `output_length`, `hash_ids`; 512-token blocks.
               Source: kvcache-ai/Mooncake, FAST25-release/traces (Apache-2.0).
    bailian    JSONL, Alibaba Bailian anonymous usage traces
               (github.com/alibaba-edu/qwen-bailian-usagetraces-anon, Apache-2.0; paper:
               "KVCache Cache in the Wild", USENIX ATC'25). Per the release README:
               `chat_id` (int, randomized), `parent_chat_id` (chat_id of the previous turn
               of the session, -1 for root requests), `timestamp` (float *seconds*,
               trace-relative, 0 at the start of each file), `input_length`,
               `output_length`, `type` (text/search/image/file), `turn` (conversation turn
               number), `hash_ids` (salted SipHash-2-4 of 16-token blocks remapped to
               sequential integers); 16-token blocks. Files: qwen_traceA/traceB/thinking/
               coder_blksz_16.jsonl. The release FAQ notes that the last block of a prompt
               may be partial (padding), so its id can differ from a later turn's.
    parquet    the columns of either JSONL format (timestamp unit follows the columns:
               a `chat_id` column means Bailian seconds, otherwise Mooncake ms), read
               with pyarrow (`pip install 'kvbm-tiered[parquet]'`).

`load_trace` autodetects: a `.parquet` suffix is parquet; otherwise JSONL (optionally
`.gz`), Bailian when the first object has `chat_id`, else Mooncake. Malformed input raises
`TraceError` naming the file, the 1-based line (or row) and what was wrong; so does a request
whose `hash_ids` repeat an id (a block cannot follow itself in a prefix chain, and the
BlockManager refuses such a request).

`Request.timestamp` is always seconds from trace start, whatever the file's unit.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

try:  # optional speedup; the stdlib parser gives the same results
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
    _loads = json.loads

__all__ = ["FORMATS", "Request", "Trace", "TraceError", "load_trace", "write_trace"]

FORMATS = ("bailian", "mooncake", "parquet")
DEFAULT_BLOCK_SIZE = {"mooncake": 512, "bailian": 16}
# Units per second of each schema's `timestamp` field.
_TIME_SCALE = {"mooncake": 1000.0, "bailian": 1.0}
_REQUIRED = ("timestamp", "input_length", "output_length", "hash_ids")
_OPTIONAL = ("chat_id", "parent_chat_id", "type", "turn")
_PARQUET_HINT = "reading or writing Parquet traces needs pyarrow: pip install 'kvbm-tiered[parquet]'"


class TraceError(ValueError):
    """A trace file that cannot be read: the message names file, line and problem."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a trace; `timestamp` is seconds from trace start."""

    timestamp: float
    hash_ids: tuple[int, ...]
    input_length: int
    output_length: int
    chat_id: int | None = None
    parent_chat_id: int | None = None  # Bailian: -1 marks the first turn of a session
    type: str | None = None
    turn: int | None = None


@dataclass
class Trace:
    """Requests in arrival order plus the block size their `hash_ids` were cut with."""

    requests: list[Request]
    block_size: int
    format: str
    source: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def block_accesses(self) -> int:
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def distinct_blocks(self) -> int:
        ids: set[int] = set()
        for r in self.requests:
            ids.update(r.hash_ids)
        return len(ids)


# ---------------------------------------------------------------- validation


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass; True is not a length


def _to_request(obj: Any, time_scale: float) -> Request:
    """Validate one decoded record; raises ValueError with a message without location."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_show(obj)}")
    for name in _REQUIRED:
        if name not in obj or obj[name] is None:
            raise ValueError(f"missing '{name}'")
    ids = obj["hash_ids"]
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"'hash_ids' must be a list of integers, got {_show(ids)}")
    for i, h in enumerate(ids):
        if not _is_int(h):
            raise ValueError(f"'hash_ids' must be a list of integers, got {_show(h)} at index {i}")
    if len(set(ids)) != len(ids):  # chained prefix hashes: a block cannot follow itself
        first: dict = {}
        for i, h in enumerate(ids):
            if h in first:
                raise ValueError(f"'hash_ids' repeats block id {h} (indices {first[h]} and {i}); ids are "
                                 f"chained prefix hashes, so a block cannot follow itself in one request")
            first[h] = i
    ts = obj["timestamp"]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        raise ValueError(f"'timestamp' must be a finite number, got {_show(ts)}")
    for name in ("input_length", "output_length"):
        v = obj[name]
        if not _is_int(v) or v < 0:
            raise ValueError(f"'{name}' must be a non-negative integer, got {_show(v)}")
    extra = {}
    for name in _OPTIONAL:
        v = obj.get(name)
        if v is not None and not (isinstance(v, str) if name == "type" else _is_int(v)):
            kind = "a string" if name == "type" else "an integer"
            raise ValueError(f"'{name}' must be {kind}, got {_show(v)}")
        extra[name] = v
    return Request(ts / time_scale, tuple(ids), obj["input_length"], obj["output_length"], **extra)


# ---------------------------------------------------------------- JSONL


def _open(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode)
    return open(path, mode)


def _records(path: Path) -> Iterator[tuple[int, bytes, Any]]:
    """(1-based line number, raw line, decoded object) for each non-empty line."""
    with _open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = _loads(line)
            except ValueError:
                try:  # orjson refuses some inputs json accepts (NaN); let json decide
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TraceError(f"{path}:{lineno}: {_json_problem(line, e)}") from None
                except ValueError as e:  # undecodable bytes
                    raise TraceError(f"{path}:{lineno}: invalid JSON: {e}") from None
            yield lineno, line, obj


def _json_problem(line: bytes, e: json.JSONDecodeError) -> str:
    """json's message without its own "line 2 column 1", which counts inside this one line
    (its newline included), not in the file: the column, or "the line ends" instead."""
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    if e.pos >= len(text):
        return f"invalid JSON: {e.msg} (the line ends before the object does)"
    return f"invalid JSON at column {e.pos + 1}: {e.msg}"


def _load_jsonl(path: Path, fmt: str | None, limit: int | None) -> tuple[str, list[Request]]:
    requests: list[Request] = []
    scale = 0.0
    for lineno, line, obj in _records(path):
        if fmt is None:
            fmt = "bailian" if isinstance(obj, dict) and "chat_id" in obj else "mooncake"
        if not scale:
            scale = _TIME_SCALE[fmt]
        if limit is not None and len(requests) >= limit:
            break
        try:
            requests.append(_to_request(obj, scale))
        except ValueError as e:
            if orjson is None:
                raise TraceError(f"{path}:{lineno}: {e}") from None
            try:  # orjson turns integers beyond 64 bits into floats; json keeps them exact
                requests.append(_to_request(json.loads(line), scale))
            except ValueError as e2:
                raise TraceError(f"{path}:{lineno}: {e2}") from None
    return fmt or "mooncake", requests


def _record(r: Request, schema: str) -> dict[str, Any]:
    ts = r.timestamp
    if schema == "mooncake":  # seconds -> ms; rounding drops float noise (3536.999 * 1000)
        ts = round(ts * 1000.0, 6)
        ts = int(ts) if ts.is_integer() else ts
    core = {"timestamp": ts, "input_length": r.input_length, "output_length": r.output_length}
    if schema == "mooncake":
        return {**core, "hash_ids": list(r.hash_ids)}
    return {"chat_id": r.chat_id, "parent_chat_id": r.parent_chat_id, **core,
            "type": r.type, "turn": r.turn, "hash_ids": list(r.hash_ids)}


# ---------------------------------------------------------------- Parquet


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(_PARQUET_HINT) from e
    return pyarrow


def _load_parquet(path: Path, limit: int | None) -> tuple[str, int | None, list[Request]]:
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(path)
    except pa.ArrowException as e:
        raise TraceError(f"{path}: not a readable Parquet file: {e}") from None
    meta = table.schema.metadata or {}
    schema = meta.get(b"kvbm.schema", b"").decode() or (
        "bailian" if "chat_id" in table.column_names else "mooncake")
    block_size = int(meta[b"kvbm.block_size"]) if b"kvbm.block_size" in meta else None
    for name in _REQUIRED:
        if name not in table.column_names:
            raise TraceError(f"{path}: missing column '{name}' (has {', '.join(table.column_names)})")
    if limit is not None:
        table = table.slice(0, limit)
    names = [n for n in _REQUIRED + _OPTIONAL if n in table.column_names]
    cols = {n: table.column(n).to_pylist() for n in names}
    scale = _TIME_SCALE[schema]
    requests = []
    for row in range(table.num_rows):
        try:
            requests.append(_to_request({n: cols[n][row] for n in names}, scale))
        except ValueError as e:
            raise TraceError(f"{path}: row {row + 1}: {e}") from None
    return schema, block_size, requests


def _write_parquet(trace: Trace, path: Path, schema: str) -> None:
    pa = _pyarrow()
    records = [_record(r, schema) for r in trace.requests]
    names = list(_record(Request(0.0, (), 0, 0), schema))
    types = {"timestamp": pa.float64(), "input_length": pa.int64(), "output_length": pa.int64(),
             "hash_ids": pa.list_(pa.int64()), "chat_id": pa.int64(), "parent_chat_id": pa.int64(),
             "type": pa.string(), "turn": pa.int64()}
    table = pa.table({n: pa.array([rec[n] for rec in records], type=types[n]) for n in names})
    meta = {"kvbm.schema": schema, "kvbm.block_size": str(trace.block_size)}
    pa.parquet.write_table(table.replace_schema_metadata(meta), path)


# ---------------------------------------------------------------- public API


def load_trace(path: str | Path, format: str | None = None, limit: int | None = None,
               block_size: int | None = None) -> Trace:
    """Read a trace file.

    `format` is one of FORMATS or None to autodetect; `limit` keeps the first N requests;
    `block_size` overrides the format's default (512 Mooncake, 16 Bailian; Parquet files
    written by `write_trace` record theirs).
    """
    if format is not None and format not in FORMATS:
        raise TraceError(f"unknown trace format {format!r}; expected one of: {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    if format is None and path.suffix == ".parquet":
        format = "parquet"
    if format == "parquet":
        schema, stored_bs, requests = _load_parquet(path, limit)
        bs = block_size or stored_bs or DEFAULT_BLOCK_SIZE[schema]
    else:
        format, requests = _load_jsonl(path, format, limit)
        bs = block_size or DEFAULT_BLOCK_SIZE[format]
    return Trace(requests=requests, block_size=bs, format=format, source=str(path))


def write_trace(trace: Trace, path: str | Path, format: str | None = None) -> None:
    """Write `trace` as JSONL (`.gz` compresses) or Parquet (by suffix or `format`).

    The record schema is Bailian when any request carries a `chat_id` or the trace's format
    is bailian, else Mooncake (which keeps only its four fields). Timestamps are written in
    the schema's unit (ms for Mooncake, s for Bailian).
    """
    if format is not None and format not in FORMATS:
        raise TraceError(f"unknown trace format {format!r}; expected one of: {', '.join(FORMATS)}")
    path = Path(path)
    if format in ("mooncake", "bailian"):
        schema = format
    elif trace.format in ("mooncake", "bailian"):
        schema = trace.format
    else:
        schema = "bailian" if any(r.chat_id is not None for r in trace.requests) else "mooncake"
    if format == "parquet" or (format is None and path.suffix == ".parquet"):
        _write_parquet(trace, path, schema)
        return
    with _open(path, "wt") as f:
        for r in trace.requests:
            f.write(json.dumps(_record(r, schema)))
            f.write("\n")
