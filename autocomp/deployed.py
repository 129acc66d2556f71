"""A compressed model in a user's own code: ``autocomp.load(DIR_OR_RECIPE)`` gives the deployed ONNX artifact in
an ONNX Runtime session that takes numpy or torch and gives logits.

    model = autocomp.load("recipe.yaml")   # `autocomp export`'s recipe, its artifact beside it
    logits = model(x)                      # numpy (batch, classes), whatever the batch size
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from autocomp import runtime
from autocomp.cache import sha256
from autocomp.errors import AutocompError
from autocomp.pipeline import ARTIFACT


class Deployed:
    """The artifact at ``path`` in an ONNX Runtime CPU session (``threads`` intra-op threads)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = runtime.session(self.path, threads=threads)
        self.input = self.session.get_inputs()[0]

    def __call__(self, x) -> np.ndarray:
        """Logits of a batch ``x`` (numpy or a torch tensor, the task's input shape with a batch axis first)."""
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float32)
        expected = len(self.input.shape)
        if x.ndim != expected:
            raise AutocompError(f"the model takes inputs of {expected} axes {self.input.shape} (batch first), "
                                f"but got shape {tuple(x.shape)}.")
        return runtime.run(self.session, x)

    def predict(self, x) -> np.ndarray:
        """The class of each example of ``x``."""
        return self(x).argmax(axis=1)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def __repr__(self) -> str:
        return f"Deployed({str(self.path)!r}, {self.size_bytes:,} bytes, input {self.input.shape})"


def load(source: str | Path, threads: int = 1, progress: bool = False) -> Deployed:
    """The compressed model of ``source``: a folder holding ``model.onnx`` (``autocomp apply -o``), an ``.onnx``
    file, or a recipe YAML. A recipe from ``autocomp export`` names the artifact it wrote beside it and its digest;
    any other recipe (or one whose artifact is gone or changed) is rebuilt by ``autocomp.apply``, which trains."""
    path = Path(source)
    if path.is_dir():
        path = path / ARTIFACT
    if not path.exists():
        raise AutocompError(f"autocomp.load needs a folder with {ARTIFACT}, an .onnx file or a recipe YAML, "
                            f"but {str(path)!r} does not exist.")
    if path.suffix.lower() in (".yaml", ".yml"):
        path = _artifact_of(path, progress)
    return Deployed(path, threads)


def _artifact_of(recipe_path: Path, progress: bool) -> Path:
    """The artifact ``autocomp export`` wrote beside the recipe (its digest checked), or the recipe rebuilt."""
    from autocomp.methods import load_recipe
    from autocomp.pipeline import apply
    from autocomp.tasks.load import load_task

    recipe = load_recipe(recipe_path)
    exported = recipe.provenance.get("artifact", {})
    name = str(exported.get("file", ""))
    if name and (Path(name).name != name or name in (".", "..")):
        raise AutocompError(f"`recipe.provenance.artifact.file` must name a file beside the recipe, but got "
                            f"{name!r}.")
    beside = recipe_path.parent / name
    if name and beside.is_file() and sha256(beside.read_bytes()) == exported.get("sha256"):
        return beside
    out = Path(tempfile.mkdtemp(prefix="autocomp-load-"))
    return apply(recipe, load_task(recipe.task), out, progress=progress).artifact
