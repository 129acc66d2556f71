"""What the ``autocomp`` commands share: argument types, and the study a command names (a study YAML, or
``--storage`` and ``--study-name``), found where a parallel search moved it."""

from __future__ import annotations

import argparse
from pathlib import Path

from autocomp.errors import AutocompError


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, but got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, but got {value}")
    return value


def size(text: str) -> float:
    from autocomp.pick import size_bytes

    try:
        return size_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="Optuna storage URL (overrides the YAML's)")
    parser.add_argument("--study-name", help="study name (overrides the YAML's)")


def study_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", help="study YAML (or give --storage and --study-name)")
    storage_args(parser)


def spec_of(args: argparse.Namespace):
    """The StudySpec from the YAML, or one built from --storage/--study-name alone."""
    from autocomp.storage import located
    from autocomp.study import StudySpec

    if args.study:
        spec = StudySpec.load(args.study)
    elif args.storage and args.study_name:
        spec = StudySpec(study_name=args.study_name, task="", space="").resolved(Path.cwd())
    else:
        raise AutocompError("Name the study: give a study YAML, or both --storage and --study-name.")
    spec.study_name = args.study_name or spec.study_name
    spec.storage = args.storage or located(spec.storage, spec.study_name)  # where a parallel search moved it
    return spec


def load_of(args: argparse.Namespace):
    from autocomp.search.trials import load_study

    spec = spec_of(args)
    return spec, load_study(spec.storage, spec.study_name)
