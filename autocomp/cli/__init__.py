"""The ``autocomp`` command: search | sensitivity | pareto | export | apply | methods | dashboard."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autocomp.cli.args import positive, positive_float, spec_of, storage_args, study_source
from autocomp.cli.study import add_commands, print_front
from autocomp.errors import AutocompError

EXIT_FAILED, EXIT_USAGE = 1, 2
DESCRIPTION = ("Search how to compress a trained PyTorch model (pruning, quantization, distillation, the student's "
               "architecture), read the Pareto front, export a trial's recipe and apply it again.")


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line naming the command's help (not the usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except AutocompError as err:
        if args.debug:
            raise
        print(f"autocomp: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("autocomp: interrupted; finished trials are stored.", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="autocomp", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    search = commands.add_parser("search", help="run (or continue) a compression search")
    search.add_argument("study", help="study YAML, e.g. studies/digits.yaml")
    storage_args(search)
    search.add_argument("--trials", type=positive, help="total finished trials wanted (default: the YAML's)")
    search.add_argument("--timeout", type=positive, help="seconds after which no new trial starts (default: the "
                                                          "YAML's `timeout`, else none)")
    search.add_argument("--seed", type=int, help="sampler and training seed (default: the YAML's)")
    search.add_argument("--workers", type=positive, default=1,
                        help="processes running trials side by side on this machine (default 1; with the YAML's "
                             "SQLite storage, the study then lives in a journal file beside it)")
    search.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="where trials run: processes of this machine (default), or Ray Tune trials on a Ray "
                             "cluster (pip install 'autocomp[ray]'; README 'On a Ray cluster')")
    search.add_argument("--address", help="with --backend ray: the cluster to join, 'auto' or HOST:PORT (default: "
                                          "a Ray of this machine, started for this search)")
    search.add_argument("--max-concurrent", type=positive,
                        help="with --backend ray: trials at once (default: as many as the cluster's CPUs allow)")
    search.add_argument("--cpus-per-trial", type=positive_float, default=1.0,
                        help="with --backend ray: CPUs each trial reserves (default 1)")
    search.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    search.add_argument("--dry-run", action="store_true",
                        help="check the study, its space and its task, say what would run, and store nothing")
    search.set_defaults(run=_search)

    sensitivity = commands.add_parser("sensitivity", help="the teacher's sensitivity map, stored with the study")
    sensitivity.add_argument("study", help="study YAML, e.g. studies/digits.yaml")
    storage_args(sensitivity)
    sensitivity.add_argument("--png", type=Path, help="heat map to write (default: <study>_sensitivity.png beside "
                                                      "the study's artifacts)")
    sensitivity.add_argument("--recompute", action="store_true",
                             help="analyse again even if the study or the cache has a map")
    sensitivity.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sensitivity.set_defaults(run=_sensitivity)

    add_commands(commands)

    apply = commands.add_parser("apply", help="rebuild and measure the artifact of a recipe")
    apply.add_argument("recipe", type=Path, help="recipe YAML (from `autocomp export`)")
    apply.add_argument("-o", "--output", type=Path, required=True, help="folder for model.onnx and metrics.json")
    apply.add_argument("--allow-other-teacher", action="store_true",
                       help="replay even if the task's teacher or data differ from the recipe's (digests)")
    apply.add_argument("--verify", action="store_true",
                       help="exit 1 unless the replay reproduces the recorded accuracies and size exactly and the "
                            "latency ratio to the teacher within 10%%")
    apply.add_argument("--dry-run", action="store_true",
                       help="check the recipe against its task's model, say what it builds, and write nothing")
    apply.set_defaults(run=_apply)

    methods = commands.add_parser("methods", help="list every compression method and task, by family")
    methods.add_argument("--json", action="store_true", help="print JSON instead of text")
    methods.set_defaults(run=_methods)

    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard for a study's storage")
    study_source(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.set_defaults(run=_dashboard)
    return parser


def _ray_options(args: argparse.Namespace):
    """The Ray options of ``search``, or None for the local backend (Ray options there are an error)."""
    given = [f"--{name.replace('_', '-')}" for name in ("address", "max_concurrent")
             if getattr(args, name) is not None] + (["--cpus-per-trial"] if args.cpus_per_trial != 1.0 else [])
    if args.backend == "local":
        if given:
            raise AutocompError(f"{given[0]} is an option of --backend ray, but the backend is 'local'.")
        return None
    if args.workers > 1:
        raise AutocompError(f"--workers runs local processes; with --backend ray use --max-concurrent, "
                            f"but got --workers {args.workers}.")
    try:
        from autocomp.search.ray_runner import RayOptions
    except ImportError as err:
        raise AutocompError(f"--backend ray needs Ray Tune ({err}): pip install 'autocomp[ray]'.") from None
    return RayOptions(args.address, args.max_concurrent, args.cpus_per_trial)


def _search(args: argparse.Namespace) -> int:
    from autocomp.search.optuna_runner import run_search
    from autocomp.search.trials import failure, summary
    from autocomp.storage import move_to_shared

    spec = spec_of(args)
    ray = _ray_options(args)
    if args.dry_run:
        return _search_dry_run(spec)
    if (args.workers > 1 or ray) and not args.storage and spec.storage.startswith("sqlite:///"):
        sqlite, spec.storage = spec.storage, move_to_shared(spec.storage, spec.study_name)
        who = f"{args.workers} workers" if ray is None else "Ray Tune's trials"
        print(f"autocomp: {who} share the study in {spec.storage} (SQLite serves one process; trials of "
              f"{sqlite} copied); pareto, export and dashboard on the study YAML read it there")
    study, trials = run_search(spec, trials=args.trials, seed=args.seed, progress=not args.no_progress,
                               timeout=args.timeout, workers=args.workers, ray=ray)
    for trial in trials:
        if trial.state.name == "FAIL":
            print(f"trial {trial.number} failed: {failure(trial)}")
    print_front(study)
    print(summary(trials))
    if trials and all(t.state.name == "FAIL" for t in trials):
        print("autocomp: error: every trial of this run failed (reasons above).", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _search_dry_run(spec) -> int:
    from autocomp.search.trials import prepare

    prepared = prepare(spec)
    for line in prepared.narrowed:
        print(f"autocomp: {line}")
    dimensions = prepared.space.dimensions(prepared.prunable, spec.task, prepared.quantizable)
    print(f"study {spec.study_name!r}: task {spec.task!r} ({len(prepared.prunable)} prunable layers), space "
          f"{spec.space} ({len(dimensions)} dimensions), {spec.trials} trials by {spec.sampler}, objectives "
          f"{dict(spec.objectives)}, storage {spec.storage}; dry run: nothing stored")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from autocomp.search.optuna_runner import sensitivity_of

    spec = spec_of(args)
    result = sensitivity_of(spec, recompute=args.recompute, progress=not args.no_progress)
    print(result.table())
    png = result.heat_map(args.png or Path(spec.artifacts).parent / f"{spec.study_name}_sensitivity.png")
    print(f"\nstored with study {spec.study_name!r} in {spec.storage}; wrote {png}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    import tempfile

    from autocomp.config import in_file
    from autocomp.measure import with_ratios
    from autocomp.methods import load_recipe
    from autocomp.pipeline import RECIPE, apply, teacher_baseline
    from autocomp.search.trials import fingerprint_mismatch
    from autocomp.tasks.load import load_task

    with in_file(args.recipe):  # an error of the recipe's task or layers names the file
        recipe = load_recipe(args.recipe)
        task = load_task(recipe.task)
        if args.dry_run:
            return _apply_dry_run(recipe, task, args.recipe)
    if args.verify and not recipe.provenance.get("metrics"):  # said before the run, not after it
        raise AutocompError("--verify compares with the metrics an exported recipe records (provenance.metrics), "
                            "but this recipe has none: verify a recipe `autocomp export` wrote.")
    mismatch = fingerprint_mismatch(recipe.provenance.get("fingerprint"), task.fingerprint(),
                                    f"recipe {str(args.recipe)!r}")
    if mismatch and not args.allow_other_teacher:
        raise AutocompError(mismatch)
    if mismatch:
        print("autocomp: warning: the recipe was made for another teacher or other data (--allow-other-teacher).")
    with tempfile.TemporaryDirectory() as tmp, in_file(args.recipe):  # a refusal of the run names the file too
        baseline = teacher_baseline(task, recipe.measure, tmp, recorded=recipe.provenance.get("teacher"))
        result = apply(recipe, task, args.output, reference=baseline.artifact)
    metrics = with_ratios(result.metrics, baseline.metrics)
    (args.output / "metrics.json").write_text(json.dumps({**metrics, "kernels": result.kernels,
                                                          "layer_kernels": result.layer_kernels,
                                                          "fp32_layers": result.fp32_layers}, indent=2))
    trial = recipe.provenance.get("metrics", {})
    for key in ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms", "compression_ratio", "speedup"):
        was = f"   (trial: {trial[key]:.6g})" if key in trial else ""
        print(f"{key:>18}: {metrics[key]:.6g}{was}")
    print(f"{'latency spread':>18}: p10 {metrics['latency_p10_ms']:.4g} ms, p90 {metrics['latency_p90_ms']:.4g} ms, "
          f"ratio to teacher {metrics['latency_ratio']:.4g} +- {100 * metrics['latency_ratio_ci']:.2g}%"
          f"{' (noisy)' if metrics['latency_noisy'] else ''}")
    print(f"{'kernels':>18}: {', '.join(f'{op} x{n}' for op, n in result.kernels.items())}")
    print(f"{'layers':>18}: {', '.join(f'{layer} {op}' for layer, op in result.layer_kernels.items())}")
    for layer, why in result.fp32_layers.items():
        print(f"{'stays fp32':>18}: {layer}: {why}")
    print("the search ranked trials on val_accuracy; test_accuracy is reported only")
    print(f"wrote {result.artifact}, {args.output / 'metrics.json'} and {args.output / RECIPE}")
    return _verified(metrics, trial) if args.verify else 0


def _verified(metrics: dict, recorded: dict) -> int:
    """``apply --verify``: 0 where the replay reproduces the recipe's recorded metrics, else 1, said line by line."""
    from autocomp.measure import replay_differences

    differences = replay_differences(metrics, recorded)
    for line in differences:
        print(f"autocomp: verify: {line}", file=sys.stderr)
    print("verify: " + ("the replay differs from the recorded trial" if differences else
                        "the replay reproduces the recorded accuracies and size exactly, the latency ratio within "
                        "10%"))
    return EXIT_FAILED if differences else 0


