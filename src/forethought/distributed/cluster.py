"""`--ray ADDRESS|auto|local:N`: connect to a Ray cluster, or start a private one on this machine.

Ray is imported only inside these functions, so a run without `--ray` never loads it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from forethought.errors import ForethoughtError

# A private local cluster keeps its shared-memory object store small: shards pass through it one at a time per
# worker, and Ray spills to disk beyond it rather than failing.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# Ray binds a private cluster to the machine's reachable address unless told it is a single-node setup; with this
# set to 0 every Ray process listens on 127.0.0.1 only (its switch for laptops, honoured on Linux too).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# An unreachable cluster is refused within these (together under 30 s), not after Ray's minutes of retries.
CONNECT_SECONDS = 5.0
PROBE_SECONDS = 20.0
INSTALL_HINT = 'Ray is not installed: pip install "forethought[ray]"'


@dataclass(frozen=True)
class RaySpec:
    """Where to run: an existing cluster (`address`: "auto", "host:port" or "ray://host:port"), or `local_workers`."""

    address: str | None = None
    local_workers: int | None = None

    def describe(self) -> str:
        return f"local:{self.local_workers}" if self.local_workers else str(self.address)


def parse_ray_spec(text: str) -> RaySpec:
    """'auto' | 'local:N' | an address ('10.0.0.5:6379', 'ray://head:10001')."""
    text = text.strip()
    if text.startswith("local"):
        m = re.fullmatch(r"local:(\d+)", text)
        if not m or int(m.group(1)) < 1:
            raise ForethoughtError(f"--ray {text!r}: use local:N with N >= 1 workers, auto, or a cluster address")
        workers, cpus = int(m.group(1)), os.cpu_count() or 1
        if workers > cpus:  # one worker per CPU: more only queue (and each holds a model copy in memory)
            raise ForethoughtError(f"--ray {text}: this machine has {cpus} CPUs; use local:N with N <= {cpus}")
        return RaySpec(local_workers=workers)
    m = re.fullmatch(r"(ray://)?([\w.\-\[\]:]+):(\d+)", text)
    if m and not 1 <= int(m.group(3)) <= 65535:
        raise ForethoughtError(f"--ray {text!r}: port {m.group(3)} is not in 1..65535")
    if text == "auto" or m:
        return RaySpec(address=text)
    raise ForethoughtError(f"--ray {text!r}: use auto, local:N, or a cluster address like 10.0.0.5:6379")


def check_reachable(address: str, timeout: float = CONNECT_SECONDS, probe: bool = True) -> None:
    """A cluster address must answer a TCP connection within `timeout`: Ray's own connect retries for minutes
    against a port nobody listens on, so an unreachable address is refused here, in seconds, with one line."""
    m = re.fullmatch(r"(?:ray://)?\[?([\w.\-:]+?)\]?:(\d+)", address)
    if address == "auto" or m is None:
        return  # auto: Ray finds the cluster this node joined (and says quickly when there is none)
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ForethoughtError(f"--ray {address}: cannot connect ({why}); is a Ray head running there?") from None
    if probe:
        _probe_in_child(address)


def _probe_in_child(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Connect once from a child process: something that accepts TCP but is not a Ray head makes Ray retry
    for minutes and then end the whole process from C++, which no `except` here could turn into one line."""
    code = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); ray.shutdown()"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        raise ForethoughtError(
            f"--ray {address}: no Ray cluster answered within {timeout:.0f} s (something listens there, not Ray?)"
        ) from None
    if done.returncode != 0:
        lines = [x.strip() for x in done.stderr.splitlines() if x.strip()]
        last = lines[-1][:200] if lines else f"exit code {done.returncode}"
        raise ForethoughtError(f"--ray {address}: not a reachable Ray cluster ({last})")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ForethoughtError(INSTALL_HINT) from None
    return ray


@contextmanager
def ray_session(spec: RaySpec | None) -> Iterator[object]:
    """The `ray` module, connected. `None` means: use the session this process already holds (tests, notebooks).

    A `local:N` cluster is private to this run: N worker CPUs, loopback only, no dashboard, shut down after.
    A cluster given by address is only connected to (and disconnected from); it keeps running.
    """
    if spec is not None and spec.local_workers:
        os.environ.setdefault(LOOPBACK_ENV, "0")  # must precede `import ray`: Ray reads it at import
    ray = import_ray()
    if spec is None or ray.is_initialized():
        if not ray.is_initialized():
            raise ForethoughtError("no Ray session: give --ray auto, an address, or local:N")
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
    options: dict = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if spec.local_workers:
        options |= {
            "num_cpus": spec.local_workers,
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
            "include_dashboard": False,
        }
    else:
        options["address"] = spec.address
        check_reachable(spec.address, probe=False)  # the CLI probed it fully before any work (dispatch)
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ForethoughtError(f"--ray {spec.describe()}: cannot connect ({first})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray) -> int:
    """CPUs the cluster offers: one worker task runs per CPU."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def worker_name(ray) -> str:
    """node-ip:pid of the calling worker process: the key of per-worker throughput."""
    return f"{ray.util.get_node_ip_address()}:{os.getpid()}"
