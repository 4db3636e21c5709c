"""Issue 12's attack on the peer protocol, run in its own process (a NIXL agent must not live in the
test process: nixl's wheel can crash at exit once UCX's IB module is loaded).

    attack(address, events, token, conn)

A process that knows the client token (or nothing, on a loopback bind) but not the cluster's
peer secret:
  1. subscribes to the daemon's KV-event stream (with the token as PLAIN credentials too, in case
     the stream asks for them) and tells the test it has joined once any event arrives; once
     told the victim stored, it listens until a second namespace's events came (no clock);
  2. takes every (topic, client key) of a `stored` event, reads the topic as a namespace id and
     derives the daemon's server key for each client key;
  3. opens a peer session with peer_hello (the old one-step form, then the challenge form with a
     forged proof) and asks peer_lookup for those keys (the old form: server keys; the new form:
     namespace + client keys);
  4. READs every address it was given over NIXL into its own memory.
Sends back {"stages": [...what each step answered...], "read": {client key hex: sha256 of bytes}}.
"""

from __future__ import annotations

import hashlib
import os
import time


def _subscribe(ctx, events: str, token: str) -> list:
    import zmq

    socks = []
    for plain in ([False, True] if token else [False]):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        if plain:
            sub.plain_username = b"kvbm"
            sub.plain_password = token.encode()
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(events)
        socks.append(sub)
    return socks


def _ask(sock, rid: list, token: str, op: str, session=None, **fields):
    import zmq

    from kvbm.daemon.protocol import request, unpack

    rid[0] += 1
    sock.send(request(op, rid[0], token, session, **fields))
    if not sock.poll(120_000):
        return {"ok": False, "error": "timeout"}
    reply = unpack(sock.recv(), 1 << 20)
    return reply


def attack(address: str, events: str, token: str, conn) -> None:
    import numpy as np
    import zmq

    from kvbm.daemon.leases import server_key

    ctx = zmq.Context()
    subs = _subscribe(ctx, events, token)
    poller = zmq.Poller()
    for s in subs:
        poller.register(s, zmq.POLLIN)
    stored: dict[bytes, list] = {}
    joined = False
    quiet_until = None
    deadline = time.monotonic() + 300
    victim_stored = False
    while time.monotonic() < deadline:
        ready = dict(poller.poll(100))
        for s in subs:
            if s in ready:
                import msgpack

                topic, body = s.recv_multipart()[:2]  # a third frame carries seq + epoch
                for kind, ck, _tier in msgpack.unpackb(body):
                    if kind == "stored":
                        stored.setdefault(topic, []).append(ck)
                if not joined:
                    joined = True
                    conn.send("joined")
        if joined and conn.poll(0):
            conn.recv()  # the victim has stored: its events are on their way
            victim_stored = True
        if victim_stored and quiet_until is None and len(stored) >= 2:
            quiet_until = time.monotonic() + 1.0  # the victim's topic arrived: stragglers, then go
        if quiet_until is not None and time.monotonic() > quiet_until:
            break
    stages: list = []
    read: dict = {}
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    rid = [0]
    sessions = []
    r = _ask(dealer, rid, token, "peer_hello")
    stages.append(["peer_hello", r.get("ok"), r.get("error")])
    if r.get("ok") and r.get("session"):
        sessions.append(r)
    nonce = os.urandom(32)
    r = _ask(dealer, rid, token, "peer_hello", nonce=nonce)
    stages.append(["peer_hello nonce", r.get("ok"), r.get("error")])
    if r.get("ok") and r.get("challenge"):
        r = _ask(dealer, rid, token, "peer_hello", nonce=nonce, challenge=r["challenge"], proof=os.urandom(32))
        stages.append(["peer_hello forged proof", r.get("ok"), r.get("error")])
        if r.get("ok") and r.get("session"):
            sessions.append(r)
    agent = None
    for hello in sessions:
        for topic, cks in stored.items():
            try:
                ns = bytes.fromhex(topic.decode())
            except ValueError:
                continue
            for form in ("server keys", "namespace"):
                if form == "server keys":
                    fields = {"keys": [server_key(ns, k) for k in cks]}
                else:
                    fields = {"namespace": ns, "keys": list(cks)}
                r = _ask(dealer, rid, token, "peer_lookup", hello["session"], **fields)
                stages.append([f"peer_lookup {form}", r.get("ok"), r.get("error"), r.get("n")])
                if not (r.get("ok") and r.get("n")):
                    continue
                if agent is None:
                    from kvbm.daemon.peers import new_agent

                    agent = new_agent(f"attacker-{os.getpid()}", ["UCX"])
                    agent.add_remote_agent(hello["metadata"])
                nb = r["nbytes"]
                buf = np.zeros(nb * r["n"], dtype=np.uint8)
                reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
                local = agent.get_xfer_descs(np.array([[buf.ctypes.data + i * nb, nb, 0] for i in range(r["n"])],
                                                      dtype=np.uint64), "DRAM")
                remote = agent.get_xfer_descs(np.array([[a, nb, 0] for a in r["addrs"]], dtype=np.uint64), "DRAM")
                h = agent.initialize_xfer("READ", local, remote, hello["agent"])
                state = agent.transfer(h)
                t_end = time.monotonic() + 120
                while state not in ("DONE", "ERR") and time.monotonic() < t_end:
                    time.sleep(0.001)
                    state = agent.check_xfer_state(h)
                stages.append(["nixl read", state])
                if state == "DONE":
                    for i, ck in enumerate(cks[:r["n"]]):
                        read[ck.hex()] = hashlib.sha256(buf[i * nb:(i + 1) * nb].tobytes()).hexdigest()
                agent.release_xfer_handle(h)
                agent.deregister_memory(reg)
                _ask(dealer, rid, token, "peer_release", hello["session"], handle=r["handle"])
    conn.send({"stages": stages, "read": read, "topics": len(stored)})
    os._exit(0)  # no nixl teardown at exit (see the module docstring)
