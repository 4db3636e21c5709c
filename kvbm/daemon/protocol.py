"""Wire protocol: one msgpack map per zmq message, client DEALER -> daemon ROUTER.

    request   {"op": str, "id": int, "auth": str?, "session": bytes?, ...fields}
    reply     {"id": int, "ok": true, ...fields} | {"id": int, "ok": false, "error": code, "message": str}

Ops (fields beyond op/id/auth/session):
    hello         model: str, layout: map, salt: str     -> session, window_path, window_bytes,
                                                            window_slots, stride, ... (slots below are
                                                            slots of this session's window, not of G2)
    heartbeat                                            -> {}
    lookup        keys: [bin16], remote: bool?           -> n, where: [tier]
    store_prepare keys: [bin16], parent: bin16?, position: int?, priorities: [[int 0-100, float?]]?,
                  hashes: [bin 1-64 | int | nil]?, parent_hash: bin | int?  (engine block hashes for
                  the vLLM-format KV-event stream, daemon/kv_events.py)
                  -> handle, slots: [int] (-1: skip)
    store_commit  handle: int, failed: [int]             -> stored
    load_prepare  keys: [bin16]                          -> handle, slots: [int]
    load_release  handle: int                            -> {}
    store         keys, slots: [int], parent?, position?, priorities?   -> stored, rejected?
    load          keys, slots: [int]                     -> n   one round trip each: `slots` are the
                                                            client's scratch slots (hello's scratch:
                                                            [first, count]), written before a store,
                                                            read after a load; nothing held after
    pin / unpin   keys: [bin16]                          -> n
    lookup_pin    keys: [bin16], pin_from: int?, remote: bool?
                                                         -> n, where, pinned: the lookup, then a pin of
                                                            keys[pin_from:n] (op pin's pins); pinned 0
                                                            and quota: str when the quota refuses; no
                                                            pinned when the lookup waited on peers
    events        max: int?                              -> events: [[kind, key, tier]]
    stats                                                -> stats
    kv_view                                              -> view: {medium: {locality: [engine hash]}} of the caller's
                                                            namespace (with daemon.kv_events; kv_events.py)
    bye                                                  -> {}
    cancel        cancels: int (a request id)            -> undone: bool; what that request created is
                                                            undone, or it is refused when it arrives
Request ids: a session's last 32 replies to store_prepare / store_commit / load_prepare /
load_release / pin / unpin / lookup_pin are kept; the same id again gets the same reply (a client's retry).
    peer_hello / peer_lookup / peer_release              daemon-to-daemon (see peers.py, peerauth.py):
    peer_hello    nonce: bin32                           -> challenge: bin32, proof: bin32 (HMAC)
    peer_hello    nonce, challenge, proof: bin32         -> session, agent, metadata
    peer_lookup   namespace: bin16, keys: [bin16] (client keys), crcs_later: bool?, wait_s: float?
                                                         -> handle, n, nbytes, addrs: [int],
                                                            crcs: [int] | crcs_later: true
    peer_release  handle: int, crcs: bool?               -> crcs: [int]? (when they came later)

KV-event stream for routers (zmq PUB at daemon.events), one message per request that changed
blocks: [topic, msgpack [[kind, key, tier], ...], seq] with kind stored / removed / moved, `key`
the client's own key, `tier` where the block is now (stored, moved) or was (removed), and `topic`
a one-way hash of the namespace id (`Client.topic`, events.topic_of; subscribe to it to see one
namespace only). `seq` (events_seq / events_seq_of) is 16 bytes: the
message's sequence number (8 bytes, big endian) then the daemon run's epoch (8 bytes, big endian,
random, the same for every message of one `kvbm serve` run). Sequence numbers are per namespace,
assigned in the daemon before the publisher: consecutive within a namespace and an epoch (the
first of a namespace's stream is the wall clock in microseconds, so a stream the daemon dropped
while its namespace held nothing goes on above its old numbers), so a lost message (a restarted
publisher, a subscriber past its high-water mark) is a gap, and a new epoch is a daemon restart
(its blocks are known again only through a snapshot). The third frame is new: a subscriber that
reads frames [0] and [1] reads what it did before.
Replay (zmq ROUTER at daemon.events_replay; events.py, replay.py): a DEALER sends [b"", topic,
start seq (8 bytes, big endian, signed)] and gets [b"", topic, seq (16 bytes, as above), rows] per
buffered message of that topic from `start` on (at most daemon.kv_events_buffer per namespace),
then [b"", b"", -1 (8 bytes), b""]. A start older than the buffer, or -1, gets one snapshot first:
rows [["cleared", b"", ""], ["stored", key, tier] per tier holding each of the namespace's blocks],
at the seq it reflects. A topic the daemon has not published gets the end marker only. Follower
(kvbm/follower.py) does all of this: it counts and logs gaps and restarts and recovers.
With daemon.events_token (else daemon.token) both sockets take ZMQ PLAIN peers only (username
kvbm, password the token); whoever may subscribe to a topic may replay it, and nothing else.

Every field is checked for type, length and count before use; a bad message gets an error
reply (or, if it cannot even be parsed, a reply with id 0) and never reaches the manager.
"""

from __future__ import annotations

from typing import Any

import msgpack

KEY_BYTES = 16
MAX_STR = 256


