"""The one training loop, used for teachers (cross-entropy) and students (distillation)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from autocomp import phase
from autocomp.errors import check_range

# loss(student_logits, inputs, labels, indices of the batch in its split) -> scalar
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class Split:
    """One data split held in memory: inputs ``x`` (N, ...) and integer labels ``y`` (N,)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def from_loader(cls, loader: Iterable) -> Split:
        """Every (x, y) batch of a ``torch.utils.data.DataLoader`` (or any iterable of them), held in memory in
        order: autocomp shuffles, batches and calibrates from tensors. Extra items of a batch are ignored."""
        xs, ys = [], []
        for x, y, *_ in loader:
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
        if not xs:
            raise ValueError("the loader gave no batches")
        return cls(torch.cat(xs), torch.cat(ys).long())

    def batch_indices(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield the indices of each minibatch; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (x, y) minibatches; shuffled when a generator is given."""
        for idx in self.batch_indices(batch_size, generator):
            yield self.x[idx], self.y[idx]


TRAIN_THREADS = 2  # fixed, not the machine's core count: float sums depend on how work is split


@contextlib.contextmanager
def deterministic(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Train reproducibly on any machine of one kind: a fixed intra-op thread count and torch's
    deterministic algorithms, restored afterwards."""
    before, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(strict)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cross_entropy(logits: Tensor, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y)


@dataclass
class EarlyStopping:
    """Stop a ``fit`` once ``evaluate(model)`` (higher is better: a validation metric) has not improved for
    ``patience`` epochs in a row, and keep the weights of the best epoch. ``patience`` 0 is off: every epoch
    runs and nothing is scored, as without it.

    ``fit`` scores the model after each epoch (``step``) and loads the best epoch's state back at the end
    (``restore``), the learned parts of its loss with it (``kept``: a projection, mutual learning's peers, a
    self-distilled student's classifiers), so a fit stopped early goes on from one epoch's state of both; an
    epoch is the best only when it scores strictly higher than every earlier one. Afterwards
    ``epochs_run`` epochs were trained and epoch ``best_epoch`` (1-based; 0: none scored) scored ``best_score``.
    One instance serves one fit.
    """

    evaluate: Callable[[nn.Module], float]
    patience: int = 0
    epochs_run: int = field(default=0, init=False)
    best_epoch: int = field(default=0, init=False)
    best_score: float = field(default=-float("inf"), init=False)
    _best_state: dict[str, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range("patience", self.patience, 0, 1000)

    def step(self, model: nn.Module, kept: nn.Module | None = None) -> bool:
        """Count an epoch and, when on, score ``model`` in eval mode without gradients (then back in train
        mode) and remember the state of ``kept`` (default ``model``; a module holding it) if it is the best yet;
        True when training should stop."""
        self.epochs_run += 1
        if self.patience == 0:
            return False
        with torch.no_grad():
            score = float(self.evaluate(model.eval()))
        model.train()
        if score > self.best_score:
            self.best_epoch, self.best_score = self.epochs_run, score
            # parametrizations (pruning masks, fake quantizers) keep their tensors in the state dict too
            self._best_state = {k: v.detach().clone() for k, v in (kept or model).state_dict().items()}
        return self.epochs_run - self.best_epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights and buffers back into ``model`` (``step``'s ``kept``; nothing to do when
        none was scored)."""
        if self._best_state is not None:
            model.load_state_dict(self._best_state)


def fit(
    model: nn.Module,
    data: Split,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    regularizer: Callable[[], Tensor] | None = None,
    on_epoch_end: Callable[[torch.Generator], None] | None = None,
    early_stopping: EarlyStopping | None = None,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with AdamW and a cosine schedule; deterministic for a given seed
    (``deterministic``: the same weights on every machine of one kind, whatever its core count).

    ``regularizer()`` is added to every step's loss (e.g. the L1 penalty of network slimming);
    ``on_epoch_end(generator)`` runs between epochs, after each one that another follows (e.g. sparse-training
    regrowth). ``early_stopping`` may end the fit before ``epochs`` and restores its best epoch; the cosine
    schedule still spans ``epochs``, so a stopped fit ends at a higher learning rate.
    ``loss_fn`` gets each batch's indices into ``data`` too; with ``augment`` its inputs are no longer
    ``data.x[indices]`` (so a loss that looks targets up by index, as ``Distiller`` does, needs no ``augment``).
    """
    from tqdm.auto import tqdm

    if epochs <= 0:
        return model.eval()
    generator = seed_everything(seed)
    kept = nn.ModuleList([model, loss_fn]) if isinstance(loss_fn, nn.Module) else model
    # a loss with learned parts (e.g. FitNet projections) trains them, and early stopping keeps them, with the model
    params = list(kept.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(data) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="step")
    model.train()
    with deterministic():
        for epoch in range(epochs):
            phase.step(f"{desc} epoch {epoch + 1}/{epochs}")
            for idx in data.batch_indices(batch_size, generator):
                x, y = data.x[idx], data.y[idx]
                if augment is not None:
                    x = augment(x, generator)
                loss = loss_fn(model(x), x, y, idx)
                if regularizer is not None:
                    loss = loss + regularizer()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if early_stopping is not None and early_stopping.step(model, kept):
                break
            if on_epoch_end is not None and epoch < epochs - 1:
                on_epoch_end(generator)
    if early_stopping is not None:
        early_stopping.restore(kept)
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
