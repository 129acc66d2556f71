from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from autocomp.errors import ConfigError
from autocomp.tasks import TASKS
from autocomp.tasks.base import digest
from autocomp.tasks.load import check_task, load_task
from autocomp.train import Split


def check_teacher(task, min_accuracy: float) -> None:
    assert sum(p.numel() for p in task.teacher.parameters()) >= 500_000
    assert task.score(task.teacher, task.test) >= min_accuracy
    assert task.teacher(task.example_input).shape == (1, 10)


def test_digits_teacher_is_accurate(digits_task):
    check_teacher(digits_task, 0.98)
    assert any(isinstance(m, nn.BatchNorm2d) for m in digits_task.teacher.modules())
    assert (len(digits_task.train), len(digits_task.val), len(digits_task.test)) == (1077, 360, 360)


def test_a_teacher_trains_once_per_fingerprint_and_is_then_read_from_the_cache(tmp_path, monkeypatch):
    """The session's teachers come from a cache kept between runs (conftest): what they are read by, here on a small
    network trained afresh. A teacher trains again when anything that trains it changes, its training code too."""
    import autocomp.tasks.base as base

    trained = []
    fit = base.fit
    monkeypatch.setattr(base, "fit", lambda *args, **kwargs: trained.append(kwargs["epochs"]) or fit(*args, **kwargs))
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    data = Split(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)), torch.arange(256) % 4)

    def teacher(epochs: int = 2) -> nn.Module:
        return base.cached_teacher("tiny", lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), data,
                                   epochs=epochs, lr=1e-2, weight_decay=0.0, seed=0)

    fresh = teacher()
    assert trained == [2] and [p.name.partition("-")[0] for p in (tmp_path / "teachers").glob("*.pt")] == ["tiny"]
    again = teacher()  # from the cache: no training, the same weights
    assert trained == [2] and all(a.equal(b) for a, b in zip(fresh.parameters(), again.parameters(), strict=True))
    teacher(epochs=3)  # other settings: another teacher
    monkeypatch.setattr(base, "_training_code", lambda: "changed")
    teacher()  # other training code: trained afresh too
    assert trained == [2, 3, 2] and len(list((tmp_path / "teachers").glob("*.pt"))) == 3


def test_a_teachers_early_checkpoint_is_its_own_training_stopped_at_the_share_and_cached(tmp_path, monkeypatch):
    """What lottery-ticket rewinding resets to: the teacher's state after ``share`` of its epochs, the same
    training as the cached teacher's (its schedule spans every epoch), trained once and then read from the cache."""
    import autocomp.tasks.base as base

    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    data = Split(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)), torch.arange(256) % 4)
    build = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    settings = dict(epochs=10, lr=1e-2, weight_decay=0.0, seed=0)
    teacher = base.cached_teacher("tiny", build, data, **settings)
    seen = []
    torch.manual_seed(0)
    model = build()
    base.fit(model, data, base.cross_entropy, epochs=10, lr=1e-2, seed=0, progress=False,
             on_epoch_end=lambda g: seen.append({k: v.clone() for k, v in model.state_dict().items()}))
    early = base.early_teacher("tiny", build, data, share=0.3, **settings)()
    assert all(torch.equal(early[k], seen[2][k]) for k in early)  # after epoch 3 of 10
    assert not all(torch.equal(early[k], v) for k, v in teacher.state_dict().items())
    trained = []
    fit = base.fit
    monkeypatch.setattr(base, "fit", lambda *args, **kwargs: trained.append(1) or fit(*args, **kwargs))
    again = base.early_teacher("tiny", build, data, share=0.3, **settings)()  # another process's first call
    assert trained == [] and all(torch.equal(early[k], again[k]) for k in early)
    assert len(list((tmp_path / "teachers").glob("tiny-seed0-early-*.pt"))) == 1


def test_a_corrupt_cached_teacher_is_named_and_trained_again(tmp_path, monkeypatch, capsys):
    import autocomp.tasks.base as base

    trained = []
    fit = base.fit
    monkeypatch.setattr(base, "fit", lambda *args, **kwargs: trained.append(1) or fit(*args, **kwargs))
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    data = Split(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 4)

    def teacher() -> nn.Module:
        return base.cached_teacher("tiny", lambda: nn.Sequential(nn.Linear(8, 4)), data, epochs=1, lr=1e-2,
                                   weight_decay=0.0, seed=0)

    fresh = teacher()
    (path,) = (tmp_path / "teachers").glob("*.pt")
    assert (path.parent / (path.name + ".sha256")).read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a full disk or a killed writer
    capsys.readouterr()
    again = teacher()
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autocomp:")]  # no bars
    assert trained == [1, 1] and len(said) == 1
    assert said[0].startswith(f"autocomp: warning: the cached weights of tiny-seed0 {path} is corrupt: its SHA-256 "
                              "is not the one recorded")
    assert all(a.equal(b) for a, b in zip(fresh.parameters(), again.parameters(), strict=True))  # rebuilt the same
    (path.parent / (path.name + ".sha256")).unlink()  # a file cached before digests were kept: read, digest kept
    teacher()
    assert trained == [1, 1] and (path.parent / (path.name + ".sha256")).exists()
    path.write_bytes(b"not a checkpoint")
    (path.parent / (path.name + ".sha256")).unlink()
    teacher()
    assert trained == [1, 1, 1] and "it cannot be read" in capsys.readouterr().err


