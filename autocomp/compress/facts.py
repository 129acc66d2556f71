"""What a recipe is checked and pruned against: a model's prunable layers, Conv/Linear layers, residual blocks and
attention modules, found once per model by tracing and probing it (``model_facts``), and once per teacher for a
search's trials (``teacher_facts``)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from autocomp.compress.blocks import residual_blocks
from autocomp.compress.heads import attention_layers
from autocomp.compress.prune import PrunableLayer, prunable_layers
from autocomp.errors import ConfigError, did_you_mean
from autocomp.features import layer_names
from autocomp.recipe import Recipe

if TYPE_CHECKING:
    from autocomp.tasks.base import Task


@dataclass(frozen=True)
class ModelFacts:
    """A model's prunable layers (``prunable_layers``), its Conv/Linear layers, residual blocks and attention
    modules; ``left_out`` says which groups cannot be pruned."""

    prunable: dict[str, PrunableLayer]
    layers: list[str]
    blocks: list[str]
    attention: list[str]
    left_out: list[str]

    def check(self, recipe: Recipe) -> None:
        """Reject what ``recipe`` asks of layers that this model cannot prune (or quantize) as asked."""
        where = f"the {recipe.task!r} model"
        p, q = recipe.prune, recipe.quantize
        if p.drop_blocks > len(self.blocks):
            raise ConfigError(f"must be at most the {len(self.blocks)} residual blocks of {where} {self.blocks}, but "
                              f"got {p.drop_blocks}.", "recipe.prune.drop_blocks")
        if p.heads > 0 and not self.attention:
            raise ConfigError(f"must be 0: {where} has no attention module whose heads can leave "
                              f"(nn.MultiheadAttention), but got {p.heads}.", "recipe.prune.heads")
        for key in ("layers", "activation_layers"):
            for name in getattr(q, key):
                if name not in self.layers:
                    raise ConfigError(f"is not a Conv/Linear layer of {where} {self.layers}."
                                      f"{did_you_mean(name, self.layers)}", f"recipe.quantize.{key}.{name}")
        named: dict[str, str] = {}  # pruning group -> the member that names it
        for name, layer in p.layers.items():
            field_name = f"recipe.prune.layers.{name}"
            if name not in self.prunable:
                raise ConfigError(f"is not a prunable layer of {where}; prunable layers are {list(self.prunable)}."
                                  f"{did_you_mean(name, self.prunable)}", field_name)
            group = self.prunable[name].group
            if p.granularity == "channel" and group in named:
                partners = [n for n, other in self.prunable.items() if other.group == group]
                raise ConfigError(f"is tied to `{named[group]}` (one pruning group: {partners}); a group's channels "
                                  f"are pruned once, named by one member, but got both.", field_name)
            named[group] = name
            allowed = self.prunable[name].criteria(p.granularity)
            if layer.criterion not in allowed:  # bn_scale where no BatchNorm follows; channel-only criteria
                raise ConfigError(f"must be one of {allowed} for this layer at granularity {p.granularity!r}, "
                                  f"but got {layer.criterion!r}.", f"{field_name}.criterion")


def model_facts(model: nn.Module, example_input: Tensor) -> ModelFacts:
    """Trace and probe ``model`` (up to a second): the facts a recipe is checked and pruned against."""
    left_out: list[str] = []
    return ModelFacts(prunable_layers(model, example_input, left_out=left_out), layer_names(model),
                      residual_blocks(model, example_input), attention_layers(model), left_out)


_FACTS: weakref.WeakKeyDictionary[nn.Module, ModelFacts] = weakref.WeakKeyDictionary()


def teacher_facts(task: Task) -> ModelFacts:
    """The facts of ``task``'s teacher, found once per teacher object while it lives (a search's trials share
    one teacher, never modified)."""
    facts = _FACTS.get(task.teacher)
    if facts is None:
        facts = _FACTS[task.teacher] = model_facts(task.teacher, task.example_input)
    return facts
