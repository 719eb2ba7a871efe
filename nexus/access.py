"""Who may call: API keys checked against bearer tokens, and which models and records a key may reach.

Pure and I/O-free, shared by the gateway and the websocket bridge (``docs/security.md``).
A token is never stored or logged: it is hashed at once and compared, in constant time,
with the SHA-256 digests of the configured keys. Errors carry a reason safe to show and log,
never the token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable

from nexus.settings import AccessSettings, ApiKey
from nexus.errors import NexusError

BEARER = "bearer"


class AccessError(NexusError):
    """A call that may not go ahead; ``status`` is the HTTP status to answer with."""

    status = 403

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthenticated(AccessError):
    """No token, or a token that is no configured key's: 401."""

    status = 401

    def __init__(self, reason: str, *, invalid_token: bool) -> None:
        super().__init__(reason)
        self.invalid_token = invalid_token

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value (RFC 6750)."""
        return 'Bearer realm="nexus", error="invalid_token"' if self.invalid_token else 'Bearer realm="nexus"'


class Forbidden(AccessError):
    """A valid key asking for a model outside its list: 403."""

    status = 403


def token_sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == BEARER and token else None


class AccessPolicy:
    """Decides on tokens and keys; with no keys configured everything is open and no key is asked for."""

    def __init__(self, settings: AccessSettings) -> None:
        self._keys = settings.keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, token: str | None) -> ApiKey | None:
        """The key of ``token``; None when access is open. Raises :class:`Unauthenticated`."""
        if not self._keys:
            return None
        if token is None:
            raise Unauthenticated(
                "an API key is required: send the header 'Authorization: Bearer <token>'", invalid_token=False
            )
        digest = token_sha256(token)
        found: ApiKey | None = None
        for key in self._keys:  # every key is compared, so the time does not tell which one matched
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is None:
            raise Unauthenticated("the API key is not valid", invalid_token=True)
        return found

    def authenticate_header(self, authorization: str | None) -> ApiKey | None:
        """:meth:`authenticate` with the token of an ``Authorization`` header."""
        if self._keys and authorization and bearer_token(authorization) is None:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'", invalid_token=True)
        return self.authenticate(bearer_token(authorization))

    @staticmethod
    def may_use(key: ApiKey | None, model_id: str) -> bool:
        return key is None or not key.models or model_id in key.models

    def authorize(self, key: ApiKey | None, model_id: str) -> None:
        """Raise :class:`Forbidden` when ``key`` may not use ``model_id``."""
        if not self.may_use(key, model_id):
            assert key is not None
            raise Forbidden(f"API key {key.name!r} may not use model {model_id!r}; it may use {list(key.models)}")

    def models_for(self, key: ApiKey | None, model_ids: Iterable[str]) -> list[str]:
        """The models of ``model_ids`` that ``key`` may use, in their order."""
        return [m for m in model_ids if self.may_use(key, m)]

    @staticmethod
    def owner(key: ApiKey | None) -> str | None:
        """What a request submitted with ``key`` records as its ``key_name``."""
        return None if key is None else key.name

    @staticmethod
    def may_see(key: ApiKey | None, owner: str | None) -> bool:
        """Whether a client of ``key`` may receive a record submitted with the key named ``owner``.

        Open access (no key) sees everything; a key sees only its own records, never those of
        other keys nor those without an owner (submitted straight to Kafka, or before keys existed).
        """
        return key is None or owner == key.name

    @staticmethod
    def may_subscribe(key: ApiKey | None, owners: Collection[str | None]) -> bool:
        """A session whose known records all belong to other keys is refused; unknown sessions are not."""
        return key is None or not owners or key.name in owners
