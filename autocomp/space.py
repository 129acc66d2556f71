"""SearchSpace: which parts of a Recipe may vary and how; a define-by-run sampler of Recipes.

In the YAML each searchable value is one of: a scalar (fixed), a list (categorical choice), or
a mapping ``{low, high, step?, log?}`` (an int range when low and high are ints, else a float
range). Every candidate value is checked against the Recipe's own rules when the space loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp.compress.criteria import CRITERIA, applicable
from autocomp.config import check_schema_version, from_dict, read_yaml
from autocomp.errors import ConfigError, did_you_mean
from autocomp.recipe import Distill, FineTune, LayerPrune, Measure, Prune, Quantize, Recipe

SCHEMA_VERSION = 1
SECTIONS = {"quantize": Quantize, "distill": Distill, "finetune": FineTune}
# per-layer fields of a section whose space lists the choices for every layer: (class, field) -> rule
PER_LAYER = {("Quantize", "layers"): "bits", ("Quantize", "activation_layers"): "activation_bits"}
PRUNE_KEYS = ["scope", "granularity", "min_keep", "rounds", "regrow", "bn_penalty", "drop_blocks"]
# section -> {key: when}: the key is searched only where ``when(values)`` holds, given the values
# of the fields before it (the recipe's defaults where those are fixed or not searched)
CONDITIONS: dict[str, dict[str, Callable[[dict], bool]]] = {
    "quantize": {
        "bits": lambda v: v["activation_bits"] == 32,  # static int8 (activation_bits 8) sets bits 8
        "symmetric": lambda v: v["bits"] <= 8,
        "per_channel": lambda v: v["bits"] <= 8,
        "calibration": lambda v: v["activation_bits"] == 8,
        "qat": lambda v: v["bits"] <= 8,
        "kmeans": lambda v: v["bits"] <= 8 and v["activation_bits"] == 32 and not v["qat"],
    },
    "distill": {
        "alpha": lambda v: v["kind"] != "none",
        "temperature": lambda v: v["kind"] != "none" and v["alpha"] > 0,
        "weight": lambda v: v["kind"] not in ("none", "logits"),
    },
}
# section -> {key: rule}: a value that follows from the ones before it (rule returns None: searched)
DERIVED: dict[str, dict[str, Callable[[dict], Any]]] = {
    "quantize": {"bits": lambda v: 8 if v["activation_bits"] == 8 else None},  # static int8: 8-bit weights
}


@dataclass(frozen=True)
class Param:
    """One searchable value: fixed, categorical, or an int/float range."""

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


@dataclass
class SearchSpace:
    """Per-group (per-layer for single weights) sparsity and criterion, plus the quantize/distill/finetune
    sections of a Recipe."""

    sparsity: Param = field(default_factory=lambda: Param(choices=(0.0,)))
    criteria: Param = field(default_factory=lambda: Param(choices=("l1",)))
    layers: list[str] | None = None  # None: every prunable layer of the teacher (a pruning group by any member)
    pruning: dict[str, Param] = field(default_factory=dict)  # the PRUNE_KEYS the space names
    sections: dict[str, dict[str, Param]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        return cls.from_dict(read_yaml(path, "search space"))

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        check_schema_version(data, SCHEMA_VERSION, "space")
        _check_keys(data, ["schema_version", "prune", *SECTIONS], "space")
        space = cls(sections={name: _section(data.get(name, {}), SECTIONS[name], f"space.{name}")
                              for name in SECTIONS})
        space._parse_prune(data.get("prune", {}))
        return space

    def _parse_prune(self, prune: dict) -> None:
        _check_keys(prune, ["layers", "sparsity", "criteria", *PRUNE_KEYS], "space.prune")
        if "sparsity" in prune:
            self.sparsity = Param.parse(prune["sparsity"], "space.prune.sparsity")
        if "criteria" in prune:
            self.criteria = Param.parse(prune["criteria"], "space.prune.criteria")
        layers = prune.get("layers", "all")
        if layers != "all" and not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
            raise ConfigError(f"must be 'all' or a list of layer names, but got {layers!r}.", "space.prune.layers")
        self.layers = None if layers == "all" else layers
        self.pruning = {key: Param.parse(prune[key], f"space.prune.{key}") for key in PRUNE_KEYS if key in prune}
        for key, param in [("sparsity", self.sparsity), *self.pruning.items()]:
            for value in param.candidates():
                from_dict(Prune, {key: value}, "space.prune")
        for criterion in self.criteria.candidates():
            CRITERIA.get(criterion, field="space.prune.criteria")
        granularities = self.pruning["granularity"].candidates() if "granularity" in self.pruning else ["channel"]
        if "weight" in granularities and not set(self.criteria.candidates()) & set(applicable("weight")):
            raise ConfigError(f"must hold a criterion that scores single weights {applicable('weight')} when "
                              f"granularity may be 'weight', but got {self.criteria.candidates()}.",
                              "space.prune.criteria")

    def sample(self, trial, task: str, prunable: dict, seed: int = 0, measure: Measure | None = None,
               quantizable: list[str] | None = None) -> Recipe:
        """Define-by-run: ask ``trial`` for every free value and return the Recipe they make.

        ``quantizable`` names the Conv/Linear layers that may get their own weight bits (weight-only)
        or activation bits (static int8: int8 kernels or fp32), default: the prunable ones. A trial
        whose sampled epochs are fewer than its pruning rounds (or 0 with QAT) gets one per round
        (one for QAT), the Recipe's rule that every round fine-tunes.
        """
        prune = self._sample_prune(trial, prunable, task)
        values = {section: _sample_section(trial, section, {k: p for k, p in params.items()
                                                            if (SECTIONS[section].__name__, k) not in PER_LAYER})
                  for section, params in self.sections.items()}
        params, q = self.sections["quantize"], values["quantize"]
        static_int8 = q.get("activation_bits", 32) == 8
        for key, rule, searched in [("layers", "bits", q.get("bits", 32) <= 16 and not static_int8),
                                    ("activation_layers", "activation_bits", static_int8)]:
            if key in params and searched:
                names = quantizable or prunable
                q[key] = {name: params[key].suggest(trial, f"quantize.{name}.{rule}") for name in names}
        finetune = values["finetune"]  # every round, and the QAT round, fine-tunes for at least one epoch
        least = max(prune.rounds if prune.rounds > 1 else 0, 1 if q.get("qat") else 0)
        finetune["epochs"] = max(finetune.get("epochs", FineTune().epochs), least)
        return Recipe(task=task, prune=prune, seed=seed,
                      measure=measure or Measure(), **{s: SECTIONS[s](**v) for s, v in values.items()})

    def _sample_prune(self, trial, prunable: dict, task: str) -> Prune:
        """Local scope: a sparsity and a criterion per pruning group (channels), named by the group's name, or
        per layer (single weights); global: one of each for all layers.

        Parameter names carry the granularity where the criteria to choose from depend on it (an
        Optuna parameter keeps one set of choices for the whole study).
        """
        chosen = {key: self.pruning[key].suggest(trial, f"prune.{key}")
                  for key in ("scope", "granularity", "rounds", "bn_penalty", "drop_blocks") if key in self.pruning}
        granularity = chosen.get("granularity", "channel")
        if granularity == "weight" and "regrow" in self.pruning:
            chosen["regrow"] = self.pruning["regrow"].suggest(trial, "prune.regrow")
        tag = "" if granularity == "channel" else f".{granularity}"
        if chosen.get("scope", "local") == "local":
            names = self.layer_names(prunable, task)
            if granularity == "channel":  # the channels of a group go together: a group is named once
                names = list(dict.fromkeys(prunable[name].group for name in names))
            layers = {name: self._sample_layer(trial, f"{name}{tag}", prunable[name].criteria(granularity))
                      for name in names}
            return Prune(layers=layers, **chosen)
        if "min_keep" in self.pruning:
            chosen["min_keep"] = self.pruning["min_keep"].suggest(trial, "prune.min_keep")
        sparsity = self.sparsity.suggest(trial, "prune.sparsity")
        allowed = [c for c in self.criteria.candidates() if c in applicable(granularity)]
        criterion = Param(choices=tuple(allowed)).suggest(trial, f"prune{tag}.criterion") if sparsity > 0 else "l1"
        return Prune(sparsity=sparsity, criterion=criterion, **chosen)

    def check_blocks(self, blocks: list[str], task: str) -> None:
        """Reject a space that may drop more residual blocks than the model has."""
        most = max(self.pruning["drop_blocks"].candidates()) if "drop_blocks" in self.pruning else 0
        if most > len(blocks):
            raise ConfigError(f"may drop at most the {len(blocks)} residual blocks of the {task!r} model {blocks}, "
                              f"but allows {most}.", "space.prune.drop_blocks")

    def layer_names(self, prunable: dict, task: str) -> list[str]:
        """The layers this space prunes, checked against the model's prunable layers."""
        for name in self.layers or []:
            if name not in prunable:
                raise ConfigError(f"must name prunable layers of the {task!r} model {list(prunable)}, but "
                                  f"got {name!r}.{did_you_mean(name, prunable)}", "space.prune.layers")
        return list(prunable) if self.layers is None else self.layers

    def _sample_layer(self, trial, name: str, allowed: list[str]) -> LayerPrune:
        criteria = [c for c in self.criteria.candidates() if c in allowed]
        if not criteria:  # no criterion of the space can score this layer: it stays whole
            return LayerPrune(0.0, allowed[0])
        sparsity = self.sparsity.suggest(trial, f"prune.{name}.sparsity")
        if sparsity == 0.0:
            return LayerPrune(0.0, allowed[0])
        return LayerPrune(sparsity, Param(choices=tuple(criteria)).suggest(trial, f"prune.{name}.criterion"))


