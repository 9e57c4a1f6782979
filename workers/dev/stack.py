"""The local stack: a real single-node KRaft Kafka broker and S3Proxy, started by the project itself.

Jars come from Maven Central via ``mvn dependency:copy-dependencies`` on the poms shipped in
``workers/dev/stack_poms`` into a cache outside the clone. Processes are tracked by pid files, so
``down`` stops only what ``up`` started. Data lives in the stack dir and survives ``down``/``up``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from workers import config as cfg
from workers.errors import StackError, UnreachableError

POM_DIR = Path(__file__).parent / "stack_poms"
SERVICES = ("kafka", "s3proxy")
SASL_USER = "kappa"


@dataclass(frozen=True)
class Ports:
    kafka: int
    controller: int
    kafka_sasl: int
    s3: int

    @classmethod
    def from_env(cls) -> Ports:
        def port(name: str, default: int) -> int:
            raw = os.environ.get(name, str(default))
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"{name}={raw!r} is not a TCP port (1-65535)")
            return int(raw)

        kafka = port("KAPPA_STACK_KAFKA_PORT", 19092)
        return cls(
            kafka=kafka,
            controller=port("KAPPA_STACK_CONTROLLER_PORT", kafka + 1),
            kafka_sasl=port("KAPPA_STACK_KAFKA_SASL_PORT", kafka + 2),
            s3=port("KAPPA_STACK_S3_PORT", 19000),
        )


@dataclass(frozen=True)
class Layout:
    """Every path the stack uses, derived from the stack dir and the jar cache."""

    root: Path
    jars_root: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(root=cfg.stack_dir(), jars_root=cfg.cache_dir() / "jars")

    def jars(self, service: str) -> Path:
        return self.jars_root / service

    def service_dir(self, service: str) -> Path:
        return self.root / service

    def pid_file(self, service: str) -> Path:
        return self.root / "run" / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.env"

    @property
    def env_file(self) -> Path:
        return self.root / cfg.stack_env_file().name


# ---------------------------------------------------------------- prerequisites and jars


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StackError(f"`{name}` not found on PATH: {hint}")
    return path


def fetch_jars(layout: Layout, service: str, log: Callable[[str], None] = print) -> Path:
    """Resolve the service's pom into ``jars/<service>`` once; a pom change refetches."""
    pom = POM_DIR / service / "pom.xml"
    target = layout.jars(service)
    stamp = target / ".pom-sha256"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return target
    mvn = require_tool("mvn", "install Maven (e.g. `apt-get install maven`) so the stack can fetch its jars")
    log(f"fetching {service} jars from Maven Central into {target} ...")
    staging = target.with_name(f"{service}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise StackError(
            f"downloading the {service} jars failed (is Maven Central reachable?):\n{tail}"
        )
    (staging / ".pom-sha256").write_text(digest)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def classpath(layout: Layout, service: str) -> str:
    return str(layout.jars(service) / "*")


# ---------------------------------------------------------------- credentials and config files


