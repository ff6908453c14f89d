"Models (nntrain.models): output shapes, parameter counts worked out by hand, xresnet's zero-initialised batch norms."
import pytest
import torch
from torch import nn

from nntrain.models import (AdaptiveConcatPool2d, BasicBlock, Bottleneck, cnn_layers, resnet, simple_cnn, xresnet,
                            xresnet18, xresnet34, xresnet50)


def n_params(m: nn.Module) -> int: return sum(p.numel() for p in m.parameters())
def conv(ci: int, co: int, k: int, bias: bool = False) -> int: return ci * co * k * k + (co if bias else 0)
def bn(c: int) -> int: return 2 * c   # weight and bias


# -- counts by hand, from the layer lists ---------------------------------------------------------------------------

def xresnet_count(layers, bottleneck: bool, c_in: int = 3, n_out: int = 1000) -> int:
    "Parameters of an xresnet, added up layer by layer."
    total = conv(c_in, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64)   # stem
    ni = 64
    for n, w in zip(layers, (64, 128, 256, 512), strict=True):
        for _ in range(n):
            if bottleneck:
                nf = 4 * w
                total += conv(ni, w, 1) + bn(w) + conv(w, w, 3) + bn(w) + conv(w, nf, 1) + bn(nf)
            else:
                nf = w
                total += conv(ni, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            if ni != nf: total += conv(ni, nf, 1) + bn(nf)   # shortcut projection (its pool has no parameters)
            ni = nf
    return total + ni * n_out + n_out   # linear head


def test_xresnet_parameter_counts_by_hand():
    assert n_params(xresnet18()) == xresnet_count((2, 2, 2, 2), False) == 11_708_744
    assert n_params(xresnet34()) == xresnet_count((3, 4, 6, 3), False) == 21_816_904
    assert n_params(xresnet50()) == xresnet_count((3, 4, 6, 3), True) == 25_576_264
    assert n_params(xresnet18(c_in=1, n_out=10)) == xresnet_count((2, 2, 2, 2), False, c_in=1, n_out=10)


def test_xresnet_counts_match_torchvision_up_to_the_stem():
    "torchvision's published counts (weights metadata) with its 7×7 stem swapped for the three 3×3 convolutions."
    weights = pytest.importorskip('torchvision.models')
    tv_stem = conv(3, 64, 7) + bn(64)
    x_stem = conv(3, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64)
    for ours, tv in ((xresnet18, weights.ResNet18_Weights), (xresnet34, weights.ResNet34_Weights),
                     (xresnet50, weights.ResNet50_Weights)):
        assert n_params(ours()) == tv.IMAGENET1K_V1.meta['num_params'] - tv_stem + x_stem


def test_resnet_and_cnn_layers_parameter_counts_by_hand():
    def resblock(a, b):
        return conv(a, b, 3) + bn(b) + conv(b, b, 3) + bn(b) + (conv(a, b, 1) + bn(b) if a != b else 0)
    widths = (1, 8, 16, 32, 64, 128, 256)
    expected = sum(resblock(a, b) for a, b in zip(widths[:-1], widths[1:])) + 256 * 10 + bn(10)
    assert n_params(resnet()) == expected == 1_228_404
    expected = (conv(1, 8, 5) + bn(8) + conv(8, 16, 3) + bn(16) + conv(16, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64)
                + conv(64, 10, 3, bias=True))
    assert n_params(cnn_layers()) == expected == 30_402
    assert n_params(simple_cnn()) == (conv(1, 16, 3) + bn(16) + conv(16, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64)
                                      + conv(64, 128, 3) + bn(128) + 128 * 10 + 10)


# -- shapes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [1, 7, 17, 28, 32, 64])
def test_xresnet18_any_input_size(size):
    torch.manual_seed(0)
    out = xresnet18(c_in=1, n_out=10)(torch.randn(2, 1, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_xresnet_shapes_and_options():
    torch.manual_seed(0)
    assert xresnet34(n_out=5)(torch.randn(2, 3, 32, 48)).shape == (2, 5)
    m = xresnet50(c_in=4, n_out=7, p=0.3)
    assert m(torch.randn(2, 4, 32, 32)).shape == (2, 7)
    assert [type(l).__name__ for l in m.head] == ['AdaptiveAvgPool2d', 'Flatten', 'Dropout', 'Linear']
    assert m.head[2].p == 0.3 and m.head[-1].in_features == 2048
    assert [type(l).__name__ for l in xresnet18().head] == ['AdaptiveAvgPool2d', 'Flatten', 'Linear']
    body = m[:-1]   # everything but the head: features for a new head
    assert body(torch.randn(2, 4, 32, 32)).shape == (2, 2048, 1, 1)
    with pytest.raises(ValueError, match='same length'): xresnet(BasicBlock, (2, 2), widths=(64, 128, 256))
    with pytest.raises(ValueError, match='dropout p'): xresnet18(p=1.5)


def test_xresnet_stem_and_stage_layout():
    m = xresnet18(c_in=3)
    convs = [s[0] for s in m.stem]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert isinstance(m.maxpool, nn.MaxPool2d)
    first = m.stage2[0]
    assert isinstance(first.shortcut[0], nn.AvgPool2d) and first.shortcut[0].ceil_mode
    assert first.shortcut[1][0].kernel_size == (1, 1) and isinstance(first.shortcut[1][1], nn.BatchNorm2d)
    assert len(m.stage1[0].shortcut) == 0 and len(m.stage2[1].shortcut) == 0   # identity: same shape
    b = xresnet50().stage2[0]
    assert [c[0].stride for c in b.convs] == [(1, 1), (2, 2), (1, 1)]   # the stride sits on the 3×3 (ResNet-B)
    assert xresnet50().stage1[0].shortcut[0][0].in_channels == 64   # 64 → 256 at stride 1: projection, no pool


def test_last_batchnorm_of_each_branch_is_zero_and_the_block_starts_as_identity():
    for model, n_blocks in ((xresnet18(), 8), (xresnet34(), 16), (xresnet50(), 16)):
        blocks = [b for b in model.modules() if isinstance(b, (BasicBlock, Bottleneck))]
        assert len(blocks) == n_blocks
        for b in blocks:
            last = b.convs[-1][1]
            assert isinstance(last, nn.BatchNorm2d) and getattr(last, 'zero_init', False)
            assert torch.equal(last.weight, torch.zeros_like(last.weight))
            others = [m for m in b.modules() if isinstance(m, nn.BatchNorm2d) and m is not last]
            assert all(torch.equal(o.weight, torch.ones_like(o.weight)) for o in others)
    b = BasicBlock(8, 8).train()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad(): assert torch.equal(b(x), torch.relu(x))   # zero branch: identity, then ReLU


def test_adaptive_concat_pool():
    x = torch.randn(3, 5, 4, 6)
    out = AdaptiveConcatPool2d()(x)
    assert out.shape == (3, 10, 1, 1)
    assert torch.equal(out[:, :5].flatten(1), x.amax((2, 3)))
    assert torch.allclose(out[:, 5:].flatten(1), x.mean((2, 3)))
    head = nn.Sequential(AdaptiveConcatPool2d(), nn.Flatten(), nn.Linear(10, 2))
    assert head(x).shape == (3, 2)
