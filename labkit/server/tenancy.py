"""Who is asking: API keys, the tenant behind each, and the prefix-cache salt derived from it.

    Authorization: Bearer <key>  ->  tenant = the key's entry    salt = HMAC-SHA256(server secret, key)

A shared prefix cache answers faster when someone else already sent the same prefix, and that is a
timing side channel (notebook 06; arXiv 2411.18191). vLLM's fix is a per-request ``cache_salt`` mixed
into the first block's hash (vLLM PR #17045, documented in PR #39082). The salt must come from the
server's notion of the tenant, never from the request: an attacker who may send any salt sends the
victim's and has the timing signal back (the point of vLLM PR #53347). So here the salt is derived from
the API key the server authenticated, with a secret the client never sees, and a request that carries
its own ``cache_salt`` is refused (:mod:`labkit.server.protocol`).

Without ``--api-key`` the server has one anonymous tenant (salt None: one shared cache); it then binds
only to the loopback interface, so nobody else can reach it (``check_bind``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets

from labkit.server.protocol import APIError

LOOPBACK_NAMES = ("localhost",)


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str  # a short, non-secret name for logs: "tenant-" + 8 hex digits of the key's hash
    cache_salt: str | None


class Tenants:
    """The API keys this server accepts; each key is one tenant with its own prefix-cache salt."""

    def __init__(self, api_keys: list[str] | tuple[str, ...] = (), secret: bytes | None = None):
        keys = list(api_keys)
        for k in keys:
            if not isinstance(k, str) or len(k) < 8 or any(c.isspace() for c in k):
                raise ValueError(f"API key {k[:4] + '...' if isinstance(k, str) else k!r} is not usable: a key is a "
                                 "string of at least 8 characters without spaces")
        if len(set(keys)) != len(keys):
            raise ValueError("the same API key is given twice; give each tenant its own key")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._tenants = {k: Tenant("tenant-" + hashlib.sha256(k.encode()).hexdigest()[:8], self._salt(k))
                         for k in keys}

    @property
    def required(self) -> bool:
        return bool(self._tenants)

    def _salt(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant behind an ``Authorization`` header; 401 if a key is required and this one is not valid."""
        if not self.required:
            return Tenant("anonymous", None)
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")
        key = authorization[len("Bearer "):].strip()
        for known, tenant in self._tenants.items():  # compare_digest: no timing hint of how much matched
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        raise APIError(401, "the API key is not valid for this server", type="invalid_request_error",
                       code="invalid_api_key")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tenants: Tenants) -> None:
    """Listening beyond this machine is allowed only with API keys: an open model server is anyone's GPU."""
    if not is_loopback(host) and not tenants.required:
        raise ValueError(f"refusing to listen on {host!r} without an API key: anyone who can reach it could use the "
                         "server. Pass --api-key KEY (one per tenant), or keep the default --host 127.0.0.1.")
