"""A search space's dimensions: the values one dimension may take (``Param``), and the names of the dimensions a
space gives each layer (``layer_dimension``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autocomp.errors import ConfigError

# per-layer fields of a section whose space lists the choices for every layer: (class, field) -> rule
PER_LAYER = {("Quantize", "layers"): "bits", ("Quantize", "activation_layers"): "activation_bits"}
# section -> the per-layer dimensions it holds, named ``<section>.<layer>.<rule>`` (``layer_dimension``)
LAYER_RULES = {"prune": ("share",), "quantize": tuple(PER_LAYER.values())}


def layer_dimension(section: str, layer: str, rule: str) -> str:
    """The name of one layer's own dimension: its share of the level (``prune``, ``share``) or its weight or
    activation bits (``quantize``)."""
    return f"{section}.{layer}.{rule}"


def per_layer(name: str) -> tuple[str, str] | None:
    """(layer, rule) of a dimension ``layer_dimension`` named, else None (a layer's name may hold dots)."""
    section, _, rest = name.partition(".")
    layer, _, rule = rest.rpartition(".")
    return (layer, rule) if layer and rule in LAYER_RULES.get(section, ()) else None


@dataclass(frozen=True)
class Param:
    """One searchable value. In the YAML: a scalar (fixed), a list (a categorical choice), or a mapping
    ``{low, high, step?, log?}`` (an int range when low and high are ints, else a float range)."""

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @classmethod
    def parse(cls, spec: Any, path: str) -> Param:
        if isinstance(spec, list):
            if not spec:
                raise ConfigError("must list at least one choice, but got [].", path)
            return cls(choices=tuple(spec))
        if not isinstance(spec, dict):
            return cls(choices=(spec,))
        unknown = set(spec) - {"low", "high", "step", "log"}
        if unknown or not {"low", "high"} <= set(spec):
            raise ConfigError(f"must be a value, a list of choices or {{low, high, step?, log?}}, but got {spec!r}.",
                              path)
        low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"range bounds must be numbers, but got (low={low!r}, high={high!r}).", path)
        if low > high:
            raise ConfigError(f"`low <= high` must hold, but got (low={low}, high={high}).", path)
        if log and (low <= 0 or step is not None):
            raise ConfigError(f"a log range needs low > 0 and no step, but got (low={low}, step={step}).", path)
        return cls(low=low, high=high, step=step, log=log)

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (a choice, or a point of the range's grid)."""
        if self.choices is not None:
            return any(c == value and isinstance(c, bool) == isinstance(value, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step:
            return abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-6
        return not (isinstance(self.low, int) and isinstance(self.high, int)) or float(value).is_integer()

    def candidates(self) -> list[Any]:
        """The values to validate: every choice, or both range ends."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def suggest(self, trial, name: str) -> Any:
        if self.choices is not None:
            return self.choices[0] if self.fixed else trial.suggest_categorical(name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float):
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        value = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return round(value, 10) if self.step else value  # 0.7000000000000001 -> 0.7
