"""Helpers the benchmarks and the tests share: free ports, waiting, a real `churn consume`
subprocess observed from outside, throwaway settings, and a small trained champion.

Each exists once here; `tests/support.py` adds what only the tests need.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from core.redis import redis_client
from core.settings import Settings
from events.log import write_partitioned
from sim.simulator import SimConfig, simulate
from training import fit
from training.pipeline import TrainOptions, TrainResult, train

CHURN = str(Path(sys.executable).parent / "churn")
# Small, fast, churning often enough to have positives: ~30 s of training.
SMALL_SIMULATION = SimConfig(users=300, days=40, seed=3, churn_level=3.0)
# Two search trials (the child-run path) and fewer bootstrap replicates: seconds, not minutes.
SMALL_TRAIN_OPTIONS = TrainOptions(
    horizon_days=7, search_trials=2, bootstrap_samples=100, fit=fit.FitConfig(imbalance=("none",), max_rounds=200)
)
T = TypeVar("T")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    """Returns a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.1, log: Path | None = None) -> T:
    """Polls `condition` every `every` seconds until it returns something true; returns that.

    Raises:
        TimeoutError: `condition` did not hold within `timeout` seconds (the message names
            `what` and ends with the tail of `log`, when given).
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            tail = "\n" + log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            msg = f"timed out after {timeout:.0f}s waiting for {what}{tail}"
            raise TimeoutError(msg)
        time.sleep(every)
    return value


def rss_bytes(pid: int) -> int:
    """Returns the resident memory of process `pid` (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """Returns the user + system CPU seconds of process `pid` (all its threads), from /proc, in
    clock ticks (10 ms); 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # Fields after the command's closing parenthesis start at field 3 (state): utime is 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int, thread: int) -> float:
    """Returns the CPU seconds one thread of process `pid` has run (the main thread's id is the
    pid), from /proc schedstat's first field: nanoseconds, the clock `time.thread_time_ns` reads
    in that thread, where /proc stat rounds to 10 ms ticks; 0.0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def runqueue_wait_seconds(pid: int, thread: int | None = None) -> float:
    """Returns how long process `pid` (or its thread `thread`) has waited for a CPU while ready to
    run (/proc schedstat, second field): what a shared machine's other load costs it; 0.0 once
    it is gone."""
    path = f"/proc/{pid}/task/{thread}/schedstat" if thread is not None else f"/proc/{pid}/schedstat"
    try:
        return int(Path(path).read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> float:
    """Returns the CPU seconds every core of the machine has spent busy since boot (/proc/stat:
    everything but idle and iowait); the difference over an interval shows what all processes
    (other users' too, on a shared machine) used."""
    ticks = _machine_ticks()
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def machine_steal_seconds() -> float:
    """Returns the CPU seconds the hypervisor has taken from this virtual machine's cores since
    boot (/proc/stat: steal); the difference over an interval shows how much of it the host's
    other guests took."""
    return _machine_ticks()[7] / CLOCK_TICKS


def _machine_ticks() -> list[int]:
    """Returns the whole machine's CPU ticks since boot by state (/proc/stat's first line: user,
    nice, system, idle, iowait, irq, softirq, steal, ...)."""
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine() -> dict[str, Any]:
    """Returns what the figures ran on: CPU model, logical cores, load averages (1, 5, 15 min)."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown",
    )
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def scrape(url: str) -> Samples:
    """Returns every sample of a Prometheus text endpoint, keyed by (name, labels); {} if it
    does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback endpoint
            text = response.read().decode()
    except OSError:
        return {}
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scratch_settings(base: Settings, **fields: Any) -> tuple[Settings, dict[str, str]]:
    """Returns `base` with `fields` replaced, and the environment that gives a `churn` subprocess
    the same settings (the caller's environment plus `CHURN_<FIELD>` for each field)."""
    settings = base.model_copy(update=fields)
    env = {**os.environ, **{f"CHURN_{key.upper()}": str(value) for key, value in fields.items()}}
    return settings, env


class ScorerProcess:
    """A running `churn consume` subprocess: its metrics endpoint, log file and memory."""

    def __init__(self, env: Mapping[str, str], metrics_port: int, log: Path, *args: str) -> None:
        """Starts `churn consume *args` with `env`, its output going to the file `log` (a file,
        not a pipe: nobody drains a pipe while a fault runs)."""
        self.port = metrics_port
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([CHURN, "consume", *args], env=dict(env), stdout=out, stderr=subprocess.STDOUT)

    def samples(self) -> Samples:
        """Returns every metric sample of the process (empty if its endpoint does not answer)."""
        return scrape(f"http://127.0.0.1:{self.port}/metrics")

    def value(self, name: str, **labels: str) -> float | None:
        """Returns one sample's value, None if the process does not (yet) export it."""
        return self.samples().get((name, frozenset(labels.items())))

    def events(self, outcome: str) -> int:
        """Returns `churn_events_consumed_total` for one outcome (ok, invalid, duplicate, ...)."""
        return int(self.value("churn_events_consumed_total", outcome=outcome) or 0)

    def rss_bytes(self) -> int:
        """Returns the process's resident memory now."""
        return rss_bytes(self.proc.pid)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Waits until the scorer reports ready with a champion loaded.

        Raises:
            RuntimeError: the process exited first.
            TimeoutError: it was not ready within `timeout` seconds.
        """

        def ready() -> bool:
            if self.proc.poll() is not None:
                msg = f"`churn consume` exited with {self.proc.returncode} before it was ready: {self.tail()}"
                raise RuntimeError(msg)
            return self.value("churn_model_loaded", component="scorer") == 1 and self.value("churn_scorer_ready") == 1

        wait_for(ready, timeout, f"`churn consume` to start ({self.log})", 0.2)

    def wait_consumed(
        self, total: int, timeout: float, on_sample: Callable[[float, int, Samples], None] | None = None
    ) -> Samples:
        """Samples the metrics every 0.1 s until `total` messages are consumed (every outcome,
        dead letters too); returns the last sample. `on_sample` sees (perf_counter, done, samples).

        Raises:
            RuntimeError: the process exited early.
            TimeoutError: fewer than `total` were consumed within `timeout` seconds.
        """
        last: list[Samples] = [{}]

        def done() -> bool:
            samples = last[0] = self.samples()
            count = round(sum(v for (name, _), v in samples.items() if name == "churn_events_consumed_total"))
            if on_sample is not None:
                on_sample(time.perf_counter(), count, samples)
            if count < total and self.proc.poll() is not None:
                msg = f"`churn consume` exited after {count} of {total} messages: {self.tail()}"
                raise RuntimeError(msg)
            return count >= total

        wait_for(done, timeout, f"{total} messages consumed", 0.1)
        return last[0]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (finish the batch, commit, leave the group); returns the exit code.

        Raises:
            RuntimeError: it did not exit within `timeout`; it is then killed, and the message
                ends with the stacks it dumped on SIGUSR1 (where it was stuck).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.proc.kill()
            self.proc.wait(10)
            msg = f"`churn consume` did not stop within {timeout:.0f}s after SIGTERM: {self.tail(6000)}"
            raise RuntimeError(msg) from None

    def dump_stacks(self) -> None:
        """Asks the process to write every thread's stack to its log (SIGUSR1) and gives it a moment."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)

    def log_lines(self, containing: str) -> list[str]:
        """Returns the log lines that contain `containing`."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if containing in line]

    def tail(self, chars: int = 2000) -> str:
        """Returns the end of the log."""
        return self.log.read_text(errors="replace")[-chars:]


def histogram_buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """Returns the cumulative buckets [(le, count)] of histogram `name` (one label set), sorted."""
    return sorted(
        (float(dict(labels)["le"]), value) for (sample, labels), value in samples.items() if sample == f"{name}_bucket"
    )


def train_small_champion(settings: Settings, folder: Path) -> TrainResult:
    """Trains a small real model (`SMALL_SIMULATION`: 300 users x 40 days; `SMALL_TRAIN_OPTIONS`) on a
    date-partitioned log in `folder/events`, registers it in `settings`' MLflow store and
    returns the result. The floors are lowered (ROC-AUC 0.5, PR-AUC 0): a 300-user population
    cannot promise the defaults; the result is promoted unless a better champion exists.

    Raises:
        ServiceUnavailableError: MLflow cannot be reached.
    """
    write_partitioned(simulate(SMALL_SIMULATION).events, folder / "events")
    gated = settings.model_copy(update={"gate_min_roc_auc": 0.5, "gate_min_pr_auc": 0.0})
    return train(gated, folder / "events", SMALL_TRAIN_OPTIONS)


def delete_prefix(settings: Settings, prefix: str) -> int:
    """Deletes every Redis key under `prefix` (UNLINK, 5,000 at a time); returns how many."""
    client = redis_client(settings)
    deleted = 0
    batch: list[bytes] = []
    try:
        for key in client.scan_iter(f"{prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted
