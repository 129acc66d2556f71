"""Export by rule: the trial a user means by "the best within my budget" (``autocomp export --max-drop 1.0
--minimize latency_ms``), chosen on validation among a study's complete trials, with the reason said."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from autocomp.errors import AutocompError

CAPS = {"max_drop": "val_drop_pp", "max_size": "size_bytes", "max_latency": "latency_ms"}  # option -> metric
RANKED = ("val_accuracy", "val_drop_pp", "size_bytes", "compression_ratio", "latency_ms", "speedup", "macs",
          "params", "nonzero_params")  # what a rule may minimise or maximise: never the test split
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}
CLOSEST = 3


def size_bytes(text: str) -> float:
    """``50KB``, ``1.5 MB``, ``20000`` (bytes) as bytes; KB is 1000 bytes, as the front table's ``size_kb``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"must be a size such as 50KB, 1.5MB or 20000 (bytes), but got {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


@dataclass(frozen=True)
class Rule:
    """At most ``caps[metric]`` of each capped metric; of the trials within, the best by ``best``."""

    caps: dict[str, float] = field(default_factory=dict)
    best: tuple[str, str] = ("val_accuracy", "maximize")

    def __post_init__(self) -> None:
        metric, direction = self.best
        if metric not in RANKED:
            hint = " (the search chose on validation; the test split is only reported)" if "test" in metric else ""
            raise AutocompError(f"--{direction} must name one of {list(RANKED)}, but got {metric!r}{hint}.")

    def describe(self) -> str:
        within = " and ".join(f"{metric} <= {cap:g}" for metric, cap in self.caps.items()) or "every complete trial"
        return f"{self.best[0]} {'largest' if self.best[1] == 'maximize' else 'smallest'} among {within}"

    def over(self, metrics: dict[str, float]) -> float:
        """How far ``metrics`` is over the caps, summed relative to each cap (0 within them)."""
        return sum(max(0.0, metrics[m] - cap) / max(abs(cap), 1.0 if m == "val_drop_pp" else 1e-12)
                   for m, cap in self.caps.items())


def pick(trials: dict[int, dict[str, float]], rule: Rule, study_name: str) -> tuple[int, str]:
    """The trial number ``rule`` picks among complete trials' metrics, and why; a one-line error naming the
    closest trials where none is within the caps."""
    if not trials:
        raise AutocompError(f"Study {study_name!r} has no complete trial to pick from.")
    within = [n for n, m in trials.items() if rule.over(m) == 0.0]
    if not within:
        closest = sorted(trials, key=lambda n: (rule.over(trials[n]), n))[:CLOSEST]
        named = "; ".join(f"trial {n} (" + ", ".join(f"{m} {trials[n][m]:.6g}" for m in rule.caps) + ")"
                          for n in closest)
        raise AutocompError(f"No complete trial of study {study_name!r} has {rule.describe().split(' among ')[1]}; "
                            f"closest: {named}.")
    metric, direction = rule.best
    sign = -1.0 if direction == "maximize" else 1.0
    chosen = min(within, key=lambda n: (sign * trials[n][metric], -trials[n]["val_accuracy"], n))
    why = (f"{rule.describe()} ({len(within)} of {len(trials)} complete trials): {metric} "
           f"{trials[chosen][metric]:.6g}, validation drop {trials[chosen]['val_drop_pp']:.3g} pp")
    return chosen, why
