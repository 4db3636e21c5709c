"""DaemonConfig: the `daemon:` section of kvbm.yaml, beside the manager's own keys.

    daemon:
      address: ipc://$XDG_RUNTIME_DIR/kvbm/kvbm.sock   # default (else /tmp/kvbm-<uid>/); or tcp://HOST:PORT
                                          # (tcp needs a token: any local user reaches a tcp port)
      events: tcp://127.0.0.1:5558        # KV-event PUB stream for routers ("" = off)
      events_replay: ""                   # its replay ROUTER (resync after a gap), e.g. tcp://127.0.0.1:5559
      kv_events: ""                       # the same in vLLM's KV-event format (kv_events.py), e.g. tcp://127.0.0.1:5560
      kv_events_replay: ""                # its replay ROUTER (resync after a gap), e.g. tcp://127.0.0.1:5561
      kv_events_buffer: 10000             # batches kept per namespace for replay
      metrics: 127.0.0.1:9400             # Prometheus /metrics and /health ("" = off)
      token: ""                           # or token_file (mode 0600: refused if others may read it);
                                          # required for a tcp:// address
      tenants:                            # tenant name -> its own token (tenants.py): its own namespaces,
        alice: {token_file: /etc/kvbm/alice.token, share: 0.3}   # sessions and share of G2
        bob: {token_file: /etc/kvbm/bob.token}  # share: namespace_share; daemon.token = the "default" tenant
                                          # weight: N (default 1): its part of each tier (G2, G3, G4)
                                          # against the others' weights: no tenant's stores evict the
                                          # blocks of a tenant holding fewer per weight (tenants.py)
                                          # generation: N (default 0): bump it when a name goes to a
                                          # new owner (the old owner's G3/G4 blocks stay out of reach)
                                          # events / events_replay / kv_events / kv_events_replay: ADDR:
                                          # the tenant's own streams (its namespaces only; its token
                                          # is the PLAIN password)
      default_weight: 1                   # the default tenant's weight (daemon.token's clients)
      events_token: ""                    # or events_token_file: the event streams' own credential
                                          # (routers); unset = daemon.token, which every tenant's
                                          # client holds, so any tenant could read every
                                          # namespace's rows and engine hashes
      shm_name: kvbm-g2                   # prefix of the per-session window files in /dev/shm
      lease_s: 10                         # a client silent this long loses its pins
      peers: [tcp://10.0.0.2:5557]        # other nodes' daemons, asked on a local miss
      peer_timeout_s: 0.5
      peer_secret_file: ""                # cluster secret peers prove (0600); unset = no peer ops
      nixl: auto                          # auto | true | false
      max_session_blocks: 0               # busy blocks per client (a quota against hogging G2); 0 = off
      namespace_share: 0.5                # ... and per namespace and per uid, as a share of G2
      reserve_s: 30                       # a reservation not committed by then is rolled back
      pin_s: 300                          # a pin is dropped after this long
      max_sessions_per_uid: 512           # then that uid's idlest empty session makes room
      window_mib: 64                      # per-session staging window clients map (not G2)
      room_wait_s: 2.0                    # a store into a full G2 waits this long for the offloader
      room_stall_s: 0.4                   # ... or this long without a block landing below
      onboard_wait_s: 2.0                 # a load waits this long for its G3/G4 blocks to reach G2
      window_copy_deadline_s: 0.5         # a copy through a client's window may take this + 1 s per
                                          # 128 MiB; past it the request fails window_stalled and the
                                          # session ends (a client stalling its own window)

Overrides: KVBM_DAEMON__TOKEN=..., KVBM_DAEMON__ADDRESS=... (as for every kvbm key);
KVBM_DAEMON__TENANTS__ALICE__TOKEN=..., KVBM_DAEMON__TENANTS__ALICE__SHARE=0.3 (names lowercased).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .tenants import parse_tenants, partition_tiers
from .transport import default_address
from ..config import ConfigError, KVBMConfig, check_keys, load_with, parse_config
from ..tiers.seal import SecretError, read_secret_file


@dataclass
class DaemonConfig:
    address: str = field(default_factory=default_address)  # ipc:// in a 0700 runtime folder
    events: str = "tcp://127.0.0.1:5558"
    events_replay: str = ""  # the events stream's replay ROUTER (events.py); "" = off
    kv_events: str = ""  # vLLM-format KV events (kv_events.py); "" = off
    kv_events_replay: str = ""
    kv_events_buffer: int = 10_000
    metrics: str = "127.0.0.1:9400"
    token: str = ""
    token_file: str = ""
    tenants: dict = field(default_factory=dict)  # name -> tenants.Tenant after from_dict (tenants.py)
    default_weight: float = 1.0  # the default tenant's part of each tier against tenants' weights
    events_token: str = ""  # the event streams' PLAIN password; "" = token (see subscriber_token)
    events_token_file: str = ""
    shm_name: str = "kvbm-g2"
    lease_s: float = 10.0
    peers: list = field(default_factory=list)
    peer_timeout_s: float = 0.5
    peer_secret_file: str = ""  # daemons prove it to each other (peerauth.py); "" = no peer ops
    nixl: Any = "auto"
    max_message_bytes: int = 1 << 20
    max_keys: int = 4096
    max_clients: int = 1024
    max_session_blocks: int = 0  # blocks one client may keep busy (pins, loads, reservations); 0 = no limit
    reserve_s: float = 30.0  # a store or load not committed / released by then is rolled back
    pin_s: float = 300.0  # an explicit pin is dropped after this long (heartbeats or not)
    namespace_share: float = 0.5  # share of G2 one namespace, and one uid, may keep busy
    max_sessions_per_uid: int = 512  # beyond it, that uid's idlest empty session is closed
    window_mib: int = 64  # each session's staging window (the only daemon memory a client maps)
    room_wait_s: float = 2.0  # a store into a full G2 waits at most this for the offloader (onboard.py)
    room_stall_s: float = 0.4  # ... and less once the offloader landed nothing for this long
    window_copy_deadline_s: float = 0.5  # a window copy's time limit: this + bytes / 128 MiB/s (windows.py)
    # a load (or peer lookup) waits at most this for its G3/G4 blocks to come up to G2, then gets
    # the G2 prefix (onboard.py); keep it below the clients' timeout (10 s)
    onboard_wait_s: float = 2.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DaemonConfig":
        data = dict(data or {})
        check_keys(data, [f.name for f in fields(cls)], "daemon.")
        cfg = cls(**data)
        cfg.validate()
        if cfg.token_file and not cfg.token:
            cfg.token = read_token_file(cfg.token_file)
        if cfg.events_token_file and not cfg.events_token:
            cfg.events_token = read_token_file(cfg.events_token_file, "daemon.events_token_file")
        if cfg.events_token and cfg.events_token == cfg.token:
            raise ConfigError("daemon.events_token equals daemon.token; routers need a credential the "
                              "tenants' clients do not hold (or leave events_token unset)")
        cfg.tenants = parse_tenants(cfg.tenants, cfg.namespace_share)
        cfg._check_tenants()
        if cfg.address.startswith("tcp://") and not cfg.authenticated:
            raise ConfigError(
                f"daemon.address {cfg.address!r} is tcp:// without a token: every local user can connect to a "
                f"tcp port (even on loopback; the daemon cannot tell their uids apart), so each could use the "
                f"cache as you; set daemon.token_file (a 0600 file) or KVBM_DAEMON__TOKEN (or daemon.tenants), "
                f"or drop daemon.address for the default ipc:// socket (this user only)")
        for name in ("address", "events", "events_replay", "kv_events", "kv_events_replay"):
            addr = getattr(cfg, name)
            token = cfg.authenticated if name == "address" else cfg.subscriber_token
            if addr and not token and not is_local(addr):
                raise ConfigError(
                    f"daemon.{name} {addr!r} is reachable from other hosts; bind 127.0.0.1 or an ipc:// "
                    f"path, or set daemon.token (or KVBM_DAEMON__TOKEN) so every request is authenticated")
        if cfg.metrics and not is_local("tcp://" + cfg.metrics) and not cfg.token:
            raise ConfigError(f"daemon.metrics {cfg.metrics!r} is not loopback; set daemon.token to expose it")
        if cfg.peer_secret_file:  # checked before anything is created (peering.py reads it again)
            from .peerauth import load_secret

            secret = load_secret(cfg.peer_secret_file)
            if secret == cfg.token.encode():
                raise ConfigError("daemon.peer_secret_file holds the client token; peers need a secret of "
                                  "their own (clients must not be able to act as peers)")
            for t in cfg.tenants.values():
                if secret == t.token.encode():
                    raise ConfigError(f"daemon.peer_secret_file holds {t.config_key}'s token; peers "
                                      f"need a secret of their own (tenants must not be able to act as peers)")
        return cfg

    @property
    def authenticated(self) -> bool:
        """Requests must carry a token: daemon.token or a tenant's is configured."""
        return bool(self.token or self.tenants)

    def _check_tenants(self) -> None:
        """Tenant tokens are no one else's credential; what tenants need is configured."""
        for t in self.tenants.values():
            for other, what in ((self.token, "daemon.token"), (self.events_token, "daemon.events_token")):
                if other and t.token == other:
                    raise ConfigError(f"{t.config_key}.token equals {what}; a tenant's token must be "
                                      f"its own (holding {what} is more than being {t.key or t.name})")
        if not self.tenants:
            return
        own = [t for t in self.tenants.values() if t.events or t.kv_events]
        for t in own:
            for stream in ("events", "kv_events"):
                if getattr(t, stream) and not getattr(self, stream):
                    raise ConfigError(f"{t.config_key}.{stream} needs daemon.{stream} (the stream it is a part "
                                      f"of; it may be an ipc:// path only routers reach)")
        seen: dict[str, str] = {}  # one address, one socket (a tcp port 0 is a new port each time)
        names = ("events", "events_replay", "kv_events", "kv_events_replay")
        for where, addr in [(f"daemon.{n}", getattr(self, n)) for n in names] + \
                [(f"{t.config_key}.{n}", getattr(t, n)) for t in own for n in names]:
            if addr and not addr.endswith(":0"):
                if addr in seen:
                    raise ConfigError(f"{where} {addr!r} is {seen[addr]}'s address too; give each stream its own")
                seen[addr] = where
        streams = [n for n in ("events", "kv_events") if getattr(self, n)]
        if streams and not self.subscriber_token:
            raise ConfigError(f"daemon.{streams[0]} is on and daemon.tenants is set, but the event streams have "
                              f"no credential: set daemon.events_token_file (the routers' credential) or "
                              f"daemon.token, or daemon.{streams[0]}: '' (else any local user reads every "
                              f"tenant's rows)")
        if (self.peers or self.peer_secret_file) and not self.token:
            raise ConfigError("daemon.peers / daemon.peer_secret_file with daemon.tenants need daemon.token: "
                              "peer daemons present it on every request (the same on every node)")

    @property
    def subscriber_token(self) -> str:
        """The PLAIN password of the event sockets (events, kv_events, kv_events_replay):
        events_token when set, else the client token."""
        return self.events_token or self.token

    def validate(self) -> None:
        for name in ("address", "events", "events_replay", "kv_events", "kv_events_replay", "metrics", "token",
                     "token_file",
                     "events_token", "events_token_file", "shm_name", "peer_secret_file"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"daemon.{name} must be a string, got {getattr(self, name)!r}")
        if not self.address.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"daemon.address must be tcp://HOST:PORT or ipc://PATH, got {self.address!r}")
        if self.events and not self.events.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"daemon.events must be tcp://HOST:PORT, ipc://PATH or '', got {self.events!r}")
        for name in ("events_replay", "kv_events", "kv_events_replay"):
            addr = getattr(self, name)
            if addr and not addr.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"daemon.{name} must be tcp://HOST:PORT, ipc://PATH or '', got {addr!r}")
        if self.events_replay and not self.events:
            raise ConfigError("daemon.events_replay needs daemon.events (the stream it replays)")
        if self.kv_events_replay and not self.kv_events:
            raise ConfigError("daemon.kv_events_replay needs daemon.kv_events (the stream it replays)")
        if self.metrics and ":" not in self.metrics:
            raise ConfigError(f"daemon.metrics must be HOST:PORT or '', got {self.metrics!r}")
        for name in ("lease_s", "peer_timeout_s", "reserve_s", "pin_s", "room_wait_s", "room_stall_s",
                     "onboard_wait_s", "window_copy_deadline_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"daemon.{name} must be a positive number of seconds, got {v!r}")
        v = self.default_weight
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ConfigError(f"daemon.default_weight must be a number >= 0 (the default tenant's part of each "
                              f"tier against daemon.tenants.<name>.weight; 0: none guaranteed), got {v!r}")
        v = self.namespace_share
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ConfigError(f"daemon.namespace_share must be a fraction in (0, 1], got {v!r}")
        for name in ("max_message_bytes", "max_keys", "max_clients", "max_session_blocks", "max_sessions_per_uid",
                     "window_mib", "kv_events_buffer"):
            v = getattr(self, name)
            least = 0 if name == "max_session_blocks" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"daemon.{name} must be an integer >= {least}, got {v!r}")
        if not isinstance(self.peers, list) or not all(
                isinstance(p, str) and p.startswith(("tcp://", "ipc://")) for p in self.peers):
            raise ConfigError(f"daemon.peers must be a list of tcp://HOST:PORT addresses, got {self.peers!r}")
        if self.nixl not in ("auto", True, False):
            raise ConfigError(f"daemon.nixl must be auto, true or false, got {self.nixl!r}")


