"""The cache daemon: one long-lived BlockManager per node, shared by every engine on it.

    config.py     DaemonConfig: the `daemon:` section of kvbm.yaml (addresses, tokens, tenants, peers, limits)
    protocol.py   msgpack messages over zmq ROUTER/DEALER: limits, field validation, errors
    transport.py  binding the request and event sockets (private ipc folders, tcp needs a token)
    conn_gate.py  the tcp request socket's gate: strangers cut first, messages that never end cut
    leases.py     per-client sessions: namespace, heartbeat deadline, pins and reservations
    server.py     Daemon: the request loop that owns the manager; `kvbm serve`
    tenants.py    per-tenant tokens: a request's token names its tenant, its namespaces and its bound
    sessions.py   hello / heartbeat / bye and lease expiry (ops of Daemon)
    windows.py    each session's private staging window (a /dev/shm file only that client maps)
    dataplane.py  lookup, two-phase store and load, pin / unpin (ops of Daemon)
    events.py     stored / removed / tier-changed rows drained after each request, per namespace
    kv_events.py  the same changes as vLLM-format KV events for routers
    replay.py     sequence numbers, per-namespace replay buffers and snapshots of both streams
    publisher.py  the child process that owns the public event sockets (fed over private links)
    event_gate.py the event sockets' connection gate (and the cutter conn_gate.py shares)
    peering.py    peer_* ops and the puller thread (cross-node pulls)
    metrics.py    Prometheus collector and the /metrics, /health HTTP endpoint
    peers.py      cross-node pulls: NIXL agent over the shared G2 pool, peer requests
    peerauth.py   peers prove the cluster's peer secret to each other (HMAC challenge-response)
    onboard.py    G3/G4 blocks come up to G2 off the request loop; requests needing them wait

Data plane on one node: G2 is the daemon's private memory. Each session has its own staging
window that only its client maps; the daemon copies window -> G2 at store_commit and G2 ->
window at load_prepare (with pread/pwrite on the window's descriptor, so a client that
truncates its window fails its own copy, never the daemon). Block bytes never travel through
the socket. The client side lives in `kvbm.client`; `kvbm.follower` follows the events stream.
"""

from .config import DaemonConfig, load_daemon_config

__all__ = ["DaemonConfig", "load_daemon_config"]
