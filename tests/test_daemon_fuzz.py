"""Bad input: >= 10,000 malformed, oversized and unauthenticated messages at a daemon while a
well-formed client keeps working. The daemon never crashes, the client sees no errors, and no
attacker session ever finds the client's blocks (their keys are in the attacker's key pool)."""

from __future__ import annotations

import subprocess
import threading
import time

import msgpack
import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_daemon import NB, Daemon, block, make_keys

TOKEN = "s3cret"
OPS = ["hello", "heartbeat", "lookup", "store_prepare", "store_commit", "load_prepare", "load_release",
       "pin", "unpin", "events", "stats", "bye", "peer_hello", "peer_lookup", "peer_release", "nope", ""]
GOOD_KEYS = make_keys("victim", 48)


class Attacker:
    """Raw DEALER sockets; checks every reply it gets back."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.address = address
        self.sock = self._socket()
        self.sent = 0
        self.replies = 0
        self.leaks: list = []
        self.checked = 0  # accepted lookups/loads/pins from attacker sessions, all checked for leaks
        self.lookups: dict[int, str] = {}  # id -> op, for shaped lookups with a real session
        self.sessions: list[bytes] = []  # the fuzzer draws these (and may say bye on them)
        self.probe_sessions: list[bytes] = []  # never drawn: the leak probes' own sessions
        self.probe_errors: dict[str, int] = {}

    def _socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 0)  # every reply kept until read: a probe's answer is never dropped
        s.connect(self.address)
        return s

    def send(self, frames: list[bytes], fresh: bool = False) -> None:
        if fresh:  # the daemon cuts off a sender of an oversized message: reconnect after
            self.sock.close(0)
            self.sock = self._socket()
        while True:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
                break
            except zmq.Again:
                self.drain(0.05)
        self.sent += 1
        if self.sent % 200 == 0:
            self.drain(0)

    def drain(self, wait: float) -> None:
        while self.sock.poll(int(wait * 1000)):
            wait = 0
            reply = msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False)
            self.replies += 1
            op = self.lookups.pop(reply.get("id"), None)
            if op is None:
                continue
            if not reply.get("ok"):
                self.probe_errors[reply.get("error")] = self.probe_errors.get(reply.get("error"), 0) + 1
                continue
            self.checked += 1
            if op == "lookup" and reply["n"] != 0:
                self.leaks.append(reply)
            if op == "load_prepare" and reply["slots"]:
                self.leaks.append(reply)
            if op == "pin" and reply["n"] != 0:
                self.leaks.append(reply)

    def hello(self, model: str, into: list | None = None) -> None:
        self.sock.send(msgpack.packb({"op": "hello", "id": 1, "auth": TOKEN, "model": model,
                                      "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64,
                                                 "block_size": 16}}))
        assert self.sock.poll(180_000)
        (self.sessions if into is None else into).append(msgpack.unpackb(self.sock.recv(), raw=False)["session"])

    def wait_probes(self, timeout: float = 600.0) -> None:
        """Until every probe sent has its reply (the daemon answers each socket in order; a
        loaded box may leave it minutes behind the fuzzer, so this waits on the replies)."""
        deadline = time.monotonic() + timeout
        while self.lookups:
            assert time.monotonic() < deadline, f"{len(self.lookups)} probes unanswered after {timeout} s"
            self.drain(0.2)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def good_client_loop(d: Daemon, stop: threading.Event, report: dict) -> None:
    """Stores, lookups and verified loads of its own keys, until told to stop."""
    try:
        with d.client(token=TOKEN, timeout=300) as c:  # behind a flood on a loaded box: late, not lost
            rng = np.random.default_rng(0)
            while not stop.is_set():
                lo = int(rng.integers(0, len(GOOD_KEYS) - 8))
                keys = GOOD_KEYS[lo:lo + 8]
                c.store(keys, [block(k) for k in keys])
                c.lookup(keys)
                out = [np.zeros(NB, np.uint8) for _ in keys]
                n = c.load(keys, out)
                report["wrong"] += sum(not np.array_equal(o, block(k)) for o, k in zip(out[:n], keys))
                report["ops"] += 3
                report["loaded"] += n
    except Exception as exc:  # any exception is an error the client saw
        report["errors"].append(repr(exc))


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=6)),
                        max_leaves=20)
keyish = st.one_of(st.sampled_from(GOOD_KEYS), st.binary(min_size=0, max_size=20))


@st.composite
def shaped(draw, sessions):
    """A request that looks right: a real op, plausible fields, sometimes a valid token/session."""
    msg = {"op": draw(st.sampled_from(OPS)), "id": draw(st.integers(0, 2**31))}
    auth = draw(st.sampled_from([None, TOKEN, TOKEN, "wrong", "", TOKEN + "x"]))
    if auth is not None:
        msg["auth"] = auth
    if draw(st.booleans()) and sessions:
        msg["session"] = draw(st.sampled_from(sessions))
    elif draw(st.booleans()):
        msg["session"] = draw(st.one_of(st.binary(max_size=20), anything))
    fields = {"keys": st.one_of(st.lists(keyish, max_size=10), st.lists(st.sampled_from(GOOD_KEYS), max_size=8),
                                anything),
              "handle": st.one_of(st.integers(-5, 50), anything),
              "failed": st.one_of(st.lists(st.integers(-3, 12), max_size=5), anything),
              "parent": keyish, "position": st.one_of(st.integers(-5, 2**40), anything),
              "model": st.one_of(st.text(max_size=300), anything), "salt": anything,
              "layout": st.one_of(st.dictionaries(st.sampled_from(["num_layers", "num_kv_heads", "head_dim",
                                                                     "block_size", "dtype", "bogus"]),
                                                  st.one_of(st.integers(-5, 2**40), st.text(max_size=8))),
                                  anything),
              "max": anything, "remote": anything}
    for name, strat in fields.items():
        if draw(st.booleans()):
            msg[name] = draw(strat)
    return msg


def test_fuzz_never_crashes_never_leaks(tmp_path):
    # lease_s long: the probes must not depend on how soon hypothesis starts on a loaded machine
    d = Daemon(tmp_path, "fuzz", g2=64, token=TOKEN, lease_s=60.0, max_clients=256,
               max_session_blocks=8).start()
    attacker = Attacker(d.address)
    stop = threading.Event()
    report = {"ops": 0, "loaded": 0, "wrong": 0, "errors": []}
    good = threading.Thread(target=good_client_loop, args=(d, stop, report), daemon=True)
    try:
        for i in range(4):
            attacker.hello(f"evil-{i}")
            attacker.hello(f"evil-probe-{i}", attacker.probe_sessions)
        good.start()

        def send_shaped(msg: dict) -> None:
            probe = msg.get("auth") == TOKEN and msg.get("session") in attacker.probe_sessions and msg["op"] in (
                "lookup", "load_prepare", "pin")
            if probe:
                msg["id"] = 10**9 + attacker.sent
            try:
                payload = msgpack.packb(msg, use_bin_type=True)
            except (OverflowError, TypeError, ValueError):
                payload, probe = b"\xc1", False  # never-used msgpack byte (no id: no reply to wait for)
            if probe:
                attacker.lookups[msg["id"]] = msg["op"]
            attacker.send([payload])

        def mutants(payload: bytes, msg: dict | None, rnd) -> list[bytes]:
            """Cheap variants of one drawn message: truncations, bit flips, stripped auth,
            swapped types, the victim's keys; hypothesis draws are slow, mutations are not."""
            out = []
            for _ in range(8):
                cut = rnd.randrange(len(payload) + 1)
                out.append(payload[:cut])
                b = bytearray(payload)
                for _ in range(rnd.randint(1, 4)):
                    if b:
                        b[rnd.randrange(len(b))] = rnd.randrange(256)
                out.append(bytes(b))
            if msg is not None:
                for change in ({"auth": None}, {"auth": "wrong"}, {"keys": GOOD_KEYS[:8]},
                               {"keys": [k[:15] for k in GOOD_KEYS[:4]]}, {"id": -1}, {"op": 7},
                               {"handle": "1"}, {"keys": GOOD_KEYS[:2] * 2}):
                    m = {**msg, **change}
                    out.append(msgpack.packb({k: v for k, v in m.items() if v is not None}, use_bin_type=True))
            return out

        @settings(max_examples=420, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(item=st.one_of(
            st.binary(max_size=300).map(lambda b: ("raw", b)),
            anything.map(lambda o: ("obj", o)),
            shaped(attacker.sessions).map(lambda m: ("shaped", m)),
            shaped(attacker.sessions).map(lambda m: ("shaped", m)),
            st.lists(st.binary(max_size=30), min_size=0, max_size=4).map(lambda f: ("frames", f)),
        ), rnd=st.randoms(use_true_random=False))
        def fuzz(item, rnd):
            kind, value = item
            msg = None
            if kind == "raw":
                payload = value
            elif kind == "obj":
                try:
                    payload = msgpack.packb(value, use_bin_type=True)
                except (OverflowError, TypeError, ValueError):
                    payload = b"\x91\xc1"
            elif kind == "shaped":
                send_shaped(dict(value))
                msg = value
                # a probe: an authenticated attacker session asks for the victim's keys
                send_shaped({**value, "auth": TOKEN, "session": rnd.choice(attacker.probe_sessions),
                             "op": rnd.choice(["lookup", "load_prepare", "pin"]),
                             "keys": rnd.sample(GOOD_KEYS, rnd.randint(1, 8))})
                try:
                    payload = msgpack.packb(value, use_bin_type=True)
                except (OverflowError, TypeError, ValueError):
                    payload = b"\xc1"
            else:
                attacker.send([*value, b"x"] if value else [b""])
                payload = b"".join(value)
            attacker.send([payload])
            for p in mutants(payload, msg, rnd):
                attacker.send([p])
            for sid in attacker.sessions + attacker.probe_sessions:  # keep the attacker's sessions alive
                attacker.send([msgpack.packb({"op": "heartbeat", "id": 0, "auth": TOKEN, "session": sid})])
            assert d.proc.poll() is None, "the daemon died"

        fuzz()
        attacker.wait_probes()  # before the oversized phase replaces the socket (and its replies)
        # oversized: bigger than max_message_bytes (1 MiB), and an array bomb within the limit
        for i in range(20):
            attacker.send([b"\x00" * (2 << 20)], fresh=True)
        attacker.sock.close(0)
        attacker.sock = attacker._socket()
        for _ in range(20):
            attacker.send([msgpack.packb({"op": "lookup", "id": 1, "auth": TOKEN,
                                          "session": attacker.sessions[0], "keys": [b"k" * 16] * 60000})])
            attacker.send([b"\xdd\xff\xff\xff\xff"])  # claims a 4-billion-entry array
        attacker.drain(1.0)
        time.sleep(0.5)
        stop.set()
        good.join(300)
        assert not good.is_alive(), "the good client's last op did not end"
        print(f"fuzz: {attacker.sent} messages, {attacker.replies} replies, {attacker.checked} leak probes "
              f"answered ({attacker.probe_errors} refused), good client {report['ops']} ops / "
              f"{report['loaded']} blocks verified")
        assert attacker.sent >= 10_000
        assert d.proc.poll() is None, "the daemon died"
        assert report["errors"] == [], report["errors"]
        assert report["wrong"] == 0
        assert report["ops"] > 30 and report["loaded"] > 0
        assert attacker.leaks == [] and attacker.checked > 50
        with d.client(timeout=120, token=TOKEN) as c:  # still serving, and it counted the garbage
            st_ = c.stats()["daemon"]
            assert st_["bad_requests"] > 1000 and st_["unauthorized"] > 100
            assert c.lookup(GOOD_KEYS[:1])[0] in (0, 1)
    finally:
        stop.set()
        attacker.close()
        try:
            d.stop(60)
        except subprocess.TimeoutExpired:
            pass
        d.kill()
