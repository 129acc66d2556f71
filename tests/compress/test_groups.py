"""Pruning groups: coupled layers are pruned as one, by exact counts, whichever member a recipe names; afterwards
every module's sizes match its weights, the model runs, exports to ONNX and its MACs are those of its weights."""

from __future__ import annotations

import math

import onnxruntime as ort
import pytest
import torch
import torch_pruning as tp
from torch import nn

from autocomp.compress.facts import model_facts
from autocomp.compress.groups import check_metadata, pruning_groups
from autocomp.compress.prune import prunable_layers, prune, weight_mask
from autocomp.errors import ConfigError
from autocomp.features import layer_names
from autocomp.recipe import LayerPrune, Prune, Recipe
from autocomp.runtime import export_onnx
from autocomp.tasks.digits import DigitsCNN
from autocomp.train import Split

X = torch.zeros(1, 3, 8, 8)
SPARSITIES = (0.25, 0.5, 0.75)


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]


class ResidualAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.head = nn.Sequential(*cbr(3, 12)), nn.Sequential(*cbr(12, 12)), nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head((x + self.body(x)).mean((2, 3)))


class MobileNet(nn.Module):
    """Depthwise-separable blocks: each depthwise conv's channels are those of the conv feeding it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*cbr(3, 38, act=nn.ReLU6), *cbr(38, 38, groups=38, act=nn.ReLU6),
                                      *cbr(38, 39, 1, act=nn.ReLU6), *cbr(39, 39, 3, 2, groups=39, act=nn.ReLU6),
                                      *cbr(39, 40, 1, act=nn.ReLU6))
        self.head = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 1), nn.Conv2d(20, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(torch.relu(self.mix(x)).mean((2, 3)))


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.head = nn.Linear(8 * 4 * 4, 24), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.grouped = nn.Sequential(*cbr(3, 16)), nn.Sequential(*cbr(16, 24, groups=4))
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.stem(x)).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.downsample(x))


class ResNet(nn.Module):
    """Two stages of BasicBlocks, the second with a stride-2 projection shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, 8))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


# each model's groups: (members, channels, divisor)
ZOO = {
    ResidualAdd: [(("stem.0", "body.0"), 12, 1)],
    MobileNet: [(("features.0", "features.3"), 38, 1), (("features.6", "features.9"), 39, 1),
                (("features.12",), 40, 1)],
    Concat: [(("a",), 8, 1), (("b",), 12, 1), (("mix",), 16, 1)],
    ConvLinear: [(("conv",), 8, 1), (("fc",), 24, 1)],
    Grouped: [(("stem.0",), 16, 4), (("grouped.0",), 24, 4)],
    ResNet: [(("stem.0", "layer1.0.conv2", "layer1.1.conv2"), 8, 1), (("layer1.0.conv1",), 8, 1),
             (("layer1.1.conv1",), 8, 1), (("layer2.0.conv1",), 16, 1),
             (("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"), 16, 1), (("layer2.1.conv1",), 16, 1)],
}
NAMED = [(cls, members, member) for cls, groups in ZOO.items() for members, _, _ in groups for member in members]


def make(cls: type) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # BatchNorm statistics of their own, so a lost channel shows in the output
        for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    return model


def data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))


def channels(model: nn.Module) -> dict[str, int]:
    """Output channels of each Conv/Linear layer, read from its weight."""
    return {name: model.get_submodule(name).weight.shape[0] for name in layer_names(model)}


