"""``OLLAMA_HOST`` read the way Ollama's official clients read it.

Operators set ``OLLAMA_HOST`` once for every Ollama tool on a machine, so Nexus must give it
the meaning the official ``ollama`` Python client (``ollama._client._parse_host``) gives it:

==============================  ==================================
``OLLAMA_HOST``                 URL
==============================  ==================================
(unset or empty)                ``http://127.0.0.1:11434``
``0.0.0.0``                     ``http://0.0.0.0:11434``
``gpu1`` / ``gpu1:8000``        ``http://gpu1:11434`` / ``http://gpu1:8000``
``:8000``                       ``http://127.0.0.1:8000``
``http://gpu1``                 ``http://gpu1:80`` (the scheme's port)
``https://gpu1``                ``https://gpu1:443``
``[::1]``                       ``http://[::1]:11434``
``gpu1:8000/ollama/``           ``http://gpu1:8000/ollama``
==============================  ==================================

Like the Go server and CLI (``envconfig.Var``), surrounding spaces and quotes are ignored.
A port that is not a number from 0 to 65535, or a broken ``[IPv6]`` address, is refused (the
Python client raises on them too). :func:`is_local` and :func:`connect_url` say whether such a
URL is this machine and how to reach it (a listen address like ``0.0.0.0`` is not one to dial).
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from nexus.errors import NexusError

DEFAULT_PORT = 11434
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
_SCHEME_PORTS = {"http": 80, "https": 443}
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class OllamaHostError(NexusError, ValueError):
    """An ``OLLAMA_HOST`` value (or an endpoint URL read like one) that no client could use."""


def parse_ollama_host(value: str | None) -> str:
    """The base URL ``value`` names, as ``ollama._client._parse_host`` gives it: scheme, host and
    port always present, no trailing slash."""
    text = (value or "").strip().strip("\"'")
    port = DEFAULT_PORT
    scheme, _, hostport = text.partition("://")
    if not hostport:
        scheme, hostport = "http", text
    else:
        port = _SCHEME_PORTS.get(scheme, port)
    try:
        split = urllib.parse.urlsplit(f"{scheme}://{hostport}")
        host = split.hostname or "127.0.0.1"
        port = split.port or port
    except ValueError as exc:  # "Port out of range", "Invalid IPv6 URL", a port that is not a number
        raise OllamaHostError(f"{value!r} is not a host[:port] Ollama's clients accept: {exc}") from None
    if _is_ipv6(host):
        host = f"[{host}]"
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}/{path}" if path else f"{scheme}://{host}:{port}"


def is_local(url: str) -> bool:
    """Whether ``url``'s host is this machine: a loopback or unspecified address, or localhost.

    ``OLLAMA_HOST=0.0.0.0`` (the server listening on every interface) is common on servers;
    for ``nexus up`` it means "an Ollama on this machine", as it does for ``ollama serve``.
    """
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def connect_url(url: str) -> str:
    """``url`` with an unspecified address (``0.0.0.0``, ``[::]``) replaced by the loopback one,
    which a client can dial everywhere; any other URL unchanged."""
    split = urllib.parse.urlsplit(url)
    host = split.hostname or ""
    if not _is_ipv6(host) and host != "0.0.0.0":
        return url
    address = ipaddress.ip_address(host)
    if not address.is_unspecified:
        return url
    loopback = "127.0.0.1" if address.version == 4 else "[::1]"
    netloc = f"{loopback}:{split.port}" if split.port else loopback
    return urllib.parse.urlunsplit(split._replace(netloc=netloc))


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
