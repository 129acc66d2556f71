"""Each rule across a recipe's fields is stated once (``autocomp.recipe``) and checked here against its three users:
the Recipe's validation, the search space's decoding and screening's shortened fine-tune."""

from __future__ import annotations

import itertools

import pytest
import torch

from autocomp.compress.prune import prunable_layers
from autocomp.errors import ConfigError
from autocomp.fidelity import Screening
from autocomp.recipe import (
    ACTIVATION_BITS,
    BITS,
    QAT_BELOW,
    FineTune,
    Prune,
    Quantize,
    Recipe,
    integer_weights,
    kmeans_allowed,
    least_epochs,
    qat_allowed,
)
from autocomp.space import SearchSpace
from autocomp.tasks.digits import DigitsCNN


@pytest.fixture(scope="module")
def prunable():
    return prunable_layers(DigitsCNN(), torch.zeros(1, 1, 8, 8))


def decode_all(space: SearchSpace, prunable: dict) -> list[Recipe]:
    """The recipes of every combination of the space's choices."""
    dims = space.dimensions(prunable, "digits")
    names = list(dims)
    return [space.decode(dict(zip(names, values, strict=True)), "digits", prunable)
            for values in itertools.product(*(dims[n].candidates() for n in names))]


@pytest.mark.parametrize("rounds, qat", list(itertools.product([1, 2, 3], [False, True])))
def test_the_epoch_floor(rounds, qat, prunable):
    least = least_epochs(rounds, qat)
    assert least == max(rounds if rounds > 1 else 0, int(qat))
    Recipe(task="t", prune=Prune(rounds=rounds), quantize=Quantize(bits=4, qat=qat), finetune=FineTune(epochs=least))
    if least:
        with pytest.raises(ConfigError, match=f"must be >= {least}") as err:
            Recipe(task="t", prune=Prune(rounds=rounds), quantize=Quantize(bits=4, qat=qat),
                   finetune=FineTune(epochs=least - 1))
        assert err.value.field == "finetune.epochs"
    space = SearchSpace.from_dict({"schema_version": 1, "prune": {"scope": "global", "sparsity": 0.0, "rounds": rounds},
                                   "quantize": {"bits": 4, "qat": qat}, "finetune": {"epochs": 0}})
    assert [r.finetune.epochs for r in decode_all(space, prunable)] == [least]  # the space asks none, gets the floor
    full = Recipe(task="t", prune=Prune(rounds=rounds), quantize=Quantize(bits=4, qat=qat),
                  finetune=FineTune(epochs=20))
    assert Screening(epochs=0.05).screen(full).finetune.epochs == max(1, least)  # a twentieth, never under the floor


def test_qat_and_kmeans_follow_their_rules(prunable):
    for bits, activation_bits, qat, kmeans in itertools.product(BITS, ACTIVATION_BITS, [False, True], [False, True]):
        if activation_bits == 8 and bits != 8:
            continue  # static int8: 8-bit weights (a rule of its own)
        valid = (not qat or qat_allowed(bits)) and (not kmeans or kmeans_allowed(bits, activation_bits, qat))
        quantize = Quantize(bits=bits, activation_bits=activation_bits, qat=qat, kmeans=kmeans)
        if valid:
            Recipe(task="t", quantize=quantize, finetune=FineTune(epochs=1))
        else:
            with pytest.raises(ConfigError, match="needs"):
                Recipe(task="t", quantize=quantize, finetune=FineTune(epochs=1))
    space = SearchSpace.from_dict({"schema_version": 1, "prune": {"scope": "global", "sparsity": 0.0},
                                   "quantize": {"bits": list(BITS), "activation_bits": list(ACTIVATION_BITS),
                                                "qat": [False, True], "kmeans": [False, True]},
                                   "finetune": {"epochs": 1}})
    recipes = decode_all(space, prunable)  # every one a valid Recipe: the space decodes by the same rules
    seen = {(r.quantize.bits, r.quantize.qat, r.quantize.kmeans) for r in recipes}
    assert {(b, q, k) for b, q, k in seen if q} == {(b, True, False) for b in BITS if qat_allowed(b)}
    assert {b for b, q, k in seen if k} == {b for b in BITS if kmeans_allowed(b, 32, False)}
    assert all(q.qat for r in recipes if (q := r.quantize).bits < QAT_BELOW and not q.kmeans)  # low bits train QAT


def test_the_grids_symmetry_and_scales_are_searched_only_for_integer_weights(prunable):
    space = SearchSpace.from_dict({"schema_version": 1, "prune": {"scope": "global", "sparsity": 0.0},
                                   "quantize": {"bits": list(BITS), "symmetric": [False, True],
                                                "per_channel": [False, True]}, "finetune": {"epochs": 1}})
    seen = {(r.quantize.bits, r.quantize.symmetric, r.quantize.per_channel) for r in decode_all(space, prunable)}
    default = Quantize()
    assert seen == {(b, s, c) for b in BITS for s, c in itertools.product([False, True], repeat=2)
                    if integer_weights(b)} | {(b, default.symmetric, default.per_channel) for b in BITS
                                              if not integer_weights(b)}
