"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for dev and tests.

Why: Nexus needs a genuine broker (transactions, consumer groups, acks=all) without
Docker or a tarball download. The broker jars are fetched once from Maven Central
with ``mvn`` using the pinned ``kafka_pom.xml`` shipped with this package, cached under
``<nexus home>/kafka/<version>/libs`` (see :mod:`localdev.home`: ``$NEXUS_HOME``, else
``$XDG_CACHE_HOME/nexus``, else ``~/.cache/nexus``), and the broker runs as a ``java``
subprocess.

Typical use::

    with LocalKafka(port=free_port(), data_dir=tmp) as kafka:
        ...  # kafka.bootstrap == "127.0.0.1:<port>"
"""

from __future__ import annotations

import atexit
import base64
import errno
import importlib.resources
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType

from localdev import home
from localdev.metadata import broker_ids
from localdev.progress import Progress, run_reporting
from nexus.errors import NexusError

KAFKA_VERSION = "3.9.1"
MIN_JAVA_MAJOR = 11  # Kafka 3.9 brokers need Java 11+

POM_RESOURCE = "kafka_pom.xml"  # package data of ``localdev``: found in a checkout and in a wheel
_MARKER_NAME = ".fetch-complete"
_LOG_TAIL_LINES = 40
_PROGRESS_EVERY_S = 10.0


_LOG4J_PROPERTIES = """\
# Written by localdev.broker: quiet console, WARN+ plus the broker lifecycle lines.
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
"""


class LocalKafkaError(NexusError):
    """The local broker could not be fetched, started or reached; the message says what to do.

    Not aiokafka's ``KafkaError``: this one is about the dev broker that :mod:`localdev` runs.
    """


KafkaError = LocalKafkaError  # the old name, kept for callers that catch it


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now (the OS picks it), for tests and controllers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def default_libs_dir() -> Path:
    """Where the jars are cached unless told otherwise: ``<nexus home>/kafka/<version>/libs``."""
    return home.kafka_libs_dir(KAFKA_VERSION)


def default_data_dir(port: int) -> Path:
    """Per-port data dir under the Nexus home (``<home>/kafka-data/<port>``), so two dev brokers
    never share logs."""
    return home.kafka_data_dir(port)


def kafka_pom() -> str:
    """The pinned Maven POM that lists the broker's runtime jars, read as package data."""
    return importlib.resources.files("localdev").joinpath(POM_RESOURCE).read_text(encoding="utf-8")


def _port_in_use(host: str, port: int) -> bool:
    """True if something listens on host:port (SO_REUSEADDR mirrors Java, so TIME_WAIT is ignored)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _tail(path: Path, start: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    """Last lines of a log written since byte offset ``start`` (for error messages)."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log output)"
    kept = data.strip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no log output)"


_SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
_JAAS = {
    "SCRAM": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
}


