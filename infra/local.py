"""Local real services on 127.0.0.1: Apache Kafka (KRaft), Redis and Prometheus.

`churn infra up` installs what is missing (Kafka jars from Maven Central through
`infra/kafka/pom.xml`, Debian's `redis-server` and `prometheus`), starts each service with
its data under the state folder and waits until it answers a real request; `down` stops
them and `status` reports each one honestly. Every step is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import string
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from core.errors import ServiceUnavailableError
from core.kafka import kafka_config
from core.settings import Settings

INFRA_DIR = Path(__file__).resolve().parent.parent / "infra"
PROMETHEUS_CONFIG = Path(__file__).resolve().parent.parent / "monitoring" / "prometheus"


@dataclass(frozen=True)
class ServiceState:
    """What `status` knows of one service: whether its process runs and whether it answers."""

    name: str
    address: str
    running: bool
    ready: bool
    detail: str


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def _apt_install(packages: list[str]) -> None:
    """Installs Debian packages; raises ServiceUnavailableError if apt-get fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        msg = f"could not install {packages} with apt-get: {detail.strip()[-500:]}"
        raise ServiceUnavailableError(msg) from exc


def install(settings: Settings) -> None:
    """Installs the Debian packages and Kafka jars that are missing.

    Raises:
        ServiceUnavailableError: apt-get or Maven failed.
    """
    # docker-compose is not a service: the unit tests validate docker-compose.yml with it.
    missing = [
        pkg
        for pkg, binary in (
            ("redis-server", "redis-server"),
            ("prometheus", "prometheus"),
            ("docker-compose", "docker-compose"),
        )
        if shutil.which(binary) is None
    ]
    if missing:
        _apt_install(missing)
    kafka_lib(settings)