def _sample_section(trial, section: str, params: dict[str, Param]) -> dict[str, Any]:
    """Sample a section's values in field order, each only where its condition holds."""
    conditions, derived = CONDITIONS.get(section, {}), DERIVED.get(section, {})
    fields = dataclasses.asdict(SECTIONS[section]())
    values = dict(fields)
    chosen: dict[str, Any] = {}
    for key in fields:
        if key in derived and derived[key](values) is not None:
            values[key] = chosen[key] = derived[key](values)
        elif key in params and conditions.get(key, lambda _v: True)(values):
            values[key] = chosen[key] = params[key].suggest(trial, f"{section}.{key}")
    return chosen


def _section(data: Any, cls: type, path: str) -> dict[str, Param]:
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping, but got {data!r}.", path)
    _check_keys(data, [f.name for f in dataclasses.fields(cls)], path)
    params = {key: Param.parse(spec, f"{path}.{key}") for key, spec in data.items()}
    for key, param in params.items():
        for value in param.candidates():  # the Recipe dataclass's own rules; per-layer values as their field's
            from_dict(cls, {PER_LAYER.get((cls.__name__, key), key): value}, path)
    return params


def _check_keys(data: dict, allowed: list[str], path: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping, but got {data!r}.", path)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"is not a known field; expected one of {allowed}.{did_you_mean(key, allowed)}",
                              f"{path}.{key}")
