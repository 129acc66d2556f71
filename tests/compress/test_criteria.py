"""Each criterion against its definition, on hand-checked tiny cases."""

from __future__ import annotations

import torch
import torch_pruning as tp

from autocomp.compress.criteria import CRITERIA, redundancy_score
from autocomp.train import Split
from tests.conftest import prune_local

X = torch.zeros(1, 1, 8, 8)


def data(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def removed(model, layer: str, criterion: str, n: int = 1) -> list[int]:
    """Which output channels of ``layer`` a prune by ``criterion`` removes (by fingerprinting the weights)."""
    conv = getattr(model, layer)
    before = [w.clone() for w in conv.weight]
    prune_local(model, {layer: (n / conv.out_channels, criterion)}, data())
    after = list(getattr(model, layer).weight)
    return [i for i, w in enumerate(before) if not any(torch.equal(w, a) for a in after)]


def place_filters_around_a_median(model) -> None:
    """conv1 filters 0-6 at c + 10 e_i, filter 7 at their centre c: 10 from each, the others 14.1 apart.

    c = -6 makes filter 7 the largest in L1 norm, so magnitude criteria keep it.
    """
    shift = -6.0 * torch.ones(9)
    with torch.no_grad():
        for i in range(7):
            model.conv1.weight[i] = (shift + 10.0 * torch.eye(9)[i]).view(1, 3, 3)
        model.conv1.weight[7] = shift.view(1, 3, 3)


def test_fpgm_removes_the_filter_nearest_the_geometric_median(small_cnn):
    place_filters_around_a_median(small_cnn)
    assert removed(small_cnn, "conv1", "fpgm") == [7]


def test_l1_removes_another_filter_in_that_case(small_cnn):
    place_filters_around_a_median(small_cnn)
    assert removed(small_cnn, "conv1", "l1") != [7]


def test_apoz_ranks_a_dead_channel_first(small_cnn):
    with torch.no_grad():
        small_cnn.conv1.bias[2] = -100.0  # after BN (fresh running stats) and ReLU: always zero
    assert removed(small_cnn, "conv1", "apoz") == [2]


def test_variance_ranks_a_constant_channel_first(small_cnn):
    with torch.no_grad():
        small_cnn.conv1.weight[6] = 0.0
        small_cnn.conv1.bias[6] = 3.0  # a positive constant: APoZ sees nothing wrong with it
    assert removed(small_cnn, "conv1", "variance") == [6]


def test_redundancy_drops_one_of_two_identical_channels():
    a = torch.randn(500, 5, generator=torch.Generator().manual_seed(0))
    a = torch.cat([a, a[:, 1:2]], dim=1)  # channel 5 copies channel 1
    scores = redundancy_score(a)
    assert set(scores.argsort()[:1].tolist()) <= {1, 5}
    assert sorted(scores.argsort()[:2].tolist()) != [1, 5]  # the copy's twin then has no partner left


def test_lamp_scores_follow_the_definition(small_cnn):
    graph = tp.DependencyGraph().build_dependency(small_cnn, example_inputs=X)
    group = graph.get_pruning_group(small_cnn.conv1, tp.prune_conv_out_channels, idxs=list(range(8)))
    scores = CRITERIA.get("lamp").make(None)(group)
    w2 = small_cnn.conv1.weight.detach().pow(2).flatten(1).sum(1)  # (8,) squared L2 per filter
    expected = torch.stack([w2[i] / w2[w2 >= w2[i]].sum() for i in range(8)])
    torch.testing.assert_close(scores, expected)