def _apply_dry_run(recipe, task, path: Path) -> int:
    from autocomp.features import layer_names
    from autocomp.pipeline import checked_mode, distillation_pairs, restructured

    student, facts = restructured(recipe, task)
    checked_mode(recipe, task)
    distillation_pairs(recipe, task, facts.prunable, set(layer_names(student)))  # what the mode needs of them
    print(f"recipe {str(path)!r}: task {recipe.task!r}, student {recipe.student.family!r} "
          f"({sum(p.numel() for p in student.parameters()):,} parameters before pruning), "
          f"{len(recipe.prune.layers)} pruned layer(s); dry run: nothing written")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from autocomp.methods import catalogue

    methods = catalogue()
    if args.json:
        print(json.dumps(methods, indent=2))
        return 0
    for family, entries in methods.items():
        print(f"{family}:")
        for entry in entries:
            print(f"  {entry['name']:<15} {entry['description']}")
    print('\nuser tasks: task: "package.module:function" returning an autocomp.tasks.Task')
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    from autocomp.storage import open_storage

    spec = spec_of(args)
    Path(spec.artifacts).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port} for {spec.storage} (Ctrl-C stops it)")
    run_server(open_storage(spec.storage), host=args.host, port=args.port,
               artifact_store=FileSystemArtifactStore(spec.artifacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
