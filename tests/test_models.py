import pytest
import torch

from edgetrain import models

IMAGE_MODELS = [n for n in models.names() if n != "causal_lm"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
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


def test_the_causal_lm_is_causal_and_scores_its_labels():
    """Logits at t do not depend on the tokens after t; the loss with labels is the mean
    next-token cross-entropy over the labelled positions; a padded key changes nothing
    before it and the tied head shares the embedding."""
    net = models.build("causal_lm", vocab_size=50, dim=16, depth=2, max_len=12)
    assert isinstance(net.blocks, torch.nn.ModuleList) and len(net.blocks) == 2
    ids = torch.randint(0, 50, (2, 12))
    logits = net(ids)
    assert logits.shape == (2, 12, 50)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    later = net(changed)
    torch.testing.assert_close(later[:, :7], logits[:, :7])
    assert not torch.allclose(later[:, 7:], logits[:, 7:])
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    out = net(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 50), labels[:, :-1].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, 9:] = 0
    torch.testing.assert_close(net(ids, attention_mask=mask)[:, :9], logits[:, :9])
    tied = models.build("causal_lm", vocab_size=50, dim=16, tie_head=True)
    assert tied.head.weight is tied.tok_emb.weight


def test_unknown_model_suggests():
    with pytest.raises(KeyError, match="Did you mean 'vit'"):
        models.build("vitt")
