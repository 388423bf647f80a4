"""TokenLayout round trips between user layouts and (b, n, d) tokens; masks and lengths."""

import pytest
import torch

from vector_quantize_pytorch.core.layout import TokenLayout, check_mask, lens_to_mask

CASES = [
    # (input shape, channel_first, tokens shape, spatial)
    ((2, 5, 3), False, (2, 5, 3), (5,)),
    ((2, 3, 5), True, (2, 5, 3), (5,)),
    ((2, 3), False, (2, 1, 3), ()),
    ((2, 3), True, (2, 1, 3), ()),
    ((2, 3, 4, 5), True, (2, 20, 3), (4, 5)),
    ((2, 3, 2, 4, 5), True, (2, 40, 3), (2, 4, 5)),
]


@pytest.mark.parametrize("shape,channel_first,tokens_shape,spatial", CASES)
def test_to_tokens_and_back_is_identity(shape, channel_first, tokens_shape, spatial):
    x = torch.randn(shape)
    layout = TokenLayout.of(x, channel_first=channel_first)
    tokens = layout.to_tokens(x)
    assert tokens.shape == tokens_shape
    assert layout.spatial == spatial
    assert layout.num_tokens == tokens_shape[1]
    assert torch.equal(layout.from_tokens(tokens), x)


def test_channel_first_tokens_are_feature_vectors_at_each_position():
    x = torch.randn(2, 3, 4, 5)
    tokens = TokenLayout.of(x, channel_first=True).to_tokens(x)
    assert torch.equal(tokens[1, 2 * 5 + 3], x[1, :, 2, 3])


@pytest.mark.parametrize("shape,channel_first,tokens_shape,spatial", CASES)
@pytest.mark.parametrize("tail", [(), (4,)])
def test_indices_round_trip(shape, channel_first, tokens_shape, spatial, tail):
    x = torch.randn(shape)
    layout = TokenLayout.of(x, channel_first=channel_first)
    idx = torch.arange(tokens_shape[0] * tokens_shape[1] * (tail[0] if tail else 1)).reshape(
        tokens_shape[0], tokens_shape[1], *tail
    )
    out = layout.indices_from_tokens(idx)
    assert out.shape == (tokens_shape[0], *spatial, *tail)
    assert torch.equal(layout.indices_to_tokens(out, tail_dims=len(tail)), idx)


def test_from_tokens_keeps_topk_axis_after_spatial_axes():
    x = torch.randn(2, 3, 4, 5)
    layout = TokenLayout.of(x, channel_first=True)
    t = torch.randn(2, 20, 7, 3)
    out = layout.from_tokens(t)
    assert out.shape == (2, 3, 4, 5, 7)
    assert torch.equal(out[1, :, 2, 3, 6], t[1, 2 * 5 + 3, 6])


def test_of_rejects_one_dimensional_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        TokenLayout.of(torch.randn(3), channel_first=False)


def test_lens_to_mask():
    mask = lens_to_mask(torch.tensor([0, 2, 4]), 4)
    expected = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_check_mask():
    assert check_mask(None, 2, 3) is None
    assert check_mask(torch.ones(2, 3), 2, 3).dtype == torch.bool
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq\) = \(2, 3\)"):
        check_mask(torch.ones(2, 4, dtype=torch.bool), 2, 3)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        check_mask([[True] * 3] * 2, 2, 3)
