"""SearchSpace: which parts of a Recipe may vary and how: a fixed set of dimensions, and the Recipe they decode to.

In the YAML each searchable value is a scalar, a list of choices or a range (``autocomp.dimensions.Param``); every
candidate value is checked against the Recipe's own rules when the space loads.

The encoding (README, "How the search space is encoded"), built so every sampler can learn from every trial:

- **Fixed dimensions.** ``dimensions`` lists the study's parameters once, for the model at hand; every trial
  samples all of them, under the same names and choices. A value that does not apply to a trial (the
  calibration of an fp32 trial, ``min_keep`` in local scope) is sampled and ignored, never left out: Optuna's
  NSGA-II and TPE evolve only the parameters present in every trial and draw the others at random.
- **One level, a per-layer allocation.** ``prune.sparsity`` is the trial's pruning level: in global scope the
  share of all channels removed; in local scope each group's sparsity is the level times the group's
  ``prune.<layer>.share`` (the space's ``allocation`` choices; without them every group gets the level),
  capped at the top of the sparsity range. One criterion per trial (``prune.criterion``): a layer it cannot
  score (``bn_scale`` without a BatchNorm; channel-only criteria on single weights) uses the first criterion
  of the space that can.
- **Students.** ``student.family`` and ``student.init`` are choices; every knob of every offered family is a
  dimension (``student.cnn.kernel``; per-stage knobs once per possible stage, ``student.cnn.width.3``), sampled in
  every trial and used when its family is drawn. A new network (not the teacher's graph) starts from scratch, is
  not pruned (its widths are its family's knobs; pruning untrained weights would narrow it at random) and is
  quantized uniformly: the per-layer shares, bits and int8 kernels name the teacher's layers.
- **Values that fit together** (the rules of ``autocomp.recipe``). Fine-tune epochs grow with the level (at least
  ``ceil(level x epochs.high)``, and ``least_epochs``); a student from scratch trains for the longest fine-tune at
  the highest learning rate; weights of fewer than ``QAT_BELOW`` bits train with QAT where the space allows QAT
  (not with k-means sharing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp.allocation import Guide, group_sparsities, layer_formats
from autocomp.compress.criteria import CRITERIA, applicable
from autocomp.compress.modes import MODES
from autocomp.compress.student import STUDENTS, resolved
from autocomp.config import check_keys, check_schema_version, from_dict, in_file, read_yaml
from autocomp.dimensions import PER_LAYER, Param, layer_dimension
from autocomp.errors import ConfigError, check_choice, check_range, did_you_mean
from autocomp.methods import MODE_FIELDS, check_name, check_recipe
from autocomp.recipe import (
    QAT_BELOW,
    Distill,
    FineTune,
    LayerPrune,
    Measure,
    Prune,
    Quantize,
    Recipe,
    Student,
    integer_weights,
    kmeans_allowed,
    least_epochs,
    qat_allowed,
)

SCHEMA_VERSION = 1
SECTIONS = {"student": Student, "quantize": Quantize, "distill": Distill, "finetune": FineTune}
# a warm-start recipe's deployment: (weight bits, activation bits); 4-bit weights fine-tune with QAT
FORMATS = {"fp32": (32, 32), "int8": (8, 8), "int4": (4, 32)}
# a policy's knobs (``autocomp.allocation``) and their defaults: 0 follows no sensitivity, 100 points protects nothing
POLICY = {"follow": 0.0, "protect": 100.0}
PRUNE_KEYS = ["scope", "granularity", "min_keep", "rounds", "regrow", "bn_penalty", "drop_blocks", "heads"]
# section -> {key: when}: the key's value is used only where ``when(values)`` holds, given the values
# of the fields before it (the recipe's defaults where those are fixed or not searched)
CONDITIONS: dict[str, dict[str, Callable[[dict], bool]]] = {
    "quantize": {
        "symmetric": lambda v: integer_weights(v["bits"]),
        "per_channel": lambda v: integer_weights(v["bits"]),
        "calibration": lambda v: v["activation_bits"] == 8,
        "qat": lambda v: qat_allowed(v["bits"]),
        "kmeans": lambda v: kmeans_allowed(v["bits"], v["activation_bits"], v["qat"]),
    },
    "distill": {
        **{key: (lambda v, mode=mode: v["mode"] == mode) for key, mode in MODE_FIELDS.items()},  # its mode's own
        "alpha": lambda v: v["kind"] != "none",
        "temperature": lambda v: v["kind"] != "none" and v["alpha"] > 0,
        "weight": lambda v: v["kind"] not in ("none", "logits"),
    },
}
# section -> {key: rule}: a value that follows from the ones before it (rule returns None: searched)
DERIVED: dict[str, dict[str, Callable[[dict], Any]]] = {
    "student": {"init": lambda v: None if STUDENTS.get(v["family"]).derived else "scratch"},  # a new network
    "quantize": {"bits": lambda v: 8 if v["activation_bits"] == 8 else None},  # static int8: 8-bit weights
    # a distillation mode with losses of its own: the first it combines with
    "distill": {"kind": lambda v: (MODES.get(v["mode"]).kinds or (None,))[0]},
}


@dataclass
class WarmStart:
    """The policies enqueued before anything is sampled (``autocomp.search.warm_start``): a hand-made
    pipeline's uniform recipes, every group pruned to one of ``levels`` (deployed in each of ``formats``, L1, logits
    distillation, the longest fine-tune), with ``sensitivity`` the same levels allocated by the
    teacher's sensitivity map (``autocomp sensitivity``), and each of ``students`` (a new network of the
    space's families, distilled from scratch) in each format."""

    levels: list[float] = field(default_factory=list)
    sensitivity: bool = False
    formats: list[str] = field(default_factory=lambda: ["fp32", "int8"])  # fp32, int8 (kernels), int4 (QAT)
    students: list[Student] = field(default_factory=list)  # new networks distilled from scratch, in each format

    def __post_init__(self) -> None:
        for level in self.levels:
            check_range("levels", level, 0.0, 1.0, high_open=True)
        for fmt in self.formats:
            check_choice("formats", fmt, list(FORMATS))
        for i, student in enumerate(self.students):
            if STUDENTS.get(student.family, field=f"students[{i}].family").derived:
                raise ConfigError(f"must be a new network (not {student.family!r}: the levels prune the teacher).",
                                  f"students[{i}].family")
            try:
                self.students[i] = resolved(student)  # its family's defaults filled in
            except ConfigError as err:
                raise err.located(f"students[{i}]") from None


