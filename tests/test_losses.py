"Label smoothing and flat cross-entropy: equivalence with torch, soft targets, and use through the per-item path."
import pytest
import torch
import torch.nn.functional as F

from nntrain.batch import per_item_loss
from nntrain.losses import LabelSmoothingCrossEntropy, cross_entropy_flat


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('eps', [0., 0.1, 0.3, 1.])
@pytest.mark.parametrize('shape', [(16, 7), (4, 7, 3, 2)])
def test_matches_torch_class_targets(reduction, eps, shape):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[::5] = -100    # some ignored items
    ours = LabelSmoothingCrossEntropy(eps, reduction)(p, y)
    ref = F.cross_entropy(p, y, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_matches_torch_soft_targets(reduction):
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(10, 4, generator=g), torch.softmax(torch.randn(10, 4, generator=g), 1)
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.2, reduction)(p, t),
                               F.cross_entropy(p, t, label_smoothing=0.2, reduction=reduction))


def test_gradients_match_torch():
    p = torch.randn(6, 5, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    LabelSmoothingCrossEntropy(0.1)(p, y).backward()
    F.cross_entropy(q, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(p.grad, q.grad)


def test_per_item_loss_switches_reduction_and_restores_it():
    ls = LabelSmoothingCrossEntropy(0.1)
    p, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    items = per_item_loss(ls, p, y)
    assert items.shape == (5,) and ls.reduction == 'mean'
    torch.testing.assert_close(items.mean(), ls(p, y))


def test_mixed_losses_smooth_once():
    "Blending two smoothed losses equals one smoothed loss on the mixed distribution, not a doubly smoothed one."
    g = torch.Generator().manual_seed(2)
    p = torch.randn(8, 5, generator=g)
    y1, y2 = torch.randint(0, 5, (2, 8), generator=g)
    ls, lam = LabelSmoothingCrossEntropy(0.1), 0.3
    mixed = lam * F.one_hot(y1, 5).float() + (1 - lam) * F.one_hot(y2, 5).float()
    torch.testing.assert_close(lam * ls(p, y1) + (1 - lam) * ls(p, y2), ls(p, mixed))


def test_bad_arguments():
    with pytest.raises(ValueError, match='eps'): LabelSmoothingCrossEntropy(1.5)
    with pytest.raises(ValueError, match='reduction'): LabelSmoothingCrossEntropy(reduction='avg')
    with pytest.raises(ValueError, match='shape'): LabelSmoothingCrossEntropy()(torch.randn(4, 3), torch.rand(4, 2))


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('shape', [(5, 7), (3, 4, 7), (2, 3, 4, 7)])
def test_flat_cross_entropy_is_torch_with_classes_last(reduction, shape):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[::3] = -100    # padding
    ref = F.cross_entropy(p.movedim(-1, 1), y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(cross_entropy_flat(p, y, reduction=reduction, label_smoothing=0.1), ref)


def test_flat_cross_entropy_per_position_soft_targets_and_errors():
    p, y = torch.randn(2, 5, 9), torch.randint(0, 9, (2, 5))
    items = per_item_loss(cross_entropy_flat, p, y)   # what get_preds(with_loss=True) calls
    assert items.shape == (2, 5)
    torch.testing.assert_close(items.mean(), cross_entropy_flat(p, y))
    t = torch.softmax(torch.randn(2, 5, 9), -1)
    torch.testing.assert_close(cross_entropy_flat(p, t), F.cross_entropy(p.movedim(-1, 1), t.movedim(-1, 1)))
    with pytest.raises(ValueError, match=r'scores \(B, \.\.\., C\)'): cross_entropy_flat(p.movedim(-1, 1), y)
