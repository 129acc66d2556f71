"""A Ray cluster on this machine, started and stopped around the tests and benchmarks that need one."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.ports import free_port


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """A Ray cluster of ``nodes`` nodes on 127.0.0.1 of this machine (``ray start``: a head, then nodes joining
    it), without Ray's dashboard or usage statistics, for tests and benchmarks; yields its address and stops
    every Ray process of this machine after. Token authentication follows the environment (RAY_AUTH_MODE)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = free_port()
    common = ["--num-cpus", str(cpus_per_node), "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def ray_command(*args: str) -> None:
        done = subprocess.run([ray_cli, *args], capture_output=True, text=True, timeout=180, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"ray {args[0]} {args[1]} failed: {done.stderr[-3000:]}")

    try:
        ray_command("start", "--head", "--port", str(port), "--include-dashboard=false", *common)
        for _ in range(nodes - 1):
            ray_command("start", "--address", f"127.0.0.1:{port}", *common)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=180, env=env)