@dataclass
class SearchSpace:
    """A level and per-group allocation of pruning, plus the quantize/distill/finetune sections of a Recipe,
    and the uniform policies (``warm_start``) that open a study."""

    sparsity: Param = field(default_factory=lambda: Param(choices=(0.0,)))
    criteria: Param = field(default_factory=lambda: Param(choices=("l1",)))
    allocation: Param | None = None  # each layer's share of the level (local scope); None: all at the level
    layers: list[str] | None = None  # None: every prunable layer of the teacher (a pruning group by any member)
    pruning: dict[str, Param] = field(default_factory=dict)  # the PRUNE_KEYS the space names
    sections: dict[str, dict[str, Param]] = field(default_factory=dict)
    students: dict[str, dict[str, Param]] = field(default_factory=dict)  # family -> its knobs, where searched
    warm_start: WarmStart = field(default_factory=lambda: WarmStart())
    policy: dict[str, Param] = field(default_factory=dict)  # POLICY knobs: per-layer choices from the sensitivity map

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        with in_file(path):
            return cls.from_dict(read_yaml(path, "search space"))

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        check_schema_version(data, SCHEMA_VERSION, "space")
        check_keys(data, ["schema_version", "prune", "warm_start", "policy", *SECTIONS], "space")
        student = data.get("student", {})  # the family's and init's choices, and each family's knobs
        knobs = {k: v for k, v in student.items() if k in STUDENTS} if isinstance(student, dict) else {}
        student = {k: v for k, v in student.items() if k not in knobs} if isinstance(student, dict) else student
        if isinstance(student, dict) and "config" in student:
            raise ConfigError("is searched per family (space.student.<family>: its knobs), not as one mapping.",
                              "space.student.config")
        space = cls(sections={name: _section(name, student if name == "student" else data.get(name, {}),
                                             f"space.{name}") for name in SECTIONS},
                    warm_start=from_dict(WarmStart, data.get("warm_start", {}), "space.warm_start"))
        space._parse_students(knobs)
        space._parse_prune(data.get("prune", {}))
        space._parse_policy(data.get("policy"))
        return space

    def _parse_policy(self, policy: Any) -> None:
        """The knobs that derive every layer's pruning share and quantization format (``autocomp.allocation``); a
        space has them or per-layer dimensions (``prune.allocation``, ``quantize.layers``,
        ``quantize.activation_layers``), not both."""
        if policy is None:
            return
        check_keys(policy, list(POLICY), "space.policy")
        self.policy = {key: Param.parse(policy.get(key, default), f"space.policy.{key}")
                       for key, default in POLICY.items()}
        for key, param in self.policy.items():
            for value in param.candidates():
                check_range(f"space.policy.{key}", value, 0.0, 100.0)
        listed = ["space.prune.allocation"] * (self.allocation is not None) + [
            f"space.quantize.{key}" for section, key in PER_LAYER if key in self.sections["quantize"]]
        if listed:
            raise ConfigError(f"derives every layer's choice, so the space cannot also search {listed}.",
                              "space.policy")

    def _parse_students(self, knobs: dict[str, Any]) -> None:
        """Each searched family's knobs: its own space (``autocomp.compress.student``), knob by knob as the
        study's space overrides it; every value checked by building the family's config with it."""
        family = self.sections["student"].get("family")
        searched = family.candidates() if family is not None else []
        for name in knobs:
            if name not in searched:
                raise ConfigError(f"gives the knobs of a family that space.student.family does not offer "
                                  f"({searched}).", f"space.student.{name}")
        for name in searched:
            chosen = STUDENTS.get(name)
            given = knobs.get(name, {})
            check_keys(given, list(chosen.space), f"space.student.{name}")
            params = {knob: Param.parse(given.get(knob, default), f"space.student.{name}.{knob}")
                      for knob, default in chosen.space.items()}
            dims = chosen.dimensions(params)
            for knob, param in dims.items():
                for value in param.candidates():  # the others at their first choice
                    values = {k: value if k == knob else p.candidates()[0] for k, p in dims.items()}
                    from_dict(chosen.config, chosen.decode(values), f"space.student.{name}")
            self.students[name] = params

    def _parse_prune(self, prune: dict) -> None:
        check_keys(prune, ["layers", "sparsity", "criteria", "allocation", *PRUNE_KEYS], "space.prune")
        if "sparsity" in prune:
            self.sparsity = Param.parse(prune["sparsity"], "space.prune.sparsity")
        if "criteria" in prune:
            self.criteria = Param.parse(prune["criteria"], "space.prune.criteria")
        if "allocation" in prune:
            self.allocation = Param.parse(prune["allocation"], "space.prune.allocation")
            for value in self.allocation.candidates():
                check_range("space.prune.allocation", value, 0.0, 10.0)
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

    def dimensions(self, prunable: dict, task: str, quantizable: list[str] | None = None) -> dict[str, Param]:
        """Every parameter of this space for a model, fixed ones included: the same names in every trial.

        ``quantizable`` names the Conv/Linear layers that may get their own weight bits (weight-only)
        or activation bits (static int8: int8 kernels or fp32), default: the prunable ones.
        """
        dims = {f"prune.{key}": self.pruning[key] for key in PRUNE_KEYS if key in self.pruning}
        dims |= {"prune.sparsity": self.sparsity, "prune.criterion": self.criteria}
        for name, params in self.students.items():
            dims |= {f"student.{name}.{knob}": param for knob, param in STUDENTS.get(name).dimensions(params).items()}
        if self.allocation is not None:
            dims |= {layer_dimension("prune", layer, "share"): self.allocation
                     for layer in self.layer_names(prunable, task)}
        dims |= {f"policy.{key}": param for key, param in self.policy.items()}
        for section, params in self.sections.items():
            for key, param in params.items():
                rule = PER_LAYER.get((SECTIONS[section].__name__, key))
                names = [layer_dimension(section, layer, rule) for layer in quantizable or prunable] if rule else [
                    f"{section}.{key}"]
                dims |= {name: param for name in names}
        return dims

    def sample(self, trial, task: str, prunable: dict, seed: int = 0, measure: Measure | None = None,
               quantizable: list[str] | None = None, guide: Guide | None = None) -> Recipe:
        """Ask ``trial`` for every free dimension (``dimensions``) and return the Recipe they decode to."""
        values = {name: param.suggest(trial, name)
                  for name, param in self.dimensions(prunable, task, quantizable).items()}
        return self.decode(values, task, prunable, seed, measure, quantizable, guide)

    def decode(self, values: dict[str, Any], task: str, prunable: dict, seed: int = 0,
               measure: Measure | None = None, quantizable: list[str] | None = None,
               guide: Guide | None = None) -> Recipe:
        """The Recipe that one value per dimension stands for (values that do not apply are ignored); a space
        with a ``policy`` derives its per-layer choices from ``guide``, the teacher's sensitivity map."""
        if self.policy and guide is None:
            raise ConfigError("derives every layer's choice from the teacher's sensitivity map, but none was given.",
                              "space.policy")
        sections = {section: _decode_section(section, params, values) for section, params in self.sections.items()}
        student = sections["student"]
        chosen = STUDENTS.get(student.get("family", "teacher"))
        if student.get("family") in self.students:
            student["config"] = chosen.decode({knob: values[f"student.{student['family']}.{knob}"]
                                               for knob in chosen.dimensions(self.students[student["family"]])})
        prune = self._decode_prune(values, prunable, task, own_graph=chosen.derived, guide=guide)
        q = sections["quantize"]
        static_int8 = q.get("activation_bits", 32) == 8
        if guide is not None and self.policy and chosen.derived:  # a new network has its own layers
            weights, activations = layer_formats(guide, quantizable or list(prunable), q.get("bits", 32), static_int8,
                                                 values["policy.protect"])
            q |= {key: found for key, found in (("layers", weights), ("activation_layers", activations)) if found}
        for key, rule, used in [("layers", "bits", q.get("bits", 32) <= 16 and not static_int8),
                                ("activation_layers", "activation_bits", static_int8)]:
            if key in self.sections["quantize"] and used and chosen.derived:  # a new network has its own layers
                q[key] = {name: values[layer_dimension("quantize", name, rule)] for name in quantizable or prunable}
        lowest = min([q.get("bits", 32), *q.get("layers", {}).values()])
        offered = self.sections["quantize"].get("qat")
        if lowest < QAT_BELOW and qat_allowed(q.get("bits", 32)) and not q.get("kmeans") and offered \
                and True in offered.candidates():
            q["qat"] = True
        finetune = sections["finetune"]
        epochs = self.sections["finetune"].get("epochs")  # enough to recover the level asked, where searched
        enough = math.ceil(values["prune.sparsity"] * max(epochs.candidates()) - 1e-9) if epochs else 0
        scratch = student.get("init", "teacher") == "scratch"
        if epochs and scratch:  # nothing to recover: all to learn
            enough = max(epochs.candidates())
        lr = self.sections["finetune"].get("lr")
        if lr and scratch:  # random weights learn at the highest rate offered, not a fine-tune's
            finetune["lr"] = max(lr.candidates())
        least = max(least_epochs(prune.rounds, bool(q.get("qat"))), enough)
        finetune["epochs"] = max(finetune.get("epochs", FineTune().epochs), least)
        return check_recipe(Recipe(task=task, prune=prune, seed=seed, measure=measure or Measure(),
                                   **{s: SECTIONS[s](**v) for s, v in sections.items()}))

    def _decode_prune(self, values: dict[str, Any], prunable: dict, task: str, own_graph: bool = True,
                      guide: Guide | None = None) -> Prune:
        """The teacher's graph (``own_graph``) is pruned as sampled. A new student network is not: it trains from
        scratch, where pruning before training would only narrow it at random, which its family's width knobs
        already choose."""
        if not own_graph:
            return Prune()
        chosen = {key: values[f"prune.{key}"] for key in ("scope", "granularity", "rounds", "bn_penalty",
                                                          "drop_blocks", "heads") if key in self.pruning}
        granularity = chosen.get("granularity", "channel")
        if granularity == "weight" and "regrow" in self.pruning:
            chosen["regrow"] = values["prune.regrow"]
        level, criterion = values["prune.sparsity"], values["prune.criterion"]
        if chosen.get("scope", "local") == "global":
            if "min_keep" in self.pruning:
                chosen["min_keep"] = values["prune.min_keep"]
            return Prune(sparsity=level, criterion=self._criterion(criterion, applicable(granularity)), **chosen)
        cap = max(self.sparsity.candidates())
        names = self.layer_names(prunable, task)
        derived = group_sparsities(guide, list(dict.fromkeys(prunable[n].group for n in names)), level,
                                   values["policy.follow"], cap) if guide is not None and self.policy else {}
        layers: dict[str, LayerPrune] = {}
        for name in names:
            key = name if granularity == "weight" else prunable[name].group  # a group is named once
            if key not in layers:
                share = values[layer_dimension("prune", name, "share")] if self.allocation is not None else 1.0
                sparsity = derived.get(prunable[name].group, round(min(level * share, cap), 6))
                layers[key] = LayerPrune(sparsity, self._criterion(criterion, prunable[name].criteria(granularity)))
        return Prune(layers=layers, **chosen)

    def _criterion(self, chosen: str, allowed: list[str]) -> str:
        """``chosen`` where it can score the layer, else the space's first criterion that can (else ``allowed[0]``)."""
        return next((c for c in [chosen, *self.criteria.candidates()] if c in allowed), allowed[0])

    def families(self) -> list[str]:
        """The student families this space searches."""
        return list(self.students)

    def layer_names(self, prunable: dict, task: str) -> list[str]:
        """The layers this space prunes, checked against the model's prunable layers."""
        for name in self.layers or []:
            if name not in prunable:
                raise ConfigError(f"must name prunable layers of the {task!r} model {list(prunable)}, but "
                                  f"got {name!r}.{did_you_mean(name, prunable)}", "space.prune.layers")
        return list(prunable) if self.layers is None else self.layers


