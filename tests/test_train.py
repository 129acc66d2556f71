from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from autocomp.compress.modes import Cohort
from autocomp.compress.prune import WeightMask, regrow, weight_mask
from autocomp.compress.qat import quantization_aware
from autocomp.errors import ConfigError
from autocomp.recipe import Distill
from autocomp.train import EarlyStopping, Split, cross_entropy, fit, predict
from tests.tasks import blobs

MASK = "0.parametrizations.weight.0.mask"  # the first layer's pruning mask in the state dict


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def accuracy(split: Split) -> Callable[[nn.Module], float]:
    return lambda model: float((predict(model, split.x).argmax(1) == split.y).float().mean())


def snapshotting(scores: Callable[[nn.Module], float], states: list[dict[str, torch.Tensor]],
                 modes: list[bool]) -> Callable[[nn.Module], float]:
    """``scores``, recording the state and training mode of the model each time it is scored."""
    def evaluate(model: nn.Module) -> float:
        states.append(copy.deepcopy(model.state_dict()))
        modes.append(model.training or torch.is_grad_enabled())
        return scores(model)

    return evaluate


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fine_tune_whose_validation_accuracy_plateaus_stops_early_and_deterministically():
    train, val = blobs(128, 0), blobs(64, 1)
    runs = []
    for _ in range(2):
        states: list[dict[str, torch.Tensor]] = []
        modes: list[bool] = []
        stopping = EarlyStopping(snapshotting(accuracy(val), states, modes), patience=2)
        model = fit(mlp(), train, cross_entropy, epochs=30, lr=1e-2, batch_size=16, early_stopping=stopping,
                    progress=False)
        runs.append(model.state_dict())
        # 100% after the first epoch, and nothing scores strictly higher: two more epochs, then stop
        assert (stopping.epochs_run, stopping.best_epoch, stopping.best_score) == (3, 1, 1.0)
        assert len(states) == 3 and not any(modes)  # scored in eval mode, without gradients
        assert equal(model.state_dict(), states[0]) and not equal(model.state_dict(), states[-1])
        assert accuracy(val)(model) == stopping.best_score
    assert equal(*runs)  # the same seed trains the same weights and stops at the same epoch


def test_patience_zero_runs_every_epoch_as_without_early_stopping():
    train = blobs(128, 0)
    scored: list[nn.Module] = []
    stopping = EarlyStopping(lambda model: scored.append(model) or 1.0, patience=0)
    with_it = fit(mlp(), train, cross_entropy, epochs=5, lr=1e-2, batch_size=16, early_stopping=stopping,
                  progress=False)
    without = fit(mlp(), train, cross_entropy, epochs=5, lr=1e-2, batch_size=16, progress=False)
    assert stopping.epochs_run == 5 and not scored  # off: nothing scored, nothing restored
    assert equal(with_it.state_dict(), without.state_dict())


@pytest.mark.parametrize("qat", [False, True], ids=["masked", "masked-qat"])
def test_the_best_epoch_is_restored_with_its_pruning_mask(qat):
    """Scripted scores peak at epoch 2; with patience 2 the fit stops after epoch 4 and loads epoch 2 back,
    the masked layer's latent weights and mask (which sparse regrowth changes between epochs) included."""
    train = blobs(128, 0)
    model = mlp()
    g = torch.Generator().manual_seed(0)
    parametrize.register_parametrization(model[0], "weight", WeightMask((torch.rand(8, 4, generator=g) > 0.5).float()))
    scripted = iter([0.5, 0.9, 0.3, 0.9, 1.0])  # epoch 4 only ties the best: no improvement
    states: list[dict[str, torch.Tensor]] = []
    stopping = EarlyStopping(snapshotting(lambda _model: next(scripted), states, []), patience=2)
    regrown: list[int] = []

    def on_epoch_end(generator: torch.Generator) -> None:
        regrown.append(len(regrown))
        regrow(model, 0.5, generator)

    fake_quantized = quantization_aware(model, {"0": 4, "2": 4}, train.x, "minmax") if qat else nullcontext()
    with fake_quantized:
        fit(model, train, cross_entropy, epochs=10, lr=1e-2, batch_size=16, on_epoch_end=on_epoch_end,
            early_stopping=stopping, progress=False)
        assert (stopping.epochs_run, stopping.best_epoch, stopping.best_score) == (4, 2, 0.9)
        assert regrown == [0, 1, 2]  # between epochs only: not after the epoch that stopped
        assert equal(model.state_dict(), states[1])
        assert not torch.equal(states[1][MASK], states[3][MASK])  # regrowth moved the mask after epoch 2
    assert torch.equal(weight_mask(model[0]), states[1][MASK])


def test_the_best_epoch_is_restored_with_the_learned_parts_of_its_loss():
    """Mutual learning's peers are its loss's parameters: a fit stopped early loads the peers of the student's
    best epoch back with it, so the next pruning round starts the cohort from one epoch."""
    train = blobs(128, 0)
    student, peer = mlp(), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cohort = Cohort([peer], Distill(mode="mutual"))
    scripted, peers = iter([0.5, 0.9, 0.3, 0.2]), []

    def scores(model: nn.Module) -> float:
        peers.append(copy.deepcopy(peer.state_dict()))
        return next(scripted)

    states: list[dict[str, torch.Tensor]] = []
    stopping = EarlyStopping(snapshotting(scores, states, []), patience=2)
    fit(student, train, cohort, epochs=10, lr=1e-2, batch_size=16, early_stopping=stopping, progress=False)
    assert (stopping.epochs_run, stopping.best_epoch) == (4, 2)
    assert equal(student.state_dict(), states[1]) and equal(peer.state_dict(), peers[1])
    assert not equal(peers[1], peers[3])  # the peer trained on after the best epoch


def test_patience_is_checked():
    with pytest.raises(ConfigError, match="`patience` must be in \\[0, 1000\\], but got -1"):
        EarlyStopping(lambda model: 0.0, patience=-1)


def test_a_fit_says_each_epoch_to_whoever_listens_within_the_stage():
    from autocomp import phase

    seen: list[str] = []
    phase.stage("trial 4, screen")
    with phase.listening(seen.append):
        fit(mlp(), blobs(64, 0), cross_entropy, epochs=2, lr=1e-2, batch_size=16, desc="fine-tune", progress=False)
    fit(mlp(), blobs(64, 0), cross_entropy, epochs=1, lr=1e-2, batch_size=16, progress=False)  # nobody listens
    assert seen == ["trial 4, screen: fine-tune epoch 1/2", "trial 4, screen: fine-tune epoch 2/2"]