def weight_macs(model: nn.Module) -> dict[str, int]:
    """Each Conv/Linear layer's MACs at batch 1 from its weight's shape and its output's size (bias adds included)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            per_output = module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.weight.shape[1]
            bias = module.bias is not None
            macs[name] = output.numel() * per_output + (output.numel() if bias else 0)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layer_names(model)]
    with torch.no_grad():
        model(X)
    for handle in handles:
        handle.remove()
    return macs


def counted_macs(model: nn.Module) -> dict[str, int]:
    """What ``autocomp.measure.macs_and_params`` counts (torch-pruning, from the layers' attributes), per layer."""
    _, _, layer_macs, _ = tp.utils.count_ops_and_params(model, X, layer_wise=True)
    return {name: int(layer_macs[model.get_submodule(name)]) for name in layer_names(model)}


def assert_consistent(model: nn.Module) -> None:
    check_metadata(model)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert counted_macs(model) == weight_macs(model)


def kept(count: int, sparsity: float, divisor: int) -> int:
    return count - divisor * round(sparsity * count / divisor)


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_groups_tie_residual_adds_and_depthwise_convs_not_concatenations(cls):
    found = [(g.members, g.channels, g.divisor) for g in pruning_groups(make(cls), X)]
    assert found == ZOO[cls]
    assert all(layer.group == members[0] for members, _, _ in ZOO[cls]
               for name, layer in prunable_layers(make(cls), X).items() if name in members)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize(("cls", "members", "member"), NAMED, ids=lambda v: v.__name__ if isinstance(v, type) else v)
def test_local_scope_prunes_the_whole_group_by_whichever_member_is_named(cls, members, member, sparsity):
    model, reference = make(cls), make(cls)
    before = channels(model)
    prune(model, X, Prune(layers={member: LayerPrune(sparsity, "l1")}), prunable_layers(model, X), data())
    count, divisor = next((c, d) for m, c, d in ZOO[cls] if m == members)
    assert channels(model) == {n: kept(count, sparsity, divisor) if n in members else c for n, c in before.items()}
    assert_consistent(model)
    prune(reference, X, Prune(layers={members[0]: LayerPrune(sparsity, "l1")}), prunable_layers(reference, X), data())
    pairs = zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def following_batchnorm(model: nn.Module, name: str) -> nn.Module | None:
    """The BatchNorm after a zoo layer: the next module of its Sequential, or bnK after convK."""
    parent, _, child = name.rpartition(".")
    sibling = str(int(child) + 1) if child.isdigit() else child.replace("conv", "bn")
    module = getattr(model.get_submodule(parent), sibling, None)
    return module if isinstance(module, nn.BatchNorm2d) else None


@pytest.mark.parametrize(("cls", "members"), [(cls, m) for cls, groups in ZOO.items() for m, _, _ in groups],
                         ids=lambda v: v.__name__ if isinstance(v, type) else v[0])
def test_removing_dead_channels_leaves_the_output_unchanged(cls, members):
    """Channels that output zero through the activation go; every consumer must keep exactly the others."""
    model = make(cls)
    count, divisor = next((c, d) for m, c, d in ZOO[cls] if m == members)
    block = count // divisor
    dead = [b * block + p for b in range(divisor) for p in range(1, block, 2)][: divisor * (block // 2)]
    with torch.no_grad():
        for name in members:  # zero filters (lowest L1) whose activation reads 0: relu(-1)
            layer, bn = model.get_submodule(name), following_batchnorm(model, name)
            layer.weight[dead] = 0.0
            if layer.bias is not None:
                layer.bias[dead] = -1.0
            if bn is not None:
                bn.weight[dead], bn.bias[dead] = 0.0, -1.0
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    spec = Prune(layers={members[-1]: LayerPrune(len(dead) / count, "l1")})
    prune(model, X, spec, prunable_layers(model, X), data())
    assert {channels(model)[n] for n in members} == {count - len(dead)}
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_global_scope_removes_the_share_and_keeps_min_keep_of_every_group(cls, sparsity):
    model = make(cls)
    spec = Prune(scope="global", sparsity=sparsity, criterion="l1", min_keep=0.3)
    prune(model, X, spec, prunable_layers(model, X), data())
    after = channels(model)
    removed = {members: count - after[members[0]] for members, count, _ in ZOO[cls]}
    for members, count, divisor in ZOO[cls]:
        assert {after[m] for m in members} == {count - removed[members]}
        assert after[members[0]] >= math.ceil(0.3 * count) and removed[members] % divisor == 0
    total = sum(count for _, count, _ in ZOO[cls])
    floor = sum(math.ceil(0.3 * count) for _, count, _ in ZOO[cls])
    slack = sum(divisor - 1 for _, _, divisor in ZOO[cls])  # groups of a grouped conv round down to whole groups
    assert min(round(sparsity * total), total - floor) - slack <= sum(removed.values()) <= round(sparsity * total)
    assert_consistent(model)


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_pruned_models_export_to_onnx_and_compute_what_torch_does(cls, scope, tmp_path):
    model = make(cls)
    layers = {members[-1]: LayerPrune(0.5, "l1") for members, _, _ in ZOO[cls]}
    prune(model, X, Prune(scope=scope, layers=layers, sparsity=0.5), prunable_layers(model, X), data())
    x = torch.randn(1, 3, 8, 8)
    sess = ort.InferenceSession(str(export_onnx(model, X, tmp_path / "model.onnx")))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_the_digits_teachers_residual_partners_keep_the_requested_share():
    model = DigitsCNN().eval()
    x, original = torch.zeros(1, 1, 8, 8), channels(DigitsCNN())
    digits = Split(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    prune(model, x, Prune(layers={"conv3": LayerPrune(0.5, "l1")}), prunable_layers(model, x), digits)
    assert channels(model) == {**original, "conv3": 64, "block.body.0": 64}
    check_metadata(model)
    model = DigitsCNN().eval()
    prune(model, x, Prune(scope="global", sparsity=0.7, min_keep=0.1), prunable_layers(model, x), digits)
    assert all(model.get_submodule(n).weight.shape[0] >= math.ceil(0.1 * c) for n, c in original.items())
    after = channels(model)
    assert after["conv3"] == after["block.body.0"]
    groups = ("conv1", "conv2", "conv3", "conv4", "fc1")  # conv3 and block.body.0: one group of 128
    assert sum(original[n] - after[n] for n in groups) == round(0.7 * (32 + 64 + 128 + 256 + 256)) == 515
    check_metadata(model)


def test_a_group_named_by_a_member_of_a_dropped_block_still_prunes_the_rest():
    model, x = DigitsCNN().eval(), torch.zeros(1, 1, 8, 8)
    original = prunable_layers(model, x)  # of the teacher, before the block goes
    model.block = nn.Identity()
    digits = Split(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    prune(model, x, Prune(layers={"block.body.0": LayerPrune(0.5, "l1")}), original, digits)
    teacher = channels(DigitsCNN())
    assert channels(model) == {n: 64 if n == "conv3" else c for n, c in teacher.items() if n != "block.body.0"}
    prune(model, x, Prune(scope="global", granularity="weight", sparsity=0.5), original, digits)
    masks = [weight_mask(model.get_submodule(n)) for n in ("conv1", "conv2", "conv3", "conv4", "fc1")]
    assert sum(int((m == 0).sum()) for m in masks) == round(0.5 * sum(m.numel() for m in masks))


def test_check_metadata_names_every_size_out_of_step_with_the_weights():
    model = MobileNet()
    model.features[3].groups = 37  # depthwise: 38 filters of one input channel each
    model.features[4].num_features = 39
    model.head.in_features = 41
    with pytest.raises(RuntimeError) as err:
        check_metadata(model)
    assert str(err.value) == (
        "Internal error: pruning left layer sizes out of step with the weights: ["
        "'features.3: in_channels 38 != 37 (from the tensor shapes)', "
        "'features.3: out_channels % groups (37) 1 != 0 (from the tensor shapes)', "
        + ", ".join(f"'features.4: num_features (vs {t}) 39 != 38 (from the tensor shapes)'"
                    for t in ("weight", "bias", "running_mean", "running_var"))
        + ", 'head: in_features 41 != 40 (from the tensor shapes)']")


def test_a_recipe_names_a_group_once():
    facts = model_facts(DigitsCNN(), torch.zeros(1, 1, 8, 8))
    both = {"conv3": LayerPrune(0.5), "block.body.0": LayerPrune(0.3)}
    with pytest.raises(ConfigError) as err:
        facts.check(Recipe(task="digits", prune=Prune(layers=both)))
    assert str(err.value) == (
        "`recipe.prune.layers.block.body.0` is tied to `conv3` (one pruning group: ['conv3', 'block.body.0']); "
        "a group's channels are pruned once, named by one member, but got both.")
    facts.check(Recipe(task="digits", prune=Prune(layers={"block.body.0": LayerPrune(0.5)})))
    facts.check(Recipe(task="digits", prune=Prune(granularity="weight", layers=both)))  # masks: per layer
