"""Prometheus metrics and the health endpoint of the daemon.

    Metrics(daemon_stats)          a registry: request latencies + a collector over a snapshot
    Metrics.observe(op, seconds)   one request's latency (the loop thread): a bisect and two adds;
                                   the histogram kvbm_request_seconds{op} is built at scrape time
    Metrics.publish(snapshot)      the loop thread hands over fresh counters (every ~0.5 s)
    Metrics.serve("127.0.0.1:9400", token) -> (host, port)    GET /metrics, GET /health

The HTTP thread never touches the manager: it reads the last snapshot, so a scrape cannot
race the request loop. With a token (the daemon passes daemon.token when the address is not
loopback) every path answers 401 unless the request carries `Authorization: Bearer <token>`
(Prometheus: `authorization: {credentials_file: ...}` in the scrape config).

Tenants (daemon.tenants): kvbm_tenant_*{tenant} (each tenant's lookups, hits, blocks stored,
loaded, pinned, blocks per tier, sessions, busy share: tenants.tenant_stats) are exported only
when the endpoint wants the token. On loopback it is open to every local user, who would learn
the tenants' names and volumes there: so it shows node-wide counters only (the operator's `stats`
op has the per-tenant rows).

The port takes any local process (loopback needs no token), and each connection costs the
daemon a file descriptor: at its RLIMIT_NOFILE the daemon could accept no client any more, and
libzmq aborts the process on an ipc:// accept that fails with EMFILE. So the server holds at most
MAX_HTTP_PEERS connections at once (fewer under a small limit: event_gate.default_cap), closes the
rest at accept, and lets a connection that sends nothing go after IDLE_S: an idle or slow-loris
client can deny scrapes while it lasts, never the daemon.
"""

from __future__ import annotations

import bisect
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

MAX_HTTP_PEERS = 32  # connections the metrics port holds at once (a scraper needs one)
IDLE_S = 5.0  # a connection that sends no complete request in this long is closed
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)
_TIER_COUNTERS = ("hits", "stores", "evictions", "drops", "demotions_in", "promotions_out",
                  "rejected", "failed", "load_failures", "recovered", "io_errors", "checksum_errors",
                  "foreign_objects", "writes_refused")


class _Collector:
    def __init__(self, owner: "Metrics") -> None:
        self.owner = owner

    def collect(self):
        yield self.owner.latency_family()
        snap = self.owner.snapshot
        if not snap:
            return
        tiers = snap.get("tiers", {})
        for name in _TIER_COUNTERS:
            c = CounterMetricFamily(f"kvbm_tier_{name}", f"blocks: {name.replace('_', ' ')} per tier",
                                    labels=["tier"])
            for tier, row in tiers.items():
                c.add_metric([tier], row.get(name, 0))
            yield c
        used = GaugeMetricFamily("kvbm_tier_used_blocks", "blocks held (ready + in flight)", labels=["tier"])
        cap = GaugeMetricFamily("kvbm_tier_capacity_blocks", "capacity in blocks", labels=["tier"])
        for tier, row in tiers.items():
            used.add_metric([tier], row.get("used", 0))
            cap.add_metric([tier], row.get("capacity", 0))
        yield used
        yield cap
        nbytes = CounterMetricFamily("kvbm_transfer_bytes", "bytes moved per path", labels=["path"])
        secs = CounterMetricFamily("kvbm_transfer_seconds", "seconds spent moving bytes per path", labels=["path"])
        rate = GaugeMetricFamily("kvbm_transfer_gb_per_second", "average GB/s per path", labels=["path"])
        for path, row in snap.get("transfers", {}).items():
            nbytes.add_metric([path], row["bytes"])
            secs.add_metric([path], row["seconds"])
            rate.add_metric([path], row["gb_per_s"] or 0.0)
        yield nbytes
        yield secs
        yield rate
        d = snap.get("daemon", {})
        lk = CounterMetricFamily("kvbm_lookup_blocks", "blocks asked for in lookups")
        lk.add_metric([], d.get("lookup_blocks", 0))
        yield lk
        ph = CounterMetricFamily("kvbm_prefix_hit_blocks", "blocks found in the ready prefix of lookups")
        ph.add_metric([], d.get("prefix_hit_blocks", 0))
        yield ph
        ratio = GaugeMetricFamily("kvbm_prefix_hit_ratio", "prefix hit blocks / lookup blocks")
        ratio.add_metric([], d.get("prefix_hit_ratio", 0.0))
        yield ratio
        for name, doc in (("clients", "open client sessions"), ("uptime_seconds", "seconds since start")):
            g = GaugeMetricFamily(f"kvbm_{name}", doc)
            g.add_metric([], d.get(name, 0))
            yield g
        for name in ("lease_expiries", "peer_pull_blocks", "peer_pull_bytes", "peer_errors",
                     "bad_requests", "unauthorized"):
            c = CounterMetricFamily(f"kvbm_{name}", name.replace("_", " "))
            c.add_metric([], d.get(name, 0))
            yield c
        if self.owner.protected:  # tenant names and volumes: only behind the bearer token
            yield from _tenant_families(snap.get("tenants", {}))