def kafka_lib(settings: Settings) -> Path:
    """Returns the folder of Kafka broker jars, fetching them with Maven on first use.

    Raises:
        ServiceUnavailableError: Maven could not fetch the jars.
    """
    lib = settings.state_dir.resolve() / "kafka-lib"
    marker = lib / ".complete"
    if marker.exists():
        return lib
    if shutil.which("mvn") is None:
        _apt_install(["maven"])
    lib.mkdir(parents=True, exist_ok=True)
    try:
        _run(
            [
                "mvn", "-q", "-B", "-f", str(INFRA_DIR / "kafka" / "pom.xml"),
                "dependency:copy-dependencies", f"-DoutputDirectory={lib}", "-DincludeScope=runtime",
            ]
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        msg = f"Maven could not fetch the Kafka broker jars: {(exc.stdout + exc.stderr)[-800:]}"
        raise ServiceUnavailableError(msg) from exc
    marker.touch()
    return lib


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir.resolve() / f"{name}.pid"


def _running_pid(settings: Settings, name: str) -> int | None:
    return running_pid_in(_pid_file(settings, name))


def running_pid_in(path: Path) -> int | None:
    """Returns the pid written in `path` if that process runs (a zombie child counts as stopped)."""
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
    except (FileNotFoundError, IndexError):
        return None
    return pid


def _spawn(settings: Settings, name: str, cmd: list[str]) -> None:
    log = (settings.state_dir.resolve() / f"{name}.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(settings, name).write_text(str(proc.pid))


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- Kafka -------------------------------------------------------------------------------


def _kafka_java(settings: Settings, main: str, *args: str) -> list[str]:
    lib = kafka_lib(settings)
    return [
        "java", "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={INFRA_DIR / 'kafka' / 'log4j2.properties'}",
        "-cp", f"{lib}/*", main, *args,
    ]  # fmt: skip


def _start_kafka(settings: Settings) -> None:
    root = settings.state_dir.resolve() / "kafka"
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    template = string.Template((INFRA_DIR / "kafka" / "server.properties.template").read_text())
    config = root / "server.properties"
    config.write_text(
        template.substitute(
            port=settings.kafka_port,
            controller_port=settings.kafka_controller_port,
            sasl_port=settings.kafka_sasl_listener_port,
            data_dir=data,
        )
    )
    if not (data / "meta.properties").exists():
        # Format once: the cluster id lives in meta.properties from then on.
        _run(_kafka_java(settings, "kafka.tools.StorageTool", "format", "-t", str(uuid.uuid4()), "-c", str(config)))
    _spawn(settings, "kafka", _kafka_java(settings, "kafka.Kafka", str(config)))


def local_plaintext(settings: Settings) -> Settings:
    """Returns `settings` pointed at the local broker's PLAINTEXT listener (how `churn infra`
    checks the broker and creates SCRAM users, whatever the clients are configured with)."""
    return settings.model_copy(update={"kafka_security_protocol": "PLAINTEXT", "kafka_bootstrap": ""})


def ensure_scram_user(settings: Settings, username: str, password: str, mechanism: str = "SCRAM-SHA-512") -> None:
    """Creates (or updates) the SCRAM credential of `username` on the local broker, through the
    admin API on its PLAINTEXT listener.

    Raises:
        ServiceUnavailableError: the broker refused or did not answer.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    plain = local_plaintext(settings)
    admin = AdminClient(kafka_config(plain, log_level=0))
    info = ScramCredentialInfo(getattr(ScramMechanism, mechanism.replace("-", "_")), 8192)
    futures = admin.alter_user_scram_credentials([UserScramCredentialUpsertion(username, info, password.encode())])
    try:
        for future in futures.values():
            future.result(30)
    except KafkaException as exc:
        msg = f"could not create the SCRAM user {username!r} on {plain.bootstrap_servers}: {exc.args[0].str()}"
        raise ServiceUnavailableError(msg) from exc


def kafka_ready(settings: Settings, timeout: float = 2.0) -> tuple[bool, str]:
    """Returns (ready, detail) after a real metadata request to the broker."""
    from confluent_kafka.admin import AdminClient

    if not _port_open(settings.kafka_port):
        return False, "port closed"
    try:
        admin = AdminClient(kafka_config(local_plaintext(settings), log_level=0))
        meta = admin.list_topics(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any client failure means "not ready"
        return False, f"metadata request failed: {exc}"
    return True, f"{len(meta.brokers)} broker(s), {len(meta.topics)} topic(s)"


# --- Redis -------------------------------------------------------------------------------


def _start_redis(settings: Settings) -> None:
    data = settings.state_dir.resolve() / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # Every write goes to the append-only file, fsynced once a second, and a restart (after
    # SIGTERM or a crash) loads it: at most the last second is lost, and the scorer sees that
    # Redis went back in time from the applied offsets kept with the states and replays it from
    # Kafka (`stream.consumer`). No RDB snapshots: the AOF is rewritten compactly on its own.
    # `noeviction`: a full Redis refuses writes (OOM, an alert) instead of silently evicting
    # the states and offsets that make replays exact; idle keys expire by their TTL instead.
    _spawn(
        settings,
        "redis",
        [
            "redis-server", "--bind", "127.0.0.1", "--port", str(settings.redis_port),
            "--dir", str(data), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--shutdown-on-sigterm", "save",
            "--daemonize", "no", "--protected-mode", "yes",
        ],
    )  # fmt: skip


def redis_ready(settings: Settings) -> tuple[bool, str]:
    """Returns (ready, detail) after a real PING to Redis."""
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_address, socket_timeout=1)
        client.ping()
        version = client.info("server")["redis_version"]
        client.close()
    except Exception as exc:  # noqa: BLE001 - any client failure means "not ready"
        return False, f"PING failed: {exc}"
    return True, f"redis {version}"


# --- Prometheus --------------------------------------------------------------------------


def prometheus_targets_dir(settings: Settings) -> Path:
    """Returns the folder of file-discovery target files Prometheus watches (tests add theirs)."""
    path = settings.state_dir.resolve() / "prometheus" / "targets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_prometheus_config(settings: Settings) -> Path:
    root = settings.state_dir.resolve() / "prometheus"
    targets = prometheus_targets_dir(settings)
    config = root / "prometheus.yml"
    rules = PROMETHEUS_CONFIG / "alerts.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n  - {rules}\n" if rules.exists() else "")
        + "scrape_configs:\n"
        + "  - job_name: prometheus\n    static_configs:\n"
        + f"      - targets: ['127.0.0.1:{settings.prometheus_port}']\n"
        + "  - job_name: churn\n    file_sd_configs:\n"
        + f"      - files: ['{targets}/*.json']\n        refresh_interval: 1s\n"
    )
    return config


def _start_prometheus(settings: Settings) -> None:
    root = settings.state_dir.resolve() / "prometheus"
    config = _write_prometheus_config(settings)
    _spawn(
        settings,
        "prometheus",
        [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}", "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=2d",
        ],
    )  # fmt: skip


def reload_prometheus(settings: Settings) -> None:
    """Rewrites the running local Prometheus's config (e.g. alert rules added since it started)
    and reloads it in place, without a restart.

    Raises:
        ServiceUnavailableError: Prometheus refused or did not answer the reload.
    """
    _write_prometheus_config(settings)
    url = f"http://127.0.0.1:{settings.prometheus_port}/-/reload"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10) as response:
            response.read()
    except OSError as exc:
        msg = f"Prometheus reload at {url} failed: {exc}"
        raise ServiceUnavailableError(msg) from exc


def prometheus_ready(settings: Settings) -> tuple[bool, str]:
    """Returns (ready, detail) from Prometheus's own readiness endpoint."""
    url = f"http://127.0.0.1:{settings.prometheus_port}/-/ready"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200, f"{url} -> {response.status}"
    except OSError as exc:
        return False, f"{url} failed: {exc}"


# --- all services ------------------------------------------------------------------------

SERVICES = {
    "kafka": (_start_kafka, kafka_ready),
    "redis": (_start_redis, redis_ready),
    "prometheus": (_start_prometheus, prometheus_ready),
}


def _address(settings: Settings, name: str) -> str:
    port = {"kafka": settings.kafka_port, "redis": settings.redis_port, "prometheus": settings.prometheus_port}[name]
    return f"127.0.0.1:{port}"


def status(settings: Settings) -> list[ServiceState]:
    """Returns the state of every local service, checked with a real request each."""
    states = []
    for name, (_, ready_check) in SERVICES.items():
        running = _running_pid(settings, name) is not None
        ready, detail = ready_check(settings)
        states.append(ServiceState(name, _address(settings, name), running, ready, detail))
    return states


def up(settings: Settings, timeout: float = 90.0) -> list[ServiceState]:
    """Installs what is missing, starts every service not yet answering and waits for all.

    Returns the final states. Raises ServiceUnavailableError if one is not ready in time.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    install(settings)
    for name, (start, ready_check) in SERVICES.items():
        if ready_check(settings)[0]:
            if name == "prometheus":  # already running: pick up rule files added since it started
                reload_prometheus(settings)
            continue
        if _running_pid(settings, name) is None:
            start(settings)
    deadline = time.monotonic() + timeout
    for name, (_, ready_check) in SERVICES.items():
        while True:
            ready, detail = ready_check(settings)
            if ready:
                break
            if _running_pid(settings, name) is None and not ready:
                log = settings.state_dir.resolve() / f"{name}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                msg = f"{name} exited during start-up ({detail}); last log lines:\n{tail}"
                raise ServiceUnavailableError(msg)
            if time.monotonic() > deadline:
                msg = f"{name} not ready after {timeout:.0f}s: {detail}"
                raise ServiceUnavailableError(msg)
            time.sleep(0.3)
    password = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_sasl_username and password and settings.kafka_sasl_mechanism.startswith("SCRAM"):
        # The clients' SCRAM user on the SASL listener.
        ensure_scram_user(settings, settings.kafka_sasl_username, password, settings.kafka_sasl_mechanism)
    return status(settings)


def down(settings: Settings, timeout: float = 30.0) -> None:
    """Stops every service this state folder started (SIGTERM, then SIGKILL after `timeout`)."""
    for name in SERVICES:
        pid = _running_pid(settings, name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running_pid(settings, name) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if _running_pid(settings, name) is not None:
            os.killpg(pid, signal.SIGKILL)
        _pid_file(settings, name).unlink(missing_ok=True)


def stop_service(settings: Settings, name: str, timeout: float = 30.0) -> None:
    """Stops one service: SIGTERM (a clean shutdown: Redis saves, Kafka closes its logs), then
    SIGKILL if it is still running after `timeout` seconds. Fault tests use it to take Redis or
    Kafka away for a while; `start_service` brings it back with its data."""
    pid = _running_pid(settings, name)
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running_pid(settings, name) is not None:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.killpg(pid, signal.SIGKILL)
            deadline = float("inf")  # SIGKILL cannot be ignored: wait for the exit
        time.sleep(0.1)
    _pid_file(settings, name).unlink(missing_ok=True)


def kill_service(settings: Settings, name: str) -> None:
    """SIGKILLs one service (no shutdown work: Redis saves nothing, Kafka closes nothing) and
    waits for its exit, as a crash or the OOM killer would; `start_service` brings it back
    from whatever its files hold."""
    sigkill_and_wait(_pid_file(settings, name))


def sigkill_and_wait(pid_file: Path) -> None:
    """SIGKILLs the process group whose leader's pid is in `pid_file` (if it runs), waits for
    its exit and removes the file."""
    pid = running_pid_in(pid_file)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while running_pid_in(pid_file) is not None:
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def start_service(settings: Settings, name: str, timeout: float = 60.0) -> None:
    """Starts one stopped service and waits until it answers."""
    start, ready_check = SERVICES[name]
    if _running_pid(settings, name) is None:
        start(settings)
    deadline = time.monotonic() + timeout
    while not ready_check(settings)[0]:
        if time.monotonic() > deadline:
            msg = f"{name} not ready after {timeout:.0f}s"
            raise ServiceUnavailableError(msg)
        time.sleep(0.2)
