"""Tenants of the daemon: who a request's token says it is, and what that tenant may reach.

    Tenant(name, token, share)              one entry of `daemon.tenants`
    parse_tenants(raw, default_share)       the config mapping -> {name: Tenant}, one-line errors
    TenantIndex(token, tenants)             token -> tenant name, in time independent of the match
    TenantIndex.identify(auth) -> str|None  "" for daemon.token (the default tenant), a name, or None
    partition_tiers(config, dcfg)           every shared tier's policy kept per tenant (policies/partition.py)
    store_hints(retention, owner)           a store's hints: its priorities, and its owner when partitioned

    daemon:
      token_file: /etc/kvbm/operator.token      # the default tenant: the operator's own engines
      tenants:
        alice: {token_file: /etc/kvbm/alice.token, share: 0.3, weight: 2}
        bob:   {token_file: /etc/kvbm/bob.token}  # share: daemon.namespace_share; weight: 1

A tenant is bound to its namespaces: the daemon derives a named tenant's namespace ids with its
name mixed in (leases.namespace_of), so alice naming bob's model and salt still reaches only
alice's blocks. Its sessions are its own (a request carrying another token cannot use them) and
its busy G2 blocks (pins, reservations) are bounded by its own share, as a uid's are on ipc://.
daemon.token keeps its meaning: the default tenant, whose namespace ids are those of kvbm before
tenants (G3 / G4 blocks written then are still found), bounded as one uid on tcp://.

A name given to someone new: the namespace ids mix in the tenant's identity, which is its name,
so a new owner of the name "alice" would reach the old owner's G3 / G4 blocks (they outlive
restarts and config changes). Its token is no identity (rotating it must keep the blocks). So the
owner of a name is the operator's word: `generation` (default 0), a number the operator bumps when
the name goes to a new owner; from 1 on the identity is "<name>~<generation>" (identity()): other
namespace ids, the old owner's blocks out of reach (misses; evicted by the policies in time).
Rotating a token keeps the generation and the blocks. Example:
        alice: {token_file: /etc/kvbm/alice-new-owner.token, generation: 1}

No tenant starves another's blocks out of a shared tier (partition_tiers): with tenants configured,
each tier (G2, G3, G4) keeps one instance of its configured policy per tenant, and a victim comes
from the tenant holding the most blocks per unit of `weight` (default 1; daemon.default_weight for
the default tenant), chosen by that tenant's own policy. So each tenant keeps at least its weighted
share of what the tier holds (weight over the weights of the tenants holding blocks: equal weights,
equal parts) whatever another stores, and a share nobody uses is lent to who stores (a lone tenant
fills the tier, and gives the room back first once another stores). `share` is another bound: the
G2 blocks a tenant may keep busy (pins, reservations), which no eviction touches. A block whose
owner the daemon does not know (recovered from G3/G4 at a restart, pulled from a peer) has weight
0: such blocks go before any tenant's.

Identity without a timing oracle: each configured token is stored as a keyed hash (a random key
per process) and a request's token is hashed with the same key and looked up; the lookup's time
depends on digests nobody outside can compute, not on how much of a token matched.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import ConfigError, check_keys

DEFAULT_TENANT = ""  # daemon.token's tenant (shown as "default")
OWN_STREAMS = ("events", "events_replay", "kv_events", "kv_events_replay")  # a tenant's own event sockets
MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")  # lowercase: env overrides lowercase key names


@dataclass(frozen=True)
class Tenant:
    name: str  # who the daemon says it is: its key, and "~<generation>" past generation 0 (see below)
    token: str = field(repr=False)  # never in a log line or an error
    share: float = 0.5  # fraction of G2 its sessions may keep busy, all together
    weight: float = 1.0  # its part of each shared tier, against the other tenants' weights (partition_tiers)
    generation: int = 0  # the owner of the name: 0 = the first; a new owner of the name takes the next
    key: str = ""  # its name in daemon.tenants
    events: str = ""  # its own `events` stream: its namespaces' rows only, its token as PLAIN password
    events_replay: str = ""  # ... and that stream's replay ROUTER
    kv_events: str = ""  # its own vLLM-format stream (kv_events.py), the same way
    kv_events_replay: str = ""

    @property
    def config_key(self) -> str:
        return f"daemon.tenants.{self.key or self.name}"


def identity(name: str, generation: int) -> str:
    """A tenant's identity (its namespace ids mix it in, leases.namespace_of): its name, and from
    generation 1 on "<name>~<generation>" ('~' is no name character: never another tenant's name).
    Generation 0 keeps the ids of kvbm before generations (blocks written then are still found)."""
    return name if not generation else f"{name}~{generation}"


def parse_tenants(raw: Any, default_share: float) -> dict[str, Tenant]:
    """`daemon.tenants` -> {name: Tenant}; ConfigError naming the bad key. Token files are read
    here (0600, config.read_token_file); tokens must differ between tenants."""
    from .config import read_token_file

    if raw is None or raw == {}:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"daemon.tenants must be a mapping of tenant name -> {{token_file, share}}, "
                          f"got a {type(raw).__name__}")
    out: dict[str, Tenant] = {}
    by_token: dict[str, str] = {}
    for name, entry in raw.items():
        key = f"daemon.tenants.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"daemon.tenants: tenant name {name!r} must be 1-64 characters of a-z, 0-9, '_', "
                              f"'.', '-' (lowercase: KVBM_DAEMON__TENANTS__<NAME>__... lowercases it)")
        if name == "default":
            raise ConfigError("daemon.tenants.default: the name 'default' is daemon.token's tenant; "
                              "name this tenant otherwise")
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key} must be a mapping with token_file (or token) and optional share, got a "
                              f"{type(entry).__name__} (values are not echoed: they may be tokens)")
        check_keys(entry, ["token", "token_file", "share", "weight", "generation", *OWN_STREAMS], key + ".")
        token, token_file = entry.get("token", ""), entry.get("token_file", "")
        for what, v in (("token", token), ("token_file", token_file)):
            if not isinstance(v, str):
                raise ConfigError(f"{key}.{what} must be a string, got {type(v).__name__} (quote it in YAML)")
        if not token and token_file:
            token = read_token_file(token_file, f"{key}.token_file")
        if not token:
            raise ConfigError(f"{key} has no token; set {key}.token_file (a 0600 file) or "
                              f"KVBM_DAEMON__TENANTS__{name.upper()}__TOKEN")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{key}.token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                              f"(e.g. `openssl rand -hex 16`)")
        if token in by_token:
            raise ConfigError(f"{key}.token equals daemon.tenants.{by_token[token]}.token; each tenant needs "
                              f"its own token (one token is one tenant)")
        share = entry.get("share", default_share)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"{key}.share must be a fraction of G2 in (0, 1], got {share!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ConfigError(f"{key}.weight must be a number >= 0 (its part of each tier against the other "
                              f"tenants' weights; 0: no guaranteed part), got {weight!r}")
        generation = entry.get("generation", 0)
        if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation < 2**31:
            raise ConfigError(f"{key}.generation must be an integer >= 0 (bump it when the name goes to a new "
                              f"owner: the old owner's G3/G4 blocks stay out of reach), got {generation!r}")
        streams = {}
        for what in OWN_STREAMS:
            addr = entry.get(what, "")
            if not isinstance(addr, str) or (addr and not addr.startswith(("tcp://", "ipc://"))):
                raise ConfigError(f"{key}.{what} must be tcp://HOST:PORT, ipc://PATH or '', got {addr!r}")
            streams[what] = addr
        for stream in ("events", "kv_events"):
            if streams[stream + "_replay"] and not streams[stream]:
                raise ConfigError(f"{key}.{stream}_replay needs {key}.{stream} (the stream it replays)")
        by_token[token] = name
        out[name] = Tenant(identity(name, generation), token, float(share), float(weight), generation, name,
                           **streams)
    return out


def partition_tiers(config: Any, dcfg: Any) -> Any:
    """config with every tier's eviction policy wrapped in `partition` (policies/partition.py): one
    instance of it per tenant, weights from daemon.tenants.<name>.weight and daemon.default_weight,
    blocks of no known owner (None) weight 0. Unchanged without named tenants, or when wrapped."""
    import dataclasses

    from ..config import PolicySpec

    if not dcfg.tenants:
        return config
    weights = {DEFAULT_TENANT: float(dcfg.default_weight), **{t.name: t.weight for t in dcfg.tenants.values()}}
    tiers = []
    for t in config.tiers:
        ev = t.eviction
        if ev is not None and ev.name != "partition":
            ev = PolicySpec("partition", {"policy": ev.name, "options": dict(ev.options), "weights": weights,
                                          "other_weight": 0.0})
        tiers.append(dataclasses.replace(t, eviction=ev))
    return dataclasses.replace(config, tiers=tiers)


def store_hints(retention: Any, owner: str | None) -> Any:
    """The hints of a store request: per-block retention (priority, duration) when the client sent
    it, and the owning tenant when the tiers are partitioned (owner not None); None when neither."""
    from ..policies.base import Hints

    if retention is not None:
        return [Hints(priority=p, duration=d, owner=owner) for p, d in retention]
    return None if owner is None else Hints(owner=owner)


class TenantIndex:
    """Request token -> tenant name. Tokens are kept as keyed hashes only (see the docstring)."""

    def __init__(self, token: str, tenants: Mapping[str, Tenant]) -> None:
        self._key = os.urandom(32)
        self._by_mac: dict[bytes, str] = {}
        if token:
            self._by_mac[self._mac(token)] = DEFAULT_TENANT
        for t in tenants.values():
            self._by_mac[self._mac(t.token)] = t.name

    @property
    def required(self) -> bool:
        """A token is configured: every request must present a known one."""
        return bool(self._by_mac)

    def _mac(self, token: str) -> bytes:
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=32, key=self._key).digest()

    def identify(self, auth: Any) -> str | None:
        """The tenant whose token `auth` is; "" for daemon.token; None for anything else."""
        if not isinstance(auth, str):
            return None
        return self._by_mac.get(self._mac(auth))


def label(tenant: str) -> str:
    return tenant or "default"


# ---------------------------------------------------------------- per-tenant stats

PER_TENANT = ("lookup_blocks", "prefix_hit_blocks", "client_store_bytes", "client_load_bytes", "pinned_blocks")


class TenantCounters(dict):
    """The daemon's counters (a dict, as before), and beside them the PER_TENANT ones of each
    tenant: an increment counts for `tenant_of()` (the tenant of the request being handled, or of
    a deferred reply; None: node-wide only)."""

    def __init__(self, base: Mapping[str, Any], tenant_of: Any) -> None:
        super().__init__(base)
        self.tenant_of = tenant_of
        self.by_tenant: dict[str, dict[str, int]] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        if key in PER_TENANT:
            tenant = self.tenant_of()
            if tenant is not None:
                row = self.by_tenant.get(tenant)
                if row is None:
                    row = self.by_tenant[tenant] = dict.fromkeys(PER_TENANT, 0)
                row[key] += value - self.get(key, 0)
        super().__setitem__(key, value)


def tenant_stats(daemon: Any) -> dict[str, dict[str, Any]]:
    """{tenant label: what that tenant may see of itself}: its requests' counters (lookups, hits,
    blocks stored, loaded, pinned), its blocks per tier (rows told on its namespaces, events.py),
    its sessions and its busy G2 blocks against its bound. Every configured tenant has a row, the
    default tenant ("default": daemon.token, or no token) too."""
    nb = daemon.nbytes
    if not daemon.dcfg.tenants:  # no named tenant: the default tenant is the node (nothing counted apart)
        return {label(DEFAULT_TENANT): _node_row(daemon)}
    out: dict[str, dict[str, Any]] = {}
    blocks: dict[str, dict[str, int]] = {}
    for ns, counts in daemon._ns_blocks.items():
        tenant = daemon._ns_tenant.get(ns)
        if tenant is None:  # a recovered namespace none of whose clients came back yet
            continue
        row = blocks.setdefault(tenant, {})
        for tier, n in counts.items():
            row[tier] = row.get(tier, 0) + n
    sessions: dict[str, int] = {}
    for s in daemon.sessions.by_id.values():
        if s.namespace != b"peer":
            sessions[s.tenant] = sessions.get(s.tenant, 0) + 1
    for name in [DEFAULT_TENANT, *(t.name for t in daemon.dcfg.tenants.values())]:
        c = daemon.counters.by_tenant.get(name) or dict.fromkeys(PER_TENANT, 0)
        bound = daemon.tenant_blocks.get(name) if name else daemon.share_blocks
        busy = daemon.sessions.busy_by_owner.get(name, 0) if name else sum(
            s.busy for s in daemon.sessions.by_id.values() if not s.tenant and s.namespace != b"peer")
        out[label(name)] = {
            "lookup_blocks": c["lookup_blocks"], "prefix_hit_blocks": c["prefix_hit_blocks"],
            "prefix_hit_ratio": round(c["prefix_hit_blocks"] / c["lookup_blocks"], 6) if c["lookup_blocks"] else 0.0,
            "stored_blocks": c["client_store_bytes"] // nb, "loaded_blocks": c["client_load_bytes"] // nb,
            "pinned_blocks": c["pinned_blocks"],
            "blocks": {t.name: blocks.get(name, {}).get(t.name, 0) for t in daemon.manager.tiers},
            "sessions": sessions.get(name, 0), "busy_blocks": busy, "busy_bound": bound,
            "busy_share": round(busy / bound, 6) if bound else 0.0,
        }
    return out


def _node_row(daemon: Any) -> dict[str, Any]:
    """The default tenant's row when it is the only tenant: the node's own figures."""
    c, nb = daemon.counters, daemon.nbytes
    ss = [s for s in daemon.sessions.by_id.values() if s.namespace != b"peer"]
    busy, bound = sum(s.busy for s in ss), daemon.share_blocks
    return {"lookup_blocks": c["lookup_blocks"], "prefix_hit_blocks": c["prefix_hit_blocks"],
            "prefix_hit_ratio": round(c["prefix_hit_blocks"] / c["lookup_blocks"], 6) if c["lookup_blocks"] else 0.0,
            "stored_blocks": c["client_store_bytes"] // nb, "loaded_blocks": c["client_load_bytes"] // nb,
            "pinned_blocks": c["pinned_blocks"], "blocks": {t.name: len(t.ready) for t in daemon.manager.tiers},
            "sessions": len(ss), "busy_blocks": busy, "busy_bound": bound,
            "busy_share": round(busy / bound, 6) if bound else 0.0}
