import pytest
import torch
import torch.nn.functional as F

from dfm import LaplacianPyramid, down, up


def up_by_hand(x):
    """Bilinear x2 with align_corners=False along each axis: out[2i] = .75 x[i] + .25 x[i-1],
    out[2i+1] = .75 x[i] + .25 x[i+1], with edge samples repeated."""
    def along(x, dim):
        n = x.shape[dim]
        prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
        nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)
    return along(along(x, 2), 3)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 32), (4, 8), (8, 16)])
def test_exact_reconstruction(stages, channels, size):
    if size % 2 ** (stages - 1):
        pytest.skip("size not divisible")
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    pyramid = LaplacianPyramid(stages)
    levels = pyramid.decompose(x)
    assert [lvl.shape[-1] for lvl in levels] == [size // 2 ** (stages - 1 - s) for s in range(stages)]
    assert pyramid.level_shapes((channels, size, size)) == [tuple(lvl.shape[1:]) for lvl in levels]
    torch.testing.assert_close(pyramid.recompose(levels), x, rtol=0, atol=1e-12)


def test_non_square_and_float32():
    x = torch.randn(3, 4, 16, 32)
    pyramid = LaplacianPyramid(3)
    levels = pyramid.decompose(x)
    assert levels[0].shape == (3, 4, 4, 8)
    torch.testing.assert_close(pyramid.recompose(levels), x, rtol=0, atol=1e-5)


def test_down_is_average_pooling_and_up_is_bilinear():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(up(x), up_by_hand(x), rtol=0, atol=1e-12)


def test_coarsest_level_is_block_average():
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    levels = LaplacianPyramid(3).decompose(x)
    torch.testing.assert_close(levels[0], F.avg_pool2d(x, 4), rtol=0, atol=1e-12)
    # the finest detail level is what bilinear upsampling of the half-resolution image misses
    torch.testing.assert_close(levels[2], x - up_by_hand(F.avg_pool2d(x, 2)), rtol=0, atol=1e-12)


def test_one_stage_is_identity():
    x = torch.randn(2, 3, 5, 7)
    levels = LaplacianPyramid(1).decompose(x)
    assert len(levels) == 1 and torch.equal(levels[0], x)


def test_bad_sizes_and_stage_counts():
    with pytest.raises(ValueError, match="divisible by 2\\^\\(stages-1\\) = 4"):
        LaplacianPyramid(3).decompose(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="num_stages"):
        LaplacianPyramid(0)
    with pytest.raises(ValueError, match="expected 2 levels"):
        LaplacianPyramid(2).recompose([torch.zeros(1, 1, 4, 4)])