class ProtocolError(Exception):
    """A request the daemon refuses; `code` is a stable machine-readable word."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(RuntimeError):
    """A daemon's error reply, raised on the client side."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def request(op: str, rid: int, token: str = "", session: Any = None, **fields: Any) -> bytes:
    """One encoded request: op, id, the token when one is set, the session once opened."""
    msg = {"op": op, "id": rid, **fields}
    if token:
        msg["auth"] = token
    if session is not None:
        msg["session"] = session
    return pack(msg)


class _Containers(Exception):
    pass


def unpack(data: bytes, max_items: int) -> dict:
    """Decode one request; containers and strings are bounded before they are built, and so is
    their number: a request holds at most max_items + 64 lists and maps (keys, slots, failed,
    hashes, the priorities' pairs, the layout). Before, a 1 MiB message of nested empty arrays
    (each bounded, a million in all) cost the loop 0.7 s and ~70 MiB, before the token was
    checked: a stranger on tcp:// sending them back to back held every tenant's requests
    (tests/test_attack_starve.py). Now its decoding stops after that many: under a millisecond."""
    left = [max_items + 64]

    def count(obj: Any) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise _Containers
        return obj

    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=64 * 1024,
                              max_bin_len=len(data), max_array_len=max_items, max_map_len=64,
                              max_ext_len=0, list_hook=count, object_hook=count)
    except _Containers:
        raise ProtocolError("bad_message", f"more than {max_items + 64} lists and maps in one message") from None
    except Exception as exc:  # msgpack raises several types for garbage; all are a bad request
        raise ProtocolError("bad_message", f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a request must be a msgpack map")
    return obj


def field(msg: dict, name: str, kind: type | tuple, *, required: bool = True, default: Any = None) -> Any:
    v = msg.get(name, None)
    if v is None:
        if required:
            raise ProtocolError("bad_field", f"missing field {name!r}")
        return default
    if isinstance(v, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise ProtocolError("bad_field", f"field {name!r} must be {_names(kind)}, got bool")
    if not isinstance(v, kind):
        raise ProtocolError("bad_field", f"field {name!r} must be {_names(kind)}, got {type(v).__name__}")
    return v


def string(msg: dict, name: str, *, required: bool = True, default: str = "", limit: int = MAX_STR) -> str:
    v = field(msg, name, str, required=required, default=default)
    if len(v) > limit:
        raise ProtocolError("bad_field", f"field {name!r} is longer than {limit} characters")
    return v


def integer(msg: dict, name: str, *, required: bool = True, default: int = 0, lo: int = 0,
            hi: int = 2**62) -> int:
    v = field(msg, name, int, required=required, default=default)
    if not lo <= v <= hi:
        raise ProtocolError("bad_field", f"field {name!r} must be in [{lo}, {hi}], got {v}")
    return v


def keys(msg: dict, name: str, limit: int, *, unique: bool = False) -> list[bytes]:
    """A list of 16-byte block keys, at most `limit` of them."""
    v = field(msg, name, list)
    if len(v) > limit:
        raise ProtocolError("too_many", f"field {name!r} has {len(v)} keys; at most {limit} per request")
    for k in v:
        if not isinstance(k, bytes) or len(k) != KEY_BYTES:
            raise ProtocolError("bad_field", f"field {name!r}: every key must be {KEY_BYTES} bytes (bin)")
    if unique and len(set(v)) != len(v):
        raise ProtocolError("bad_field", f"field {name!r} repeats a key")
    return v


def indices(msg: dict, name: str, below: int) -> list[int]:
    v = field(msg, name, list, required=False, default=[])
    if len(v) > below:
        raise ProtocolError("too_many", f"field {name!r} has more entries than the request")
    for i in v:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < below:
            raise ProtocolError("bad_field", f"field {name!r}: indices must be integers in [0, {below})")
    return v


def priorities(msg: dict, name: str, n: int) -> list[tuple[int, float | None]] | None:
    """Optional per-key retention: a list of n [priority 0-100, duration seconds or nil]."""
    v = field(msg, name, list, required=False)
    if v is None:
        return None
    if len(v) != n:
        raise ProtocolError("bad_field", f"field {name!r} has {len(v)} entries for {n} keys")
    out = []
    for e in v:
        if not (isinstance(e, list) and len(e) == 2):
            raise ProtocolError("bad_field", f"field {name!r}: each entry is [priority, duration or nil]")
        p, d = e
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 100:
            raise ProtocolError("bad_field", f"field {name!r}: a priority is an integer in [0, 100], got {p!r}")
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1e9):
            raise ProtocolError("bad_field", f"field {name!r}: a duration is nil or seconds in [0, 1e9], got {d!r}")
        out.append((p, None if d is None else float(d)))
    return out


EVENTS_SEQ_BYTES = 16  # the `events` stream's third frame: seq then epoch, 8 bytes each, big endian


def events_seq(seq: int, epoch: int) -> bytes:
    """The `events` stream's seq frame (see the docstring)."""
    return seq.to_bytes(8, "big") + epoch.to_bytes(8, "big")


def events_seq_of(frame: bytes) -> tuple[int, int] | None:
    """(seq, epoch) of an `events` seq frame; None when it is not one."""
    if len(frame) != EVENTS_SEQ_BYTES:
        return None
    return int.from_bytes(frame[:8], "big"), int.from_bytes(frame[8:], "big")


def error_reply(rid: Any, code: str, message: str) -> bytes:
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else 0
    return pack({"id": rid, "ok": False, "error": code, "message": message[:500]})


def _names(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