@pytest.mark.slow
def test_mnist1d_teacher_reaches_the_papers_cnn_baseline(mnist1d_task):
    check_teacher(mnist1d_task, 0.94)
    assert mnist1d_task.example_input.shape == (1, 1, 40)
    assert (len(mnist1d_task.train), len(mnist1d_task.val), len(mnist1d_task.test)) == (4000, 2000, 2000)


def test_mnist1d_lean_teacher_is_small_and_accurate_on_mnist1ds_splits(mnist1d_lean_task, monkeypatch):
    import autocomp.tasks.mnist1d

    task = mnist1d_lean_task
    assert sum(p.numel() for p in task.teacher.parameters()) < 10_000
    assert task.score(task.teacher, task.val) > 0.8
    assert task.score(task.teacher, task.test) > 0.8
    assert task.teacher(task.example_input).shape == (1, 10)
    # mnist1d's own factory with its teacher left untrained: the data are the same tensors
    monkeypatch.setattr(autocomp.tasks.mnist1d, "cached_teacher", lambda key, build, train, **settings: build())
    mnist1d = load_task("mnist1d")
    for lean, big in zip((task.train, task.val, task.test), (mnist1d.train, mnist1d.val, mnist1d.test), strict=True):
        assert digest([lean.x, lean.y]) == digest([big.x, big.y])
    assert task.fingerprint()["data_sha256"] == mnist1d.fingerprint()["data_sha256"]


def test_training_gives_the_same_weights_whatever_the_thread_count_before():
    from autocomp.train import cross_entropy, fit
    from tests.conftest import SmallCNN

    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, 10, (256,), generator=g))
    trained = []
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)  # what the machine (or another library) left set
        torch.manual_seed(0)
        trained.append(fit(SmallCNN(), data, cross_entropy, epochs=2, lr=1e-2, progress=False).state_dict())
        assert torch.get_num_threads() == threads  # restored
    torch.set_num_threads(before)
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_task_references_resolve_or_explain():
    assert {"digits", "mnist1d", "mnist1d_lean"} <= set(TASKS.names())
    with pytest.raises(ConfigError, match="Did you mean 'digits'"):
        load_task("digit")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_task("no_such_module:make")


def test_a_split_holds_every_batch_of_a_data_loader_in_order():
    x, y = torch.randn(23, 1, 8, 8), torch.randint(0, 10, (23,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.zeros(23)), batch_size=5)
    split = Split.from_loader(loader)  # a third item per batch (e.g. sample weights) is ignored
    assert torch.equal(split.x, x) and torch.equal(split.y, y) and split.y.dtype == torch.long


def test_the_transformer_teacher_is_a_half_million_parameter_encoder_with_whole_heads_to_remove():
    from autocomp.compress.heads import attention_layers, drop_heads, head_counts
    from autocomp.tasks.mnist1d import MNIST1DTransformer, shift

    model = MNIST1DTransformer().eval()
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.6e6
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    assert len(attention_layers(model)) == 4 and set(head_counts(model).values()) == {4}
    drop_heads(model, 0.5, head_counts(model))
    assert set(head_counts(model).values()) == {2} and model(torch.randn(2, 1, 40)).shape == (2, 10)
    x = torch.arange(80.0).reshape(2, 1, 40)
    moved = shift(x, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(torch.roll(row, k, -1), m) for k in range(-3, 4))
               for row, m in zip(x, moved, strict=True))


@pytest.mark.parametrize(("spoil", "message"), [
    (lambda t: t.train.x.__setitem__(slice(0, 64, 20), float("inf")),
     "task 'spoilt': the train split holds non-finite inputs (NaN or inf) in 4 of 64 samples (the first: sample 0); "
     "clean or drop them."),
    (lambda t: t.val.y.__setitem__(slice(0, 2), torch.tensor([10, -1])),
     "task 'spoilt': the val split has 2 label(s) outside the teacher's 10 classes [0, 9]: [-1, 10]."),
    (lambda t: setattr(t, "test", Split(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))),
     "task 'spoilt': the test split is empty."),
    (lambda t: setattr(t, "test", Split(torch.zeros(4, 1, 8, 9), torch.zeros(4, dtype=torch.long))),
     "task 'spoilt': the test split has samples shaped (1, 8, 9), but the example input's sample is (1, 8, 8)."),
    (lambda t: setattr(t, "val", Split(t.val.x, t.val.y.float())),
     "task 'spoilt': the val split must have integer class labels shaped (N,), but has torch.float32 labels "
     "shaped (64,)."),
], ids=["inf", "labels", "empty", "shape", "float-labels"])
def test_a_users_data_is_checked_where_the_task_loads(spoil, message):
    from tests.tasks import fixed_view

    task = fixed_view()
    task.train, task.val, task.test = (Split(s.x.clone(), s.y.clone()) for s in (task.train, task.val, task.test))
    spoil(task)
    with pytest.raises(ConfigError) as err:
        check_task(task, "spoilt")
    assert str(err.value) == message
