"""The commands that read a finished study: ``pareto``, ``compare`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autocomp.cli.args import load_of, positive_float, size, study_source
from autocomp.errors import AutocompError

EXPORT_RULES = ("Write a trial's recipe and its artifact. Name the trial (--trial N), take the front's knee (--knee), "
                "or pick by rule: caps (--max-drop PP, --max-size SIZE, --max-latency MS) and what to minimise or "
                "maximise among the trials within them (default: the largest val_accuracy). For example "
                "`--max-drop 1.0 --minimize latency_ms` or `--max-size 50KB --maximize val_accuracy`. Trials are "
                "chosen on validation; where none is within the caps, the closest are named.")


def add_commands(commands) -> None:
    """Add ``pareto``, ``compare`` and ``export`` to the ``autocomp`` parser's subcommands."""
    pareto = commands.add_parser("pareto", help="print a study's Pareto-optimal trials, hypervolume and knee")
    study_source(pareto)
    pareto.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    pareto.add_argument("--plot", type=Path, metavar="OUT.html|OUT.png|OUT.svg",
                        help="plot accuracy against size and latency, every complete trial, the front highlighted")
    pareto.add_argument("--json", action="store_true", help="print the front and its analysis as JSON")
    pareto.set_defaults(run=_pareto)

    compare = commands.add_parser("compare", help="studies side by side: hypervolume, best within 1 pp, fronts")
    compare.add_argument("studies", nargs="+", metavar="STUDY",
                         help="study YAMLs, or study names in --storage (e.g. two samplers' studies)")
    compare.add_argument("--storage", help="the storage of the studies named without a YAML")
    compare.add_argument("--plot", type=Path, metavar="OUT.html|OUT.png|OUT.svg", help="every study's front")
    compare.add_argument("--json", action="store_true", help="print JSON instead of the table")
    compare.set_defaults(run=_compare)

    export = commands.add_parser("export", help="write a trial's recipe (and its artifact) to YAML, by number "
                                                "or by rule", description=EXPORT_RULES)
    study_source(export)
    which = export.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="trial number (see `autocomp pareto`)")
    which.add_argument("--knee", action="store_true", help="the front's knee (see `autocomp pareto`)")
    export.add_argument("--max-drop", type=float, metavar="PP", help="at most this drop in validation accuracy")
    export.add_argument("--max-size", type=size, metavar="SIZE", help="at most this size, e.g. 50KB or 1.5MB")
    export.add_argument("--max-latency", type=positive_float, metavar="MS", help="at most this latency (ms)")
    best = export.add_mutually_exclusive_group()
    best.add_argument("--minimize", metavar="METRIC", help="of the trials within the caps, the smallest METRIC")
    best.add_argument("--maximize", metavar="METRIC", help="... the largest METRIC (default: val_accuracy)")
    export.add_argument("-o", "--output", type=Path, required=True, help="recipe YAML to write (the artifact "
                                                                          "goes beside it, .onnx)")
    export.set_defaults(run=_export)


def print_front(study, csv: Path | None = None):
    """Print the study's front table and its analysis (and write the table to ``csv``); return the table."""
    from autocomp.pareto import complete_metrics, format_report, format_table, front_table, report, teacher_of

    teacher = teacher_of(study)
    table = front_table(study)
    print(format_table(table, teacher, study.metric_names or []))
    print(format_report(report(study, table), complete_metrics(study)))
    if csv is not None:
        table.to_csv(csv, index=False)
        print(f"wrote {csv}")
    return table


def _pareto(args: argparse.Namespace) -> int:
    from autocomp.pareto import front_table, report, series
    from autocomp.plot import check_path, front_plot

    if args.plot:
        check_path(args.plot)
    spec, study = load_of(args)
    if args.json:
        table = front_table(study)
        print(json.dumps(report(study, table), indent=2, default=float))
    else:
        table = print_front(study, args.csv)
    if args.plot:
        path = front_plot([series(study, table)], args.plot, f"study {spec.study_name!r}: validation accuracy")
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from autocomp.pareto import compare_table, front_table, report, series
    from autocomp.plot import check_path, front_plot

    if args.plot:
        check_path(args.plot)
    studies = [_named_study(source, args.storage) for source in args.studies]
    tables = [front_table(study) for study in studies]
    reports = [report(study, table) for study, table in zip(studies, tables, strict=True)]
    if args.json:
        print(json.dumps(reports, indent=2, default=float))
    else:
        print(compare_table(reports, studies, tables))
    if args.plot:
        path = front_plot([series(s, table) for s, table in zip(studies, tables, strict=True)], args.plot,
                          f"{' vs '.join(s.study_name for s in studies)}: validation accuracy")
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _named_study(source: str, storage: str | None):
    """A study of ``compare``: a study YAML (its storage, as the other commands find it), or a name in
    ``storage``."""
    from autocomp.search.trials import load_study
    from autocomp.storage import located
    from autocomp.study import StudySpec

    if Path(source).suffix in (".yaml", ".yml") or Path(source).is_file():
        spec = StudySpec.load(source)
        return load_study(storage or located(spec.storage, spec.study_name), spec.study_name)
    if storage is None:
        raise AutocompError(f"STUDY must be a study YAML, or a study name with --storage, but got {source!r} "
                            "without --storage.")
    return load_study(storage, source)


def _export(args: argparse.Namespace) -> int:
    from autocomp.pareto import complete_metrics, export_recipe, front_table, report
    from autocomp.pick import CAPS, Rule, pick

    caps = {metric: getattr(args, option) for option, metric in CAPS.items() if getattr(args, option) is not None}
    ranked = (args.minimize, "minimize") if args.minimize else (args.maximize, "maximize") if args.maximize else None
    if (args.trial is not None or args.knee) and (caps or ranked):
        raise AutocompError("--trial and --knee name the trial; the rule options (--max-*, --minimize, --maximize) "
                            "pick one: give one or the other.")
    if args.trial is None and not args.knee and not (caps or ranked):
        raise AutocompError("Say which trial to export: --trial N, --knee, or a rule such as --max-drop 1.0 "
                            "--minimize latency_ms (autocomp export --help).")
    rule = Rule(caps, ranked or ("val_accuracy", "maximize")) if caps or ranked else None  # checked first
    spec, study = load_of(args)
    number, why = args.trial, "named with --trial"
    if args.knee:
        number, why = report(study, front_table(study))["knee"], "the knee of the validation front (autocomp pareto)"
        if number is None:
            raise AutocompError(f"Study {spec.study_name!r} has no complete trial, so no knee.")
    elif rule is not None:
        number, why = pick(complete_metrics(study), rule, spec.study_name)
    recipe = export_recipe(study, number, args.output, spec.storage, spec.artifacts)
    artifact = recipe.provenance.get("artifact", {}).get("file")
    print(f"trial {number}: {why}")
    print(f"wrote {args.output}{f' and its artifact {artifact}' if artifact else ''} "
          f"(trial {number} of study {spec.study_name!r})")
    return 0
