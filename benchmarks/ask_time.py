"""The search's own cost as a study grows: seconds to ask for one trial at 100 and 1,000 stored trials.

For each sampler a study can name (``make_sampler``: the proxy-guided search, TPE multivariate, GP, NSGA-II), an
in-memory study on the digits task's compact space (``search_spaces/compact.yaml``, its student, pruning, policy,
quantization and distillation dimensions) is filled with N complete trials, then asked for ``ASKS`` more; a trial
is asked as ``autocomp search`` asks it (``study.ask()``, then every dimension suggested by ``SearchSpace.sample``).

The stored trials are drawn at random from the space, their numbers made up from their recipe (accuracy falling
with the level, size and latency with the level and the widths; a fake, since only the sampler's arithmetic is
timed here), 8 s apart, as digits trials run. The proxy sampler scores real candidates on the cheap rung (for its
15% of a trial by design): that look is reported apart from its own work (fitting its predictor, weighing the
pool).
The budget to keep: 5% of a full trial (0.4 s of digits' 8 s).

    .venv/bin/python benchmarks/ask_time.py    # about 5 minutes here
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

from autocomp.proxy import ProxyScore
from autocomp.search.objective import Objective
from autocomp.search.trials import make_sampler, prepare, study_guide
from autocomp.study import StudySpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (100, 1000)
SAMPLERS = ("proxy", "tpe", "gp", "nsga2")
ASKS = 3
TRIAL_SECONDS = 8.0  # a digits trial here (README "Search quality")
TEACHER = {"val_accuracy": 0.99, "size_bytes": 3.2e6, "latency_ms": 0.25}


def fake_metrics(recipe, rng: random.Random) -> dict[str, float]:
    """Made-up numbers that move with the recipe, as real ones do (accuracy down with the level, size and latency
    down with it and with narrower formats)."""
    level, bits = recipe.prune.sparsity or 0.5, min(recipe.quantize.bits, 32)
    scratch = recipe.student.scratch
    return {"val_accuracy": 0.99 - 0.2 * level ** 4 - 0.02 * scratch + rng.gauss(0, 0.005),
            "size_bytes": TEACHER["size_bytes"] * (1.02 - level) * bits / 32 * (0.1 if scratch else 1.0),
            "latency_ms": TEACHER["latency_ms"] * (1.02 - level) * (0.3 if recipe.quantize.activation_bits == 8 else 1)}


def filled_study(spec: StudySpec, sampler_name: str, objective: Objective, trials: int, seed: int) -> optuna.Study:
    """An in-memory study of ``trials`` complete trials drawn at random, asked from by ``sampler_name``."""
    rng = random.Random(seed)
    spec = dataclasses.replace(spec, sampler=sampler_name)
    study = optuna.create_study(directions=[spec.objectives[k] for k in spec.objectives],
                                sampler=make_sampler(spec, seed, objective))
    study.set_user_attr("teacher", TEACHER)
    drawer = optuna.create_study(directions=study.directions, sampler=optuna.samplers.RandomSampler(seed=seed))
    start = datetime.datetime(2026, 1, 1)
    for number in range(trials):
        trial = drawer.ask()
        recipe = objective.space.sample(trial, spec.task, objective.prunable, quantizable=objective.quantizable,
                                        guide=objective.guide)
        metrics = fake_metrics(recipe, rng)
        proxy = ProxyScore(metrics["val_accuracy"] - 0.3 * rng.random(), int(metrics["size_bytes"]),
                           metrics["latency_ms"] * 0.8, int(1e6 * metrics["latency_ms"]), 1000, 0.3,
                           recipe.student.scratch)
        frozen = optuna.trial.FrozenTrial(
            number=number, state=optuna.trial.TrialState.COMPLETE, value=None,
            values=[metrics[k] for k in spec.objectives],
            datetime_start=start + datetime.timedelta(seconds=TRIAL_SECONDS * number),
            datetime_complete=start + datetime.timedelta(seconds=TRIAL_SECONDS * (number + 1)),
            params=trial.params, distributions=trial.distributions,
            user_attrs={"metrics": metrics, "proxy": proxy.to_dict()}, system_attrs={}, intermediate_values={},
            trial_id=number)
        study.add_trial(frozen)
        drawer.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "study.yaml"
        study_file.write_text(f"schema_version: 1\nstudy_name: ask\ntask: digits\nspace: {ROOT}/search_spaces/"
                              f"compact.yaml\nstorage: sqlite:///{tmp}/ask.db\nobjectives: {{val_accuracy: maximize, "
                              f"size_bytes: minimize, latency_ms: minimize}}\n")
        spec = StudySpec.load(study_file)
        prepared = prepare(spec)
        space, task, prunable, quantizable = prepared.space, prepared.task, prepared.prunable, prepared.quantizable
        guide = study_guide(optuna.create_study(), space, task, prunable, progress=False)
        rows = []
        for size in SIZES:
            for name in args.samplers:
                objective = Objective(spec, space, task, None, prunable, quantizable, 0, guide)
                study = filled_study(spec, name, objective, size, seed=0)
                scoring = [0.0]
                if name == "proxy":  # its look at candidates (scoring them, bounded by its share), counted apart
                    sampler = study.sampler
                    grow = sampler._grow

                    def timed(*args, grow=grow, scoring=scoring):
                        begun = time.perf_counter()
                        try:
                            return grow(*args)
                        finally:
                            scoring[0] += time.perf_counter() - begun

                    sampler._grow = timed
                own, scored = [], []
                for _ in range(ASKS + (1 if name == "proxy" else 0)):  # the proxy's first ask fills its pool
                    scoring[0] = 0.0
                    begun = time.perf_counter()
                    trial = study.ask()
                    space.sample(trial, spec.task, prunable, quantizable=quantizable, guide=guide)
                    total = time.perf_counter() - begun
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    own.append(total - scoring[0])
                    scored.append(scoring[0])
                if name == "proxy":
                    own, scored = own[1:], scored[1:]
                row = {"sampler": name, "trials": size, "ask_s": round(statistics.median(own), 3),
                       "scoring_s": round(statistics.median(scored), 3),
                       "share_of_trial": round(statistics.median(own) / TRIAL_SECONDS, 4)}
                rows.append(row)
                print(row, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ask_time.json"
    kept = [r for r in json.loads(path.read_text()) if r["sampler"] not in args.samplers] if path.exists() else []
    rows = sorted(kept + rows, key=lambda r: (r["trials"], SAMPLERS.index(r["sampler"])))  # others' rows kept
    path.write_text(json.dumps(rows, indent=1))
    lines = ["| sampler | stored trials | ask s (own) | cheap-rung scoring s | own / 8 s trial |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['trials']} | {r['ask_s']:.3f} | {r['scoring_s']:.3f} | "
              f"{100 * r['share_of_trial']:.1f}% |" for r in rows]
    (RESULTS / "ask_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