def _decode_section(section: str, params: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    """A section's values in field order, each used only where its condition holds (per-layer fields apart)."""
    conditions, derived = CONDITIONS.get(section, {}), DERIVED.get(section, {})
    fields = dataclasses.asdict(SECTIONS[section]())
    current = dict(fields)
    chosen: dict[str, Any] = {}
    for key in fields:
        if (SECTIONS[section].__name__, key) in PER_LAYER or (section, key) == ("student", "config"):
            continue
        if key in derived and derived[key](current) is not None:
            current[key] = chosen[key] = derived[key](current)
        elif key in params and conditions.get(key, lambda _v: True)(current):
            current[key] = chosen[key] = values[f"{section}.{key}"]
    return chosen


def _section(section: str, data: Any, path: str) -> dict[str, Param]:
    cls = SECTIONS[section]
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping, but got {data!r}.", path)
    check_keys(data, [f.name for f in dataclasses.fields(cls)], path)
    params = {key: Param.parse(spec, f"{path}.{key}") for key, spec in data.items()}
    for key, param in params.items():
        for value in param.candidates():  # the Recipe's own rules; per-layer values as their field's
            from_dict(cls, {PER_LAYER.get((cls.__name__, key), key): value}, path)
            check_name(section, key, value, path)
    return params
