"""The dashboard a user opens after a search: ``autocomp dashboard`` on a finished study, read in headless Chromium
(Debian's ``chromium``, which ``make test`` installs where it can): the Pareto plot holds the front ``autocomp
pareto`` lists, and a trial shows its note and flat attributes."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna_dashboard import get_note

from autocomp.storage import open_storage
from tests.dashboard import get, serving
from tests.test_cli import autocomp_here, front_trials

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAT = ("val_accuracy_pct", "test_accuracy_pct", "val_drop_pp", "test_drop_pp", "size_kb", "compression_x",
        "latency_ms", "speedup_x", "latency_noisy", "macs_m", "params", "student", "feasible")


def chromium(url: str, tmp_path: Path, *how: str) -> str:
    """Open ``url`` in headless Chromium until its scripts settle; its stdout (``--dump-dom``: the rendered DOM)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--window-size=1400,1000", "--virtual-time-budget=20000",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *how, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def text_of(dom: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def pareto_traces(dom: str) -> list[int]:
    """The points of each scatter trace of the dashboard's Pareto-front plot, in its order: the unselected,
    infeasible and dominated trials, then the best trials (optuna-dashboard 0.21's order)."""
    plot = dom[dom.index('id="graph-pareto-front"'):]
    plot = plot[:plot.index('id="plot-history"')]
    return [trace.count('class="point"') for trace in plot.split('<g class="trace scatter')[1:]]


@pytest.mark.slow
def test_the_dashboard_shows_the_front_and_each_trials_note_and_numbers(searched_e2e, tmp_path, capsys):
    study_yaml, _ = searched_e2e  # the end-to-end test's study, searched once
    study = optuna.load_study(storage=open_storage(f"sqlite:///{study_yaml.parent / 'e2e.db'}"), study_name="e2e")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    for trial in complete:  # flat scalar attributes (the dashboard sorts numbers) beside the full recipe
        assert set(FLAT) <= trial.user_attrs.keys() and "recipe" in trial.user_attrs
        assert trial.user_attrs["size_kb"] == pytest.approx(trial.user_attrs["metrics"]["size_bytes"] / 1e3)
        note = get_note(optuna.Trial(study, trial._trial_id))
        assert note.startswith(f"## Trial {trial.number}: ") and "| validation accuracy |" in note
    assert get_note(study).startswith("## e2e\n") and "Trials: " in get_note(study)
    out, _ = autocomp_here(capsys, "pareto", str(study_yaml))
    listed = front_trials(out)
    if CHROMIUM is None:
        pytest.skip("no headless browser: Debian's `chromium` package is not installed (scripts/os_packages.sh "
                    "installs it as root)")

    with serving(str(study_yaml)) as url:
        study_id = {s["study_name"]: s["study_id"] for s in get(f"{url}/api/studies")["study_summaries"]}["e2e"]
        page = f"{url}/dashboard/studies/{study_id}"
        traces = pareto_traces(chromium(page, tmp_path, "--dump-dom"))
        assert traces[-1] == len(listed) and sum(traces) == len(complete), traces
        shown = listed[0]
        trial_page = text_of(chromium(f"{page}/trials?numbers={shown}", tmp_path, "--dump-dom"))
        headline = get_note(optuna.Trial(study, study.trials[shown]._trial_id)).splitlines()[0].lstrip("# ")
        assert headline in trial_page  # the note, rendered
        attrs = study.trials[shown].user_attrs
        assert f"val_accuracy_pct {attrs['val_accuracy_pct']:g}" in trial_page
        assert f"size_kb {attrs['size_kb']:g}" in trial_page
        shot = tmp_path / "dashboard.png"
        chromium(page, tmp_path, f"--screenshot={shot}")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    print(f"dashboard screenshot: {shot}")