def _tenant_families(tenants: dict[str, dict[str, Any]]):
    """kvbm_tenant_*{tenant}: each tenant's own counters (tenants.tenant_stats)."""
    for name, doc in _TENANT_COUNTERS:
        c = CounterMetricFamily(f"kvbm_tenant_{name}", doc, labels=["tenant"])
        for tenant, row in tenants.items():
            c.add_metric([tenant], row.get(name, 0))
        yield c
    for name, doc in _TENANT_GAUGES:
        g = GaugeMetricFamily(f"kvbm_tenant_{name}", doc, labels=["tenant"])
        for tenant, row in tenants.items():
            g.add_metric([tenant], row.get(name, 0))
        yield g
    g = GaugeMetricFamily("kvbm_tenant_blocks", "blocks of the tenant's namespaces per tier", labels=["tenant", "tier"])
    for tenant, row in tenants.items():
        for tier, n in row.get("blocks", {}).items():
            g.add_metric([tenant, tier], n)
    yield g


_TENANT_COUNTERS = (("lookup_blocks", "blocks the tenant asked for in lookups"),
                    ("prefix_hit_blocks", "blocks found in the ready prefix of the tenant's lookups"),
                    ("stored_blocks", "blocks the tenant's clients stored"),
                    ("loaded_blocks", "blocks the tenant's clients loaded"),
                    ("pinned_blocks", "pins the tenant's clients took"))
_TENANT_GAUGES = (("sessions", "open sessions of the tenant"),
                  ("busy_blocks", "G2 blocks the tenant keeps busy (pins, reservations)"),
                  ("busy_share", "busy blocks / the tenant's bound"))


class Metrics:
    def __init__(self) -> None:
        self.protected = False  # /metrics wants the bearer token (serve): tenants' rows are exported
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        self.snapshot: dict[str, Any] = {}
        self.started = time.monotonic()
        self._server: ThreadingHTTPServer | None = None
        # op -> [count per bucket (the last one past 1 s), sum of seconds]; only the loop thread
        # writes (prometheus_client's Histogram.observe took a lock and a Python scan of the
        # buckets per request: a few us of each request's time)
        self._latency: dict[str, list] = {}

    def observe(self, op: str, seconds: float) -> None:
        row = self._latency.get(op)
        if row is None:
            row = self._latency[op] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        row[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[1] += seconds

    def latency_family(self) -> HistogramMetricFamily:
        """kvbm_request_seconds{op}: cumulative buckets of what observe() counted."""
        fam = HistogramMetricFamily("kvbm_request_seconds", "daemon request latency", labels=["op"])
        for op, (counts, total) in list(self._latency.items()):
            counts = list(counts)  # one copy: buckets and count agree even while the loop counts on
            acc, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts):
                acc += n
                buckets.append((_bound(bound), acc))
            fam.add_metric([op], buckets, total)
        return fam

    def publish(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot  # one reference swap: readers see an old or a new one

    def serve(self, address: str, token: str = "") -> tuple[str, int]:
        host, _, port = address.rpartition(":")
        metrics = self
        self.protected = bool(token)
        want = f"Bearer {token}".encode()

        class Handler(BaseHTTPRequestHandler):
            timeout = IDLE_S  # socket timeout: an idle or slow-loris connection lets its descriptor go

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if token and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), want):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="kvbm"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/metrics"):
                    body, ctype = generate_latest(metrics.registry), CONTENT_TYPE_LATEST
                elif self.path.startswith("/health"):
                    d = metrics.snapshot.get("daemon", {})
                    body = json.dumps({"status": "ok", "clients": d.get("clients", 0),
                                       "uptime_s": round(time.monotonic() - metrics.started, 1)}).encode()
                    ctype = "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _BoundedServer((host.strip("[]"), int(port)), Handler)
        threading.Thread(target=self._server.serve_forever, name="kvbm-metrics", daemon=True).start()
        return self._server.server_address[:2]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _BoundedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds at most `cap` connections; the rest are closed at accept."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog (socketserver's 5 drops a burst's SYNs: 1 s client retries)

    def __init__(self, *args: Any, cap: int | None = None, **kw: Any) -> None:
        from .event_gate import default_cap

        self.cap = min(MAX_HTTP_PEERS, default_cap()) if cap is None else cap
        self._held: set[int] = set()  # the connections counted (a refused one is shut down too)
        self.refused = 0
        self._count = threading.Lock()
        super().__init__(*args, **kw)

    def verify_request(self, request: Any, client_address: Any) -> bool:  # the serve_forever thread
        with self._count:
            if len(self._held) >= self.cap:
                self.refused += 1
                return False  # socketserver shuts it down at once
            self._held.add(id(request))
            return True

    def shutdown_request(self, request: Any) -> None:  # the handler's thread, after it ends
        super().shutdown_request(request)
        with self._count:
            self._held.discard(id(request))

    @property
    def active(self) -> int:
        return len(self._held)


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)
