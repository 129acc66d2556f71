"""A PostgreSQL server from the OS packages on 127.0.0.1 of this machine, started and stopped around the tests and
benchmarks that need one (as the ``postgres`` user when they run as root, which PostgreSQL refuses)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.ports import free_port

PACKAGE_MISSING = "needs the OS package postgresql (PostgreSQL's server, not found under /usr/lib/postgresql)"


def bindir() -> Path | None:
    """PostgreSQL's programs, or None where its server is not installed (scripts/os_packages.sh installs it)."""
    found = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    return found if found is not None and shutil.which("pg_ctl", path=str(found)) else None


class Server:
    """A running server: ``database(name)`` creates a database and gives its URL; ``restart()`` restarts it
    (every connection is dropped)."""

    def __init__(self, programs: Path, data: Path, port: int) -> None:
        self.programs, self.data, self.port = programs, data, port
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.programs / program), *args], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program}: {done.stderr[-2000:]}")

    def database(self, name: str) -> str:
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "autocomp", name)
        return f"postgresql://autocomp@127.0.0.1:{self.port}/{name}"

    def pg_ctl(self, action: str, *args: str) -> None:
        self.run("pg_ctl", "-D", str(self.data / "db"), "-l", str(self.data / "log"), "-w", action, *args)

    def start(self) -> None:
        self.pg_ctl("start", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.data} -c max_connections=300")

    def restart(self, down: float = 0.0) -> None:
        """``pg_ctl restart``; with ``down`` seconds, stopped for that long first (``pg_ctl stop``, then ``start``)."""
        if not down:
            self.pg_ctl("restart", "-m", "fast")
            return
        self.pg_ctl("stop", "-m", "fast")
        time.sleep(down)
        self.start()


@contextlib.contextmanager
def local_server() -> Iterator[Server]:
    """A fresh server in a temporary folder, on a free port of 127.0.0.1, stopped and removed after."""
    programs = bindir()
    if programs is None:
        raise FileNotFoundError(PACKAGE_MISSING)
    data = Path(tempfile.mkdtemp(prefix="autocomp-postgres-"))  # under /tmp: reachable by the postgres user
    port = free_port()
    server = Server(programs, data, port)
    if server.as_user:
        shutil.chown(data, "postgres")
    server.run("initdb", "-D", str(data / "db"), "-U", "autocomp", "--auth=trust")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.pg_ctl("stop", "-m", "fast")
        shutil.rmtree(data, ignore_errors=True)
