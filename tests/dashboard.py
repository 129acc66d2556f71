"""``autocomp dashboard`` as a user starts it: the console script serving a study on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.ports import free_port
from tests.test_cli import AUTOCOMP, autocomp_here, front_trials


@contextlib.contextmanager
def serving(*args: str) -> Iterator[str]:
    """Run ``autocomp dashboard ARGS`` until the block ends; yield its base URL once it answers."""
    port = free_port()
    server = subprocess.Popen([AUTOCOMP, "dashboard", *args, "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/meta", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the dashboard did not start: {server.stdout.read()}") from None
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def served_trials(url: str, study_name: str) -> list[dict]:
    """The trials the dashboard at ``url`` serves for ``study_name``."""
    studies = {s["study_name"]: s["study_id"] for s in get(f"{url}/api/studies")["study_summaries"]}
    return get(f"{url}/api/studies/{studies[study_name]}")["trials"]


def read_back_without_storage(study_yaml: Path, tmp_path: Path, capsys, dashboard: bool = True) -> None:
    """What a user types after a parallel search, the study YAML alone: pareto, export and (with ``dashboard``)
    the dashboard find its trials in the journal it ran in."""
    out, _ = autocomp_here(capsys, "pareto", str(study_yaml))
    assert "Pareto front on val_accuracy" in out
    first = front_trials(out)[0]
    out, _ = autocomp_here(capsys, "export", str(study_yaml), "--trial", str(first), "-o", str(tmp_path / "r.yaml"))
    assert f"(trial {first} of study 'quick')" in out and (tmp_path / "r.yaml").exists()
    if dashboard:
        with serving(str(study_yaml)) as url:
            served = served_trials(url, "quick")
        assert sum(t["state"] == "Complete" for t in served) == 4
