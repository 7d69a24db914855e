import pytest
import torch

from edgetrain import models


@pytest.mark.parametrize("name", models.names())
def test_reference_models_expose_blocks_head_and_shapes(name):
    net = models.build(name, num_classes=7)
    assert isinstance(net.blocks, torch.nn.ModuleList) and len(net.blocks) >= 2
    assert isinstance(net.head, torch.nn.Module)
    assert net.input_shape == (1, 28, 28) and net.num_classes == 7
    assert net(torch.randn(3, *net.input_shape)).shape == (3, 7)


def test_vit_returns_per_head_attention_weights_that_are_distributions():
    net = models.build("vit")
    x = net.embed(torch.randn(2, 1, 28, 28))
    out, weights = net.blocks[0](x, return_attention=True)
    assert out.shape == x.shape
    n_tokens = 1 + net.grid_size[0] * net.grid_size[1]
    assert weights.shape == (2, net.blocks[0].attn.num_heads, n_tokens, n_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, n_tokens))
    # The block with and without returning weights computes the same output.
    torch.testing.assert_close(net.blocks[0](x), out)


def test_unknown_model_suggests():
    with pytest.raises(KeyError, match="Did you mean 'vit'"):
        models.build("vitt")