def read_token_file(path: str, key: str = "daemon.token_file") -> str:
    """The token in `path`; refused when group or others may read or write the file (a token
    others can read is theirs too; one they can write lets them choose it)."""
    try:
        data = read_secret_file(path, key)
    except SecretError as exc:
        raise ConfigError(str(exc)) from None
    try:
        token = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not text; write the token as one line") from None
    if not token:
        raise ConfigError(f"{key}: {path} is empty; write the token in it (one line)")
    return token


def is_local(address: str) -> bool:
    """True for ipc:// paths and loopback tcp:// hosts (127.0.0.0/8, ::1, localhost)."""
    if address.startswith("ipc://"):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name or `*`: reachable from elsewhere
        return False


def load_daemon_config(path: str | os.PathLike | None = None,
                       env: Mapping[str, str] | None = None) -> tuple[KVBMConfig, DaemonConfig]:
    """kvbm.yaml -> (manager config, daemon config); KVBM_... overrides apply to both."""
    def build(data: dict[str, Any]) -> tuple[KVBMConfig, DaemonConfig]:
        cfg = parse_config(data)  # the same checks as load_config (one path)
        dcfg = DaemonConfig.from_dict(cfg.daemon)
        return partition_tiers(cfg, dcfg), dcfg  # tenants: each tier's policy per tenant (tenants.py)

    return load_with(build, path, env)
