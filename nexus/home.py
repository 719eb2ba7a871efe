"""The Nexus home: the one user-level directory where Nexus keeps state on this machine.

Why: an installed package must never write next to its source (site-packages may be
read-only) nor into whatever directory it was started from. The home is, first found:

1. ``$NEXUS_HOME`` (the Makefile sets it to ``<checkout>/.cache``, so a checkout keeps
   its git-ignored cache where it always was; the Docker image sets ``/app/.cache``);
2. ``$XDG_CACHE_HOME/nexus`` (when it is an absolute path, as the XDG spec asks);
3. ``~/.cache/nexus``.

Here is what the running roles keep there (the worker's table state, ``faust/<app id>``);
:mod:`localdev.home` lays out the developer tooling's part (broker jars and data, Ollama).
Pure path arithmetic: nothing here creates a directory.
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


def worker_data_dir(app_id: str, environ: Mapping[str, str] | None = None) -> Path:
    """A worker's Faust data (its tables' local state), one per app id: ``<home>/faust/<app_id>``."""
    return nexus_home(environ) / "faust" / app_id
