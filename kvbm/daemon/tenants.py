"""Tenants of the daemon: who a request's token says it is, and what that tenant may reach.

    Tenant(name, token, share)              one entry of `daemon.tenants`
    parse_tenants(raw, default_share)       the config mapping -> {name: Tenant}, one-line errors
    TenantIndex(token, tenants)             token -> tenant name, in time independent of the match
    TenantIndex.identify(auth) -> str|None  "" for daemon.token (the default tenant), a name, or None

    daemon:
      token_file: /etc/kvbm/operator.token      # the default tenant: the operator's own engines
      tenants:
        alice: {token_file: /etc/kvbm/alice.token, share: 0.3}
        bob:   {token_file: /etc/kvbm/bob.token}  # share: daemon.namespace_share

A tenant is bound to its namespaces: the daemon derives a named tenant's namespace ids with its
name mixed in (leases.namespace_of), so alice naming bob's model and salt still reaches only
alice's blocks. Its sessions are its own (a request carrying another token cannot use them) and
its busy G2 blocks (pins, reservations) are bounded by its own share, as a uid's are on ipc://.
daemon.token keeps its meaning: the default tenant, whose namespace ids are those of kvbm before
tenants (G3 / G4 blocks written then are still found), bounded as one uid on tcp://.

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
MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")  # lowercase: env overrides lowercase key names


@dataclass(frozen=True)
class Tenant:
    name: str
    token: str = field(repr=False)  # never in a log line or an error
    share: float = 0.5  # fraction of G2 its sessions may keep busy, all together


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
        check_keys(entry, ["token", "token_file", "share"], key + ".")
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
        by_token[token] = name
        out[name] = Tenant(name, token, float(share))
    return out


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
