"""What G4 sets and uses of s3fs (object.py's async filesystem when the URL is `s3://`).

    with_defaults(protocol, options, concurrency)  kvbm's client settings under the user's
    PutBody().fill(header, payload)                a put's body, reused: a file s3fs can take len() of
    streams(fs) -> bool                            whether get_into can stream from this fs (s3fs)
    get_into(fs, path, dst) -> header bytes        one GET, the payload landing straight in dst
    unreachable(exc) -> bool                       the endpoint (not the object) failed

A GET through s3fs's `_cat_file` returns the whole object as one bytes: aiohttp joins the
socket's chunks into it (a copy of every byte) and the storage then copied the payload into
G2 (a second). get_into writes each chunk into G2 as aiohttp hands it over: one copy, as a
raw `cat` pays for its join, and the MAC check then reads G2 (issue 17: CPU per byte of G4
reads). A longer object than one block never writes past dst: it is Corrupt.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np

from .seal import HEADER_MIN, Corrupt

# s3fs defaults are 5 s connect, 15 s read and 5 (s3fs) x 5 (botocore legacy) attempts with
# backoff: minutes against a dead endpoint. A cache would rather miss: 2 s to connect, 5 s
# between response bytes, one retry (botocore's), none from s3fs's loop around it.
S3_CONFIG = {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}
S3_RETRIES = 1
# botocore >= 1.36 CRC32s every PUT body and every whole-object GET in Python (zlib, ~1 s of
# CPU per GiB here): as much CPU as our CRC-32C and MAC together, which already cover the
# payload end to end. Only when required, then (issue 17: the G4 path's CPU per byte).
S3_CHECKSUMS = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}


def with_defaults(protocol: str, options: dict[str, Any], concurrency: int) -> dict[str, Any]:
    opts = dict(options)
    if protocol in ("s3", "s3a"):
        # botocore pools 10 connections by default: more puts than that would queue for one
        pool = {"max_pool_connections": max(10, concurrency)}
        # a fresh `retries` dict each time: botocore rewrites it in place (max_attempts ->
        # total_max_attempts), which would otherwise change the defaults of every later storage
        defaults = {**S3_CONFIG, "retries": dict(S3_CONFIG["retries"]), **_checksum_options()}
        opts["config_kwargs"] = {**defaults, **pool, **(opts.get("config_kwargs") or {})}
    return opts


def _checksum_options() -> dict[str, str]:
    """S3_CHECKSUMS where this botocore knows the options (older ones refuse unknown ones)."""
    try:
        from botocore.config import Config
    except ImportError:
        return {}
    known = getattr(Config, "OPTION_DEFAULTS", {})
    return {k: v for k, v in S3_CHECKSUMS.items() if k in known}


# s3fs's _pipe_file goes multipart from twice its 50 MiB part size, and slices the body into
# parts: a PutBody only below that (a 160 MiB block, say, goes as a bytearray).
SINGLE_PUT_BYTES = 100 << 20


class PutBody(io.BytesIO):
    """One object (header, then payload) as a file: botocore hashes it and aiohttp sends it in
    reads of its own size, never as one 16 MiB bytes to slice and buffer. s3fs asks its len().
    Reused: every object of a layout has one size, so refilling it allocates nothing."""

    def fill(self, header: bytes, payload: memoryview, tail: bytes = b"") -> None:
        self.seek(0)
        self.write(header)
        self.write(payload)
        self.write(tail)
        self.truncate()
        self.seek(0)

    def __len__(self) -> int:
        return self.getbuffer().nbytes


def streams(fs: Any) -> bool:
    return bool(getattr(fs, "async_impl", False)) and hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


async def get_into(fs: Any, path: str, dst: np.ndarray, slack: int = 0) -> bytes:
    """The object's header, then any bytes after the payload (at most `slack`: a trailer,
    object_meta.py); its payload is in dst. Corrupt when shorter than HEADER_MIN + dst.nbytes."""
    bucket, key, _ = fs.split_path(path)
    # no Range and no HEAD: one GET (s3fs's _cat_file without a range sends a HEAD first)
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = resp["Body"]
    # aiohttp's StreamReader hands over each chunk as it arrived (readchunk); aiobotocore's
    # read(n) would join what is buffered first. Any other body: read(n).
    reader = getattr(getattr(body, "_raw_stream", None), "content", None)
    chunked = reader is not None and hasattr(reader, "readchunk")
    out, end, got, extra = memoryview(dst).cast("B"), dst.nbytes, 0, bytearray()
    head = bytearray()
    try:
        while True:
            if chunked:
                data, http_chunk_end = await reader.readchunk()
                if not data and http_chunk_end:
                    continue
            else:
                data = await body.read(1 << 20)
            if not data:
                break
            view = memoryview(data)
            if len(head) < HEADER_MIN:
                take = HEADER_MIN - len(head)
                head += view[:take]
                view = view[take:]
            n = min(len(view), end - got)
            if n < len(view):
                extra += view[n:]
                if len(extra) > slack:
                    raise Corrupt(f"{path}: longer than one block")
            out[got:got + n] = view[:n]
            got += n
    except Exception as exc:
        if not _client_error(exc):
            raise
        # aiohttp's payload and connection errors (aiobotocore's read() would have raised them
        # as botocore's ResponseStreamingError): the endpoint failed, not the object
        raise ConnectionError(f"{path}: the GET's body broke off ({exc.__class__.__name__}: {exc})") from exc
    finally:
        body.close()
    if len(head) < HEADER_MIN:
        raise Corrupt(f"{path}: short header")
    if got != end:
        raise Corrupt(f"{path}: short payload")
    return bytes(head + extra)


def _client_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(exc, aiohttp.ClientError)


def unreachable(exc: BaseException) -> bool:
    """The endpoint (not the object) failed: refused, reset, timed out."""
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return False
    return isinstance(exc, (BotoConnectionError, HTTPClientError))
