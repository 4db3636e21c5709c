"""The cache daemon: one long-lived BlockManager per node, shared by every engine on it.

    config.py     DaemonConfig: the `daemon:` section of kvbm.yaml (addresses, token, peers, limits)
    protocol.py   msgpack messages over zmq ROUTER/DEALER: limits, field validation, errors
    leases.py     per-client sessions: namespace, heartbeat deadline, pins and reservations
    server.py     Daemon: the request loop that owns the manager; `kvbm serve`
    sessions.py   hello / heartbeat / bye and lease expiry (ops of Daemon)
    dataplane.py  lookup, two-phase store and load, pin / unpin (ops of Daemon)
    events.py     KV events drained after each request, published per namespace
    peering.py    peer_* ops and the puller thread (cross-node pulls)
    metrics.py    Prometheus collector and the /metrics, /health HTTP endpoint
    peers.py      cross-node pulls: NIXL agent over the shared G2 pool, peer requests
    peerauth.py   peers prove the cluster's peer secret to each other (HMAC challenge-response)
    onboard.py    G3/G4 blocks come up to G2 off the request loop; requests needing them wait

Data plane on one node: the daemon's G2 pool is a named shared-memory file that clients map.
A store reserves slots (prepare), the client writes them, then commits; a load pins slots,
the client reads them, then releases. Block bytes never travel through the socket.
The client side lives in `kvbm.client`.
"""

from .config import DaemonConfig, load_daemon_config

__all__ = ["DaemonConfig", "load_daemon_config"]
