import pytest
import torch
from torch import nn

from edgetrain import models, scope
from edgetrain.recipe import Scope


def ids(params):
    return {id(p) for p in params}


def test_last_blocks_selects_by_structure():
    net = models.build("vit")
    sel = scope.select(net, Scope(kind="last_blocks", k=2))
    expected = ids(net.blocks[2].parameters()) | ids(net.blocks[3].parameters())
    expected |= ids(net.head.parameters())
    assert ids(sel.params) == expected


def test_blocks_by_index_with_negative_index_and_without_head():
    net = models.build("mlp")
    sel = scope.select(net, Scope(kind="blocks", blocks=(-1,), include_head=False))
    assert ids(sel.params) == ids(net.blocks[-1].parameters())
    with pytest.raises(IndexError, match="out of range"):
        scope.select(net, Scope(kind="blocks", blocks=(5,)))


def test_bias_scope_is_every_one_dimensional_tensor():
    net = models.build("cnn")
    sel = scope.select(net, Scope(kind="bias"))
    assert sel.params and all(p.dim() == 1 for p in sel.params)
    assert len(sel.params) == sum(1 for p in net.parameters() if p.dim() == 1)


def test_predicate_scope_on_an_arbitrary_module():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    sel = scope.apply(
        net,
        Scope(
            kind="predicate",
            predicate=lambda mn, m, pn, p: isinstance(m, nn.Linear) and pn == "weight",
        ),
    )
    assert ids(sel.params) == {id(net[0].weight), id(net[2].weight)}
    assert not net[0].bias.requires_grad and net[0].weight.requires_grad


def test_empty_scope_is_an_error():
    net = models.build("mlp")
    with pytest.raises(scope.EmptyScopeError, match="selects no parameter"):
        scope.apply(net, Scope(kind="predicate", predicate=lambda *a: False))
    with pytest.raises(scope.EmptyScopeError):
        scope.select(net, Scope(kind="last_blocks", k=0, include_head=False))


def test_blocks_found_structurally_without_a_blocks_attribute():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(3, 3)
            self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
            self.out = nn.Linear(3, 2)

    net = Odd()
    sel = scope.select(net, Scope(kind="last_blocks", k=1))
    assert ids(sel.params) == ids(net.layers[3].parameters()) | ids(net.out.parameters())


def test_tied_parameters_are_selected_once():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = net[0].weight
    sel = scope.select(net, Scope(kind="all"))
    assert len(sel.params) == len(ids(sel.params)) == 3


def test_frozen_front_builds_no_graph():
    net = models.build("mlp")
    scope.apply(net, Scope(kind="last_blocks", k=0))  # head only
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net(torch.randn(2, 1, 28, 28)).sum().backward()
    # Only the head's input (the last block's output) is saved for its weight gradient.
    assert len(saved) == 1 and saved[0].shape == (2, 128)


def test_channel_masks_are_over_input_channels_and_count_what_trains():
    net = models.build("vit")
    sel = scope.select(net, Scope(kind="channels", blocks=(3,), channel_ratio=0.25))
    fc2 = net.blocks[3].mlp.fc2.weight  # (64, 128): 32 of the 128 input columns train
    mask = sel.channel_masks["blocks.3.mlp.fc2.weight"]
    assert mask.shape == (1, 128) and int(mask.sum()) == 32
    dense = scope.select(net, Scope(kind="channels", blocks=(3,), channel_ratio=1.0))
    assert not dense.channel_masks
    weights = [p for p in net.blocks[3].parameters() if p.dim() == 2]
    saved = sum(p.numel() - p.shape[0] * max(1, int(p.shape[1] * 0.25)) for p in weights)
    assert dense.numel() - sel.numel() == saved
    assert fc2.shape[0] * 32 == int(mask.expand_as(fc2).sum())