def stack_secrets(layout: Layout) -> dict[str, str]:
    """S3 and SASL credentials: from the environment if given, else generated once and kept."""
    stored = cfg.read_env_file(layout.secrets_file)
    values = {
        "S3_ACCESS_KEY": os.environ.get("KAPPA_STACK_S3_ACCESS_KEY") or stored.get("S3_ACCESS_KEY")
        or "kappa-" + secrets.token_hex(6),
        "S3_SECRET_KEY": os.environ.get("KAPPA_STACK_S3_SECRET_KEY") or stored.get("S3_SECRET_KEY")
        or secrets.token_urlsafe(24),
        "SASL_PASSWORD": stored.get("SASL_PASSWORD") or secrets.token_urlsafe(18),
    }
    if values != stored:
        write_private(layout.secrets_file, "".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def kafka_properties(layout: Layout, ports: Ports, sasl_password: str) -> str:
    data = layout.service_dir("kafka") / "data"
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{SASL_USER}="{sasl_password}";'
    )
    return "\n".join(
        [
            "# generated by `kappa stack up`; edits are overwritten",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{ports.controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{ports.kafka},CONTROLLER://127.0.0.1:{ports.controller},"
            f"SASL_PLAINTEXT://127.0.0.1:{ports.kafka_sasl}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{ports.kafka},SASL_PLAINTEXT://127.0.0.1:{ports.kafka_sasl}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN",
            f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
            f"log.dirs={data}",
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "message.max.bytes=4194304",
            "log.retention.hours=-1",
            "delete.topic.enable=true",
            "",
        ]
    )


LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


#: S3Proxy's jar from Maven Central ships no logback configuration, and logback's default is DEBUG
#: to the console: every request then formatted Jetty's debug strings (83 % of S3Proxy's CPU while
#: the archiver uploaded, 4 CPU-seconds per million archived events) into a log that grew by
#: gigabytes a day (the ``LOG_LEVEL`` variable only feeds the distribution's logback.xml, not the jar).
LOGBACK = """\
<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{HH:mm:ss.SSS} [%thread] %-5level %logger{36} - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.gaul.s3proxy" level="INFO"/>
  <root level="WARN"><appender-ref ref="STDOUT"/></root>
</configuration>
"""

#: a service log above this size is moved aside (to ``<name>.log.1``) when the service starts
LOG_ROTATE_BYTES = 64 * 1024 * 1024


def s3proxy_properties(layout: Layout, ports: Ports, access_key: str, secret_key: str) -> str:
    return "\n".join(
        [
            f"s3proxy.endpoint=http://127.0.0.1:{ports.s3}",
            "s3proxy.authorization=aws-v2-or-v4",
            f"s3proxy.identity={access_key}",
            f"s3proxy.credential={secret_key}",
            "jclouds.provider=filesystem-nio2",
            f"jclouds.filesystem.basedir={layout.service_dir('s3proxy') / 'data'}",
            "",
        ]
    )


# ---------------------------------------------------------------- processes


def read_pid(layout: Layout, service: str) -> int | None:
    """The pid of our running service process, or None (stale pid files are ignored)."""
    path = layout.pid_file(service)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (ValueError, OSError):
        return None
    marker = "kafka.Kafka" if service == "kafka" else "org.gaul.s3proxy.Main"
    return pid if marker in cmdline and str(layout.root) in cmdline else None


def port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def spawn(layout: Layout, service: str, command: list[str]) -> int:
    log_path = layout.log_file(service)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    layout.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    layout.pid_file(service).write_text(str(process.pid))
    return process.pid


def log_tail(layout: Layout, service: str, lines: int = 15) -> str:
    path = layout.log_file(service)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_service(layout: Layout, service: str, timeout: float = 30.0) -> bool:
    """SIGTERM our process (from its pid file), SIGKILL after ``timeout``. True if it was running."""
    pid = read_pid(layout, service)
    layout.pid_file(service).unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return True


def spawned_alive(layout: Layout, service: str) -> bool:
    """True while the process named by the pid file runs.

    Unlike :func:`read_pid` this does not look at the command line: right after ``spawn`` returns,
    ``/proc/<pid>/cmdline`` can still be empty, and a start-up wait must not mistake that for an exit.
    """
    try:
        pid = int(layout.pid_file(service).read_text().strip())
    except (ValueError, OSError):
        return False
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def cluster_id() -> str:
    """A KRaft cluster id: url-safe base64 of a random UUID that does not start with ``-``.

    ``kafka-storage format -t -abc...`` would read an id starting with ``-`` as an option and fail
    (1 start in 64); Kafka's own ``Uuid.randomUuid()`` skips such ids for the same reason.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


# ---------------------------------------------------------------- the stack


class Stack:
    """Start, stop and inspect the local stack."""

    def __init__(self, layout: Layout | None = None, ports: Ports | None = None, log: Callable[[str], None] = print):
        self.layout = layout or Layout.default()
        self.ports = ports or Ports.from_env()
        self.log = log

    # addresses ---------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.kafka}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.kafka_sasl}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    def settings(self) -> cfg.Settings:
        values = cfg.read_env_file(self.layout.env_file)
        return cfg.load_settings({**values, "KAPPA_S3_BUCKET": os.environ.get("KAPPA_S3_BUCKET", "kappa")})

    # lifecycle ---------------------------------------------------
    def up(self, services: Iterable[str] = SERVICES, timeout: float = 120.0) -> None:
        require_tool("java", "install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)")
        wanted = [s for s in SERVICES if s in set(services)]
        creds = stack_secrets(self.layout)
        for service in wanted:
            fetch_jars(self.layout, service, self.log)
        self.write_env_file(creds)
        for service in wanted:
            if read_pid(self.layout, service) is None:
                getattr(self, f"_start_{service}")(creds)
        for service in wanted:
            getattr(self, f"_wait_{service}")(timeout)
        if "s3proxy" in wanted:
            self._create_bucket()

    def down(self, services: Iterable[str] = SERVICES) -> list[str]:
        # S3 first, Kafka last: nothing else depends on S3 being up during Kafka's shutdown
        return [s for s in reversed(SERVICES) if s in set(services) and stop_service(self.layout, s)]

    def reset(self) -> list[Path]:
        """Delete Kafka's log dirs and S3Proxy's objects; jars, secrets and logs stay, and the next
        ``up`` formats a new, empty cluster. Refused while a service runs: removing a live broker's
        files corrupts it. Returns the folders removed."""
        running = [s for s in SERVICES if read_pid(self.layout, s)]
        if running:
            raise StackError(f"{', '.join(running)} still running in {self.layout.root}: stop the stack first "
                             "(`kappa stack down`)")
        removed = [self.layout.service_dir(s) / "data" for s in SERVICES]
        removed = [folder for folder in removed if folder.exists()]
        for folder in removed:
            shutil.rmtree(folder)
        return removed

    def status(self) -> list[dict[str, str]]:
        rows = []
        for service, address in (("kafka", self.bootstrap), ("s3proxy", self.s3_endpoint)):
            pid = read_pid(self.layout, service)
            rows.append(
                {
                    "service": service,
                    "state": "running" if pid else "stopped",
                    "pid": str(pid or "-"),
                    "address": address,
                    "data": str(self.layout.service_dir(service) / "data"),
                    "log": str(self.layout.log_file(service)),
                }
            )
        return rows

    def running(self) -> bool:
        return all(read_pid(self.layout, s) for s in SERVICES)

    # kafka -------------------------------------------------------
    def _start_kafka(self, creds: dict[str, str]) -> None:
        for port in (self.ports.kafka, self.ports.controller, self.ports.kafka_sasl):
            self._require_free(port, "KAPPA_STACK_KAFKA_PORT")
        kdir = self.layout.service_dir("kafka")
        kdir.mkdir(parents=True, exist_ok=True)
        props = kdir / "server.properties"
        write_private(props, kafka_properties(self.layout, self.ports, creds["SASL_PASSWORD"]))
        (kdir / "log4j2.properties").write_text(LOG4J2)
        log4j = f"-Dlog4j2.configurationFile={kdir / 'log4j2.properties'}"
        java = ["java", log4j, "-cp", classpath(self.layout, "kafka")]
        if not (kdir / "data" / "meta.properties").exists():
            cid = cluster_id()
            result = subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", "-t", cid, "-c", str(props)],
                capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                raise StackError(f"formatting Kafka storage failed: {result.stdout[-500:]}{result.stderr[-500:]}")
        heap = os.environ.get("KAPPA_STACK_KAFKA_HEAP", "-Xms256m -Xmx1g").split()
        self.log(f"starting Kafka on {self.bootstrap} ...")
        spawn(self.layout, "kafka", [java[0], *heap, "-XX:+UseG1GC", *java[1:], "kafka.Kafka", str(props)])

    def _wait_kafka(self, timeout: float) -> None:
        from workers import kafka as kafka_helpers

        settings = cfg.Settings(bootstrap_servers=self.bootstrap)
        self._wait("kafka", timeout, lambda: kafka_helpers.check_reachable(settings, timeout=3))

    # s3proxy -----------------------------------------------------
    def _start_s3proxy(self, creds: dict[str, str]) -> None:
        self._require_free(self.ports.s3, "KAPPA_STACK_S3_PORT")
        sdir = self.layout.service_dir("s3proxy")
        (sdir / "data").mkdir(parents=True, exist_ok=True)
        props = sdir / "s3proxy.conf"
        text = s3proxy_properties(self.layout, self.ports, creds["S3_ACCESS_KEY"], creds["S3_SECRET_KEY"])
        write_private(props, text)
        (sdir / "logback.xml").write_text(LOGBACK)
        self.log(f"starting S3Proxy on {self.s3_endpoint} ...")
        spawn(
            self.layout,
            "s3proxy",
            ["java", "-Xmx512m", f"-Dlogback.configurationFile={sdir / 'logback.xml'}",
             "-cp", classpath(self.layout, "s3proxy"), "org.gaul.s3proxy.Main", "--properties", str(props)],
        )

    def _wait_s3proxy(self, timeout: float) -> None:
        from workers import s3 as s3_helpers

        self._wait("s3proxy", timeout, lambda: s3_helpers.check_reachable(self.settings(), timeout=3))

    def _create_bucket(self) -> None:
        from workers import s3 as s3_helpers

        settings = self.settings()
        s3_helpers.ensure_bucket(s3_helpers.s3_client(settings), settings.s3_bucket)

    # shared ------------------------------------------------------
    def _require_free(self, port: int, variable: str) -> None:
        if port_busy(port):
            raise StackError(
                f"port {port} on 127.0.0.1 is busy (another process listens there): stop it or pick other "
                f"ports with {variable}"
            )

    def _wait(self, service: str, timeout: float, probe: Callable[[], object]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not spawned_alive(self.layout, service):
                raise StackError(f"{service} exited during start-up; last log lines:\n{log_tail(self.layout, service)}")
            try:
                probe()
                return
            except UnreachableError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{service} did not answer within {timeout:.0f}s; see {self.layout.log_file(service)}"
                    ) from None
                time.sleep(0.5)

    def write_env_file(self, creds: dict[str, str]) -> None:
        lines = {
            "KAPPA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAPPA_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": creds["S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": creds["S3_SECRET_KEY"],
            "AWS_REGION": "us-east-1",
            "KAPPA_STACK_SASL_BOOTSTRAP_SERVERS": self.sasl_bootstrap,
            "KAPPA_STACK_SASL_USERNAME": SASL_USER,
            "KAPPA_STACK_SASL_PASSWORD": creds["SASL_PASSWORD"],
        }
        header = "# written by `kappa stack up`: used when these variables are not set in the environment\n"
        write_private(self.layout.env_file, header + "".join(f"{k}={v}\n" for k, v in lines.items()))