def _make_certificates(tls_dir: Path, host: str) -> None:
    """A throwaway CA (``ca.pem``), a server certificate it signed for ``host`` and localhost,
    and a client certificate (``client.crt``, ``client.key``) for mutual TLS.

    Written once per data dir with the ``openssl`` CLI: ``server.pem`` holds the key and
    the certificate, the PEM keystore Kafka reads (``ssl.keystore.type=PEM``).
    """
    if (tls_dir / "server.pem").exists():
        return
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LocalKafkaError("openssl not found: install it (e.g. `apt-get install openssl`) to run a TLS listener")
    tls_dir.mkdir(parents=True, exist_ok=True)
    san = f"DNS:localhost,IP:{host}" if re.fullmatch(r"[\d.]+", host) else f"DNS:localhost,DNS:{host}"
    (tls_dir / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    (tls_dir / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=nexus-localkafka-ca",
         "-keyout", "ca.key", "-out", "ca.pem"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}", "-keyout", "server.key",
         "-out", "server.csr"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "3650", "-extfile", "server.ext", "-out", "server.crt"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=nexus-localkafka-client", "-keyout", "client.key",
         "-out", "client.csr"],
        ["x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "3650", "-extfile", "client.ext", "-out", "client.crt"],
    ]
    for args in steps:
        proc = subprocess.run([openssl, *args], cwd=tls_dir, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LocalKafkaError(f"openssl {args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    (tls_dir / "server.pem").write_text((tls_dir / "server.key").read_text() + (tls_dir / "server.crt").read_text())


def _java_executable() -> str:
    """Locate ``java`` ($JAVA_HOME first) and check it is new enough for the broker."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.exists() else shutil.which("java")
    if not java:
        raise LocalKafkaError(
            f"java not found: install a JDK/JRE {MIN_JAVA_MAJOR}+ "
            "(e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
        )
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalKafkaError(f"could not run {java} -version: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise LocalKafkaError(f"could not parse the Java version from `{java} -version`: {out.stderr!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_x" style
        major = int(match.group(2))
    if major < MIN_JAVA_MAJOR:
        raise LocalKafkaError(
            f"{java} is Java {major}; Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_MAJOR}+ "
            "(install e.g. openjdk-17-jre-headless or point JAVA_HOME at a newer JDK)"
        )
    return java


def _has_marker(libs_dir: Path) -> bool:
    """A libs dir counts only if a fetch finished and wrote the marker (never a half fetch)."""
    marker = libs_dir / _MARKER_NAME
    try:
        return marker.read_text().split()[0] == KAFKA_VERSION and any(libs_dir.glob("kafka_*.jar"))
    except (OSError, IndexError):
        return False


def maven_download(line: str) -> str | None:
    """The file a Maven ``Downloaded from <repo>: <url> (<size>...)`` output line names, else None."""
    match = re.match(r"(?:\[INFO\]\s+)?Downloaded from [^:]+: (\S+)", line.strip())
    return match.group(1).rsplit("/", 1)[-1] if match else None


def fetch_progress_line(elapsed_s: float, downloads: int, last: str | None) -> str:
    """The periodic line while ``mvn`` runs: how long so far and what it downloaded."""
    doing = (f"{downloads} files downloaded so far (last: {last})" if downloads
             else "resolving (nothing downloaded yet; files already in ~/.m2 are copied, not downloaded)")
    return f"nexus: fetching Kafka {KAFKA_VERSION} jars: {elapsed_s:.0f}s, {doing}"


def fetch_done_line(libs_dir: Path, elapsed_s: float, jars: int, size_bytes: int, downloads: int) -> str:
    """The closing line of a fetch: where the jars are, how many, and how long it took."""
    source = f"{downloads} files downloaded" if downloads else "all from the local Maven repository ~/.m2"
    return (f"nexus: Kafka {KAFKA_VERSION} jars ready in {libs_dir}: {jars} jars, "
            f"{size_bytes / 1e6:.0f} MB, fetched in {elapsed_s:.0f}s ({source})")


def fetch_kafka(cache_dir: Path | None = None, progress: Progress = _stderr) -> Path:
    """Ensure the broker jars are cached and return the libs dir (idempotent, atomic).

    Runs Maven into a sibling staging dir and renames it into place only after a
    successful fetch, so an interrupted download is never picked up as a classpath.
    The POM is copied into a scratch dir first: the installed package may be read-only.
    A fetch says so on ``progress`` when it starts, every few seconds while ``mvn`` runs
    (the first one downloads ~50 MB) and when it is done; a cached libs dir says nothing.
    """
    libs_dir = Path(cache_dir) if cache_dir is not None else default_libs_dir()
    if _has_marker(libs_dir):
        return libs_dir
    mvn = shutil.which("mvn")
    if not mvn:
        raise LocalKafkaError(
            "mvn (Apache Maven) not found on PATH: install it (e.g. `apt-get install maven`); "
            f"it is needed once to fetch the Kafka {KAFKA_VERSION} jars into {libs_dir}"
        )
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{libs_dir.name}.fetch-", dir=libs_dir.parent))
    project = Path(tempfile.mkdtemp(prefix=f".{libs_dir.name}.pom-", dir=libs_dir.parent))
    try:
        pom = project / "pom.xml"
        pom.write_text(kafka_pom(), encoding="utf-8")
        cmd = [
            mvn, "-B", "-f", str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        progress(f"nexus: fetching the Kafka {KAFKA_VERSION} broker jars (~50 MB) from Maven Central with mvn "
                 f"into {libs_dir} (first run only)...")
        started = time.monotonic()
        code, downloads = _run_mvn(cmd, project, project / "mvn.log", progress, started)
        jars = sorted(p.name for p in staging.glob("*.jar"))
        if code != 0 or not any(j.startswith("kafka_") for j in jars):
            raise LocalKafkaError(
                f"mvn failed (exit {code}) fetching Kafka {KAFKA_VERSION} jars: check "
                "network access to Maven Central (https://repo.maven.apache.org) or the proxy/"
                f"mirror in ~/.m2/settings.xml. Command: {' '.join(cmd)}\n{_tail(project / 'mvn.log')}"
            )
        size = sum(p.stat().st_size for p in staging.glob("*.jar"))
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared like any install
        (staging / _MARKER_NAME).write_text(f"{KAFKA_VERSION}\n" + "\n".join(jars) + "\n")
        if libs_dir.exists() and not _has_marker(libs_dir):
            shutil.rmtree(libs_dir)  # leftover of an older, incomplete layout
        try:
            os.rename(staging, libs_dir)
        except OSError:
            if not _has_marker(libs_dir):  # lost a race only counts if the winner is complete
                raise
        progress(fetch_done_line(libs_dir, time.monotonic() - started, len(jars), size, downloads))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(project, ignore_errors=True)
    return libs_dir


def _run_mvn(cmd: list[str], cwd: Path, log_path: Path, progress: Progress, started: float,
             timeout: float = 900) -> tuple[int, int]:
    """Run ``mvn`` with its output in ``log_path`` and a progress line every few seconds.

    Returns its exit code and how many files it downloaded. Ctrl-C (or the timeout) kills it.
    """
    downloads = [0]
    last: list[str | None] = [None]

    def on_line(line: str) -> None:
        name = maven_download(line)
        if name is not None:
            downloads[0] += 1
            last[0] = name

    with log_path.open("w") as log:
        code = run_reporting(
            cmd, log, progress=progress, report=lambda elapsed: fetch_progress_line(elapsed, downloads[0], last[0]),
            every_s=_PROGRESS_EVERY_S, timeout_s=timeout, on_line=on_line, started=started, cwd=cwd,
            timed_out=lambda: LocalKafkaError(
                f"mvn took over {timeout:.0f}s fetching Kafka jars: check access to Maven Central "
                "(https://repo.maven.apache.org) or the proxy/mirror in ~/.m2/settings.xml"),
        )
    return code, downloads[0]


def _read_properties(path: Path) -> dict[str, str]:
    """Minimal Java .properties reader (key=value lines, # comments) for files we wrote."""
    props: dict[str, str] = {}
    if not path.exists():
        return props
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props


# --------------------------------------------------------------------------- broker


class LocalKafka:
    """One single-node KRaft broker as a subprocess, with data kept in ``data_dir`` across restarts.

    Layout of ``data_dir``: ``server.properties`` and ``log4j.properties`` (rewritten on
    each start), ``logs/`` (Kafka log.dirs with meta.properties), ``kafka.log`` (JVM output).
    """

    def __init__(
        self,
        port: int = 9092,
        data_dir: Path | None = None,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        libs_dir: Path | None = None,
        heap: str = "512m",
        sasl_users: Mapping[str, str] | None = None,
        tls_port: int | None = None,
        tls_client_auth: bool = False,
    ) -> None:
        """``sasl_users`` (name -> password) makes ``port`` a SASL_PLAINTEXT listener (SCRAM-SHA-256,
        SCRAM-SHA-512 and PLAIN; SCRAM users are created when the data dir is formatted, so a
        reused data dir keeps its first users). ``tls_port`` adds a TLS listener (SASL_SSL with
        users, else SSL) whose certificate is signed by :attr:`ca_file`; with ``tls_client_auth``
        it also requires a client certificate signed by that CA (:attr:`client_certfile`). Brokers
        and controller then talk over a separate PLAINTEXT listener on another free port.
        """
        self.port = port
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir(port)
        self.host = host
        self.libs_dir = libs_dir
        self.heap = heap
        self.controller_port = controller_port
        self.sasl_users = dict(sasl_users or {})
        self.tls_port = tls_port
        self.tls_client_auth = tls_client_auth
        self._internal_port: int | None = None
        self.cluster_id: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths and properties ------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def security_protocol(self) -> str:
        """What clients of :attr:`bootstrap` must speak."""
        return "SASL_PLAINTEXT" if self.sasl_users else "PLAINTEXT"

    @property
    def tls_bootstrap(self) -> str:
        """``host:port`` of the TLS listener (``tls_port``), whose protocol is :attr:`tls_security_protocol`."""
        if self.tls_port is None:
            raise LocalKafkaError("this broker has no TLS listener: pass tls_port")
        return f"{self.host}:{self.tls_port}"

    @property
    def tls_security_protocol(self) -> str:
        return "SASL_SSL" if self.sasl_users else "SSL"

    @property
    def ca_file(self) -> Path:
        """The PEM CA certificate that signed the TLS listener's certificate: the clients' ssl_cafile."""
        return self.data_dir / "tls" / "ca.pem"

    @property
    def client_certfile(self) -> Path:
        """A client certificate the TLS listener accepts (``client_keyfile`` is its key)."""
        return self.data_dir / "tls" / "client.crt"

    @property
    def client_keyfile(self) -> Path:
        return self.data_dir / "tls" / "client.key"

    @property
    def _secured(self) -> bool:
        return bool(self.sasl_users) or self.tls_port is not None

    def _secured_listener_lines(self, controller_port: int) -> list[str]:
        """Client listeners with SASL and/or TLS; brokers and controller keep PLAINTEXT ones."""
        h, internal = self.host, self._internal_port
        clients = {"CLIENT": (self.port, self.security_protocol)}
        if self.tls_port is not None:
            clients["CLIENT_TLS"] = (self.tls_port, self.tls_security_protocol)
        advertised = ",".join(f"{name}://{h}:{port}" for name, (port, _) in clients.items())
        protocols = ",".join(f"{name}:{protocol}" for name, (_, protocol) in clients.items())
        lines = [
            f"listeners={advertised},INTERNAL://{h}:{internal},CONTROLLER://{h}:{controller_port}",
            f"advertised.listeners={advertised},INTERNAL://{h}:{internal}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={protocols},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=INTERNAL",
        ]
        if self.sasl_users:
            lines.append(f"sasl.enabled.mechanisms={','.join(_SASL_MECHANISMS)}")
            plain_users = " ".join(f'user_{name}="{password}"' for name, password in self.sasl_users.items())
            for name in clients:
                for mechanism in _SASL_MECHANISMS:
                    jaas = _JAAS[mechanism.split("-")[0]].format(users=plain_users)
                    lines.append(f"listener.name.{name.lower()}.{mechanism.lower()}.sasl.jaas.config={jaas}")
        if self.tls_port is not None:
            tls = self.ca_file.parent
            lines += ["ssl.keystore.type=PEM", f"ssl.keystore.location={tls / 'server.pem'}"]
            if self.tls_client_auth:
                lines += ["listener.name.client_tls.ssl.client.auth=required", "ssl.truststore.type=PEM",
                          f"ssl.truststore.location={self.ca_file}"]
        return lines

    @property
    def server_properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def log_path(self) -> Path:
        """Where the JVM's stdout/stderr go (appended across restarts)."""
        return self.data_dir / "kafka.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _formatted(self) -> bool:
        return (self.log_dir / "meta.properties").exists()

    def _resolve_controller_port(self) -> int:
        """Reuse the controller port saved with formatted data: KRaft voters must not move."""
        saved = _read_properties(self.server_properties_path).get("controller.quorum.voters", "")
        match = re.fullmatch(r"\d+@[^:]+:(\d+)", saved)
        saved_port = int(match.group(1)) if match and self._formatted() else None
        if self.controller_port is None:
            return saved_port if saved_port is not None else free_port(self.host)
        if saved_port is not None and saved_port != self.controller_port:
            raise LocalKafkaError(
                f"data dir {self.data_dir} was formatted with controller port {saved_port}; "
                f"pass controller_port={saved_port} (or None) or use a fresh data dir"
            )
        return self.controller_port

    def _server_properties(self, controller_port: int) -> str:
        h = self.host
        lines = [
            "# Written by localdev.broker on each start; edits are overwritten.",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{h}:{controller_port}",
            *(self._secured_listener_lines(controller_port) if self._secured else [
                f"listeners=PLAINTEXT://{h}:{self.port},CONTROLLER://{h}:{controller_port}",
                f"advertised.listeners=PLAINTEXT://{h}:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
            ]),
            f"log.dirs={self.log_dir}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
        ]
        return "\n".join(lines) + "\n"

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Fetch jars if needed, format storage on first use, launch, and wait until it serves.

        Readiness is a Metadata request that lists this broker, not a fixed sleep. ``timeout``
        starts at the launch: a first run's jar download (minutes, with progress lines) is not in it.
        """
        if self.is_running():
            raise LocalKafkaError(f"broker on {self.bootstrap} is already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        controller_port = self._resolve_controller_port()
        if self._secured:
            self._internal_port = free_port(self.host)
        if self.tls_port is not None:
            _make_certificates(self.ca_file.parent, self.host)
        for what, port in (("port", self.port), ("controller port", controller_port)):
            if _port_in_use(self.host, port):
                hint = "--port" if what == "port" else "another data dir"
                raise LocalKafkaError(
                    f"{what} {port} is already in use on {self.host}: "
                    f"is another Kafka running? use {hint}"
                )
        java = _java_executable()
        libs = fetch_kafka(self.libs_dir)
        classpath = f"{libs}/*"

        self.server_properties_path.write_text(self._server_properties(controller_port))
        log4j = self.data_dir / "log4j.properties"
        log4j.write_text(_LOG4J_PROPERTIES)
        self.controller_port = controller_port

        if not self._formatted():
            self._format(java, classpath)
        meta = _read_properties(self.log_dir / "meta.properties")
        self.cluster_id = meta.get("cluster.id")

        cmd = [
            java, f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration={log4j.as_uri()}",
            "-cp", classpath, "kafka.Kafka", str(self.server_properties_path),
        ]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + timeout  # after the fetch and the format: only the launch counts
        with self.log_path.open("ab") as log:
            # Own session: a terminal Ctrl-C reaches only us, and we shut the broker down cleanly.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        self._wait_ready(deadline, log_start)

    def _format(self, java: str, classpath: str) -> None:
        """Format the KRaft log dir once; later starts reuse its cluster id and data."""
        # Same shape as `StorageTool random-uuid`: URL-safe base64 UUID, unpadded, and (like
        # Kafka's Uuid.randomUuid) never starting with "-", which CLIs would read as a flag.
        cid = self.cluster_id or "-"  # preset by a cluster: all its nodes share one id
        while cid.startswith("-"):
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = [
            java, "-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool", "format",
            "-t", cid, "-c", str(self.server_properties_path),
        ]
        for name, password in self.sasl_users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()[-4000:]
            for password in self.sasl_users.values():
                output = output.replace(password, "***")
            raise LocalKafkaError(
                f"formatting Kafka storage in {self.log_dir} failed (exit {proc.returncode}):\n" + output
            )

    def _wait_ready(self, deadline: float, log_start: int) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                self._forget()
                raise LocalKafkaError(
                    f"Kafka broker exited with code {code} during startup; last lines of "
                    f"{self.log_path}:\n{_tail(self.log_path, log_start)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise LocalKafkaError(
                    f"Kafka broker on {self.bootstrap} did not become ready in time; last lines "
                    f"of {self.log_path}:\n{_tail(self.log_path, log_start)}"
                )
            # A secured broker answers plain Metadata requests only on its internal listener.
            ready_port = self._internal_port if self._secured else self.port
            assert ready_port is not None  # start() picked the internal port above
            if broker_ids(self.host, ready_port, timeout=min(2.0, max(remaining, 0.1))):
                return  # it lists a live broker: itself, registered and unfenced
            time.sleep(0.1)  # poll interval between readiness checks

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (controlled shutdown, flushes logs), then SIGKILL if it hangs; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        atexit.unregister(self.stop)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the broker process exits; return its exit code (None if not started)."""
        proc = self._proc
        if proc is None:
            return None
        return proc.wait(timeout=timeout)

    def poll(self) -> int | None:
        """Exit code if the broker process has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"LocalKafka({self.bootstrap}, data_dir={str(self.data_dir)!r}, {state})"


# --------------------------------------------------------------------------- CLI backend


def run_forever(port: int = 9092, data_dir: Path | None = None) -> int:
    """Backend of ``nexus kafka``: run a broker in the foreground until SIGINT/SIGTERM.

    Returns a process exit code: 0 after a clean stop, 1 if it failed to start or died.
    """
    kafka = LocalKafka(port=port, data_dir=data_dir)
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        started = time.monotonic()
        try:
            kafka.start()
        except LocalKafkaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if stop_requested.is_set():
            kafka.stop()
            return 0
        print(
            f"Kafka {KAFKA_VERSION} (KRaft) ready on {kafka.bootstrap}, data in {kafka.data_dir}",
            file=sys.stderr,
        )
        print(
            f"  started in {time.monotonic() - started:.1f}s; broker log: {kafka.log_path}; "
            "Ctrl-C stops",
            file=sys.stderr,
        )
        while not stop_requested.wait(0.5):
            code = kafka.poll()
            if code is not None:
                print(
                    f"error: Kafka broker exited unexpectedly with code {code}; last lines of "
                    f"{kafka.log_path}:\n{_tail(kafka.log_path)}",
                    file=sys.stderr,
                )
                kafka.stop()
                return 1
        print("stopping Kafka...", file=sys.stderr)
        kafka.stop()
        print("Kafka stopped", file=sys.stderr)
        return 0
    finally:
        kafka.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
