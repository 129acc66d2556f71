"""Security basics, read from autocomp's own source: checkpoints load with ``weights_only=True``, YAML with the safe
loader, nothing is unpickled, and the dashboard binds 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ast
from pathlib import Path

from autocomp.cli import _parser

SOURCE = sorted((Path(__file__).parents[1] / "autocomp").rglob("*.py"))


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of ``name`` (a dotted name such as ``torch.load``) in autocomp's modules."""
    found = []
    for path in SOURCE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                found.append((path, node))
    return found


def test_checkpoints_load_weights_only_and_yaml_safely_and_nothing_is_unpickled():
    loads = calls("torch.load")
    assert loads, "the teacher cache loads checkpoints: this check must see that call"
    for path, call in loads:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("weights_only") == "True", f"{path}:{call.lineno} loads a checkpoint without weights_only"
    for unsafe in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads", "dill.load"):
        assert not calls(unsafe), f"{unsafe} in {[f'{p}:{c.lineno}' for p, c in calls(unsafe)]}"
    assert calls("yaml.safe_load")


def test_the_dashboard_binds_loopback_unless_told_otherwise():
    args = _parser().parse_args(["dashboard", "study.yaml"])
    assert args.host == "127.0.0.1"
