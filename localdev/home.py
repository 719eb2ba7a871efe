"""Where local development keeps its downloads and data: the Nexus home.

Why: the broker's jars (~100 MB) and its data must live somewhere writable that an
installed package can find, not next to the source. The home is, first found:

1. ``$NEXUS_HOME`` (the Makefile sets it to ``<checkout>/.cache``, so a checkout keeps
   its git-ignored cache where it always was);
2. ``$XDG_CACHE_HOME/nexus`` (when it is an absolute path, as the XDG spec asks);
3. ``~/.cache/nexus``.

Inside it: ``kafka/<version>/libs`` (the broker jars) and ``kafka-data/<port>`` (a dev
broker's data). Pure path arithmetic: nothing here creates a directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

HOME_VARIABLE = "NEXUS_HOME"


def nexus_home(environ: Mapping[str, str] | None = None) -> Path:
    """The Nexus home for ``environ`` (default: the process environment); empty values are unset."""
    env = os.environ if environ is None else environ
    explicit = env.get(HOME_VARIABLE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid, ignore it
        return Path(xdg) / "nexus"
    user_home = env.get("HOME")
    return (Path(user_home) if user_home else Path.home()) / ".cache" / "nexus"


def kafka_libs_dir(version: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the jars of Kafka ``version`` are cached: ``<home>/kafka/<version>/libs``."""
    return nexus_home(environ) / "kafka" / version / "libs"


def kafka_data_dir(port: int, environ: Mapping[str, str] | None = None) -> Path:
    """A dev broker's data dir, one per port so two brokers never share logs: ``<home>/kafka-data/<port>``."""
    return nexus_home(environ) / "kafka-data" / str(port)
