"""Multi-fidelity: screen a sampled recipe with a short fine-tune, and promote only the promising ones.

Optuna's pruners rank one reported value and refuse multi-objective studies, so autocomp runs a
one-rung asynchronous successive halving of its own (ASHA's promotion rule, with a non-dominated
rank in place of a single score):

1. A sampled trial first runs its recipe with ``epochs`` of its fine-tune (at least one epoch per
   pruning round, and one for QAT) and is measured like any trial: its *screen*.
2. All screens of the study so far (this one included) are sorted by non-dominated rank on the study's
   objectives, ties broken by the first objective. The trial is promoted when it sits within the best
   ``promote`` share of them, or while the study holds fewer than ``grace`` screens.
3. A promoted trial runs its whole recipe (the full fidelity) and completes with those metrics. A trial
   that is not promoted is stored PRUNED, its screen under the user attribute ``screen`` and
   ``fidelity: screen``: it never enters the front, ``pareto``, ``export`` or the dashboard's best trials.

Warm-start policies (the hand-made recipes) skip the screen: they are the baseline the front starts from.
A study's ``trials`` counts every trial started, screened-out ones included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from autocomp.errors import check_range
from autocomp.recipe import Recipe, least_epochs


@dataclass
class Screening:
    """How a study screens trials before their full fine-tune (study YAML ``screening``)."""

    epochs: float = 0.25  # share of the recipe's fine-tune epochs a screen trains
    promote: float = 0.34  # share of the screens so far a trial must be among to be promoted
    grace: int = 4  # every trial is promoted until the study holds this many screens

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 0.01, 1.0, high_open=True)
        check_range("promote", self.promote, 0.01, 1.0)
        check_range("grace", self.grace, 0, 10**6)

    def screen(self, recipe: Recipe) -> Recipe | None:
        """The recipe's screen: the same compression with a shorter fine-tune (None: nothing to shorten)."""
        full = recipe.finetune.epochs
        least = least_epochs(recipe.prune.rounds, recipe.quantize.qat)
        epochs = max(math.ceil(self.epochs * full), least)
        if epochs >= full:
            return None
        return dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, epochs=epochs))

    def promoted(self, values: list[float], screens: list[list[float]], directions: list[str]) -> bool:
        """Whether a trial whose screen scored ``values`` is promoted, given every screen so far (its own included)."""
        if len(screens) < self.grace:
            return True
        losses, own = as_losses(screens, directions), as_losses([values], directions)[0]
        ranks = non_domination_ranks(losses)
        order = sorted(range(len(losses)), key=lambda i: (ranks[i], losses[i][0]))
        best = order[: math.ceil(self.promote * len(losses))]
        return any(losses[i] == own for i in best)


def as_losses(points: list[list[float]], directions: list[str]) -> list[list[float]]:
    """Objective values as losses to minimise (maximised objectives negated)."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    return [[s * v for s, v in zip(signs, point, strict=True)] for point in points]


def dominates(a: list[float], b: list[float]) -> bool:
    """Whether loss vector ``a`` is no worse than ``b`` everywhere and better somewhere (minimisation)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_domination_ranks(losses: list[list[float]]) -> list[int]:
    """Each point's front number (0: non-dominated, 1: non-dominated once front 0 is removed, ...).

    Quadratic per front; a study's screens number in the hundreds (Optuna's own is private API)."""
    ranks = [-1] * len(losses)
    left, rank = set(range(len(losses))), 0
    while left:
        front = {i for i in left if not any(dominates(losses[j], losses[i]) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks
