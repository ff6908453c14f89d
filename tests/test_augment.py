"Augmentation, MixUp/CutMix and test-time augmentation: behaviour on small in-memory data."
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from nntrain.core import CancelFitException, Order, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.batch import per_item_loss
from nntrain.learner import Learner
from nntrain.losses import LabelSmoothingCrossEntropy
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS, cutmix, mixup, per_sample, rand_box


def images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 1, 4, 4, generator=g)
    r, c = torch.randint(0, 4, (2, n), generator=g)
    x[torch.arange(n), 0, r, c] = 1.
    return x, (r // 2) * 2 + c // 2


def image_learner(loss_func=F.cross_entropy, subs=(), seed=0):
    torch.manual_seed(seed)
    x, y = images(seed=seed)
    dls = DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], batch_size=16, seed=seed)
    return Learner(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), dls, loss_func, lr=2., subs=subs)


class Record(Subscriber):
    "Keeps the clean batch (before augmentation) and what the loss saw (after every transform)."
    def __init__(self, order): self.order, self.rows = order, []
    def before_batch(self, learn): self.clean = learn.batch
    def after_loss(self, learn): self.rows.append((learn.training, self.clean, learn.batch, learn.preds.detach(),
                                                   learn.loss.detach()))


class Fail(Subscriber):
    def __init__(self, exc): self.exc = exc
    def after_loss(self, learn):
        if learn.training and learn.iter == 1: raise self.exc


# -- AugmentS ----------------------------------------------------------------------------------------------------
def test_augment_applies_on_train_only():
    calls = []
    def shift(x): calls.append(len(x)); return x + 1.
    rec = Record(Order.AUGMENT - 1)
    learn = image_learner(subs=[AugmentS(shift), rec])
    learn.fit(2)
    assert calls == [16] * 8
    for training, clean, seen, *_ in rec.rows:
        if training: torch.testing.assert_close(seen[0], clean[0] + 1.)
        else: assert seen is clean                                   # validation batches are the loader's own
    learn.validate(); learn.get_preds(); learn.infer(learn.dls.valid.tensors[0][:2])
    assert len(calls) == 8                                           # never on validation or prediction


def test_augment_on_valid_only():
    rec = Record(Order.AUGMENT - 1)
    image_learner(subs=[AugmentS(lambda x: -x, on_train=False, on_valid=True), rec]).fit(1)
    for training, clean, seen, *_ in rec.rows:
        if training: assert seen is clean
        else: torch.testing.assert_close(seen[0], -clean[0])


def test_torchvision_pipeline_and_per_sample():
    rec = Record(Order.AUGMENT - 1)
    tfm = nn.Sequential(v2.RandomHorizontalFlip(p=1.), v2.RandomVerticalFlip(p=1.))
    image_learner(subs=[AugmentS(tfm), rec]).fit(1)
    for training, clean, seen, *_ in rec.rows:
        if training: torch.testing.assert_close(seen[0], clean[0].flip(-1).flip(-2))
    set_seed(0)
    x = torch.arange(16.).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    frac = (per_sample(v2.RandomHorizontalFlip())(x)[:, 0, 0, 0] == 3).float().mean()
    assert 0.3 < frac < 0.7                                          # each sample drew its own flip


# -- the pure functions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('lam', [0., 0.2, 0.5, 0.9, 1.])
def test_mixup_is_convex_and_labels_follow(lam):
    g = torch.Generator().manual_seed(0)
    x, y, perm = torch.randn(10, 3, 5, 5, generator=g), torch.arange(10) * 7, torch.randperm(10, generator=g)
    xm, y1, y2 = mixup(x, y, lam, perm)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    assert torch.equal(y1, y) and torch.equal(y2, y[perm])
    lo, hi = torch.minimum(x, x[perm]), torch.maximum(x, x[perm])
    assert (xm >= lo - 1e-6).all() and (xm <= hi + 1e-6).all()


def test_cutmix_box_fraction_matches_lam():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.arange(8)
    perm = torch.roll(torch.arange(8), 1)                            # no sample is paired with itself
    n_unclipped = 0
    for lam in torch.rand(50, generator=g).tolist():
        state = g.get_state()
        t, b, l, r = rand_box(32, 32, lam, g)
        g.set_state(state)
        xc, y1, y2, lam_adj = cutmix(x, y, lam, perm, generator=g)
        assert torch.equal(y2, y[perm])
        pasted = xc != x
        assert pasted.float().mean().item() == pytest.approx(1 - lam_adj)      # the area the loss weighs
        assert torch.equal(xc[..., t:b, l:r], x[perm][..., t:b, l:r]) and pasted.sum() == 8 * 3 * (b - t) * (r - l)
        side = round(32 * (1 - lam) ** 0.5)
        if (b - t, r - l) == (side, side):                            # not clipped at an edge
            n_unclipped += 1
            assert abs(lam_adj - lam) < 2 / 32                        # only rounding of the sides
    assert n_unclipped > 5


# -- MixUpS / CutMixS --------------------------------------------------------------------------------------------
W = torch.tensor([1., 2., 0.5, 3.])
# name -> (the loss the learner gets, an independent reference `ref(preds, targets, reduction)`)
LOSSES = {
    'function': (lambda: F.cross_entropy, lambda p, t, r: F.cross_entropy(p, t, reduction=r)),
    'module': (lambda: nn.CrossEntropyLoss(), lambda p, t, r: F.cross_entropy(p, t, reduction=r)),
    'weighted': (lambda: nn.CrossEntropyLoss(weight=W), lambda p, t, r: F.cross_entropy(p, t, weight=W, reduction=r)),
    'sum': (lambda: nn.CrossEntropyLoss(reduction='sum'), lambda p, t, r: F.cross_entropy(p, t, reduction=r)),
    # hand-computed smoothing: torch's own label_smoothing, independent of LabelSmoothingCrossEntropy
    'smoothing': (lambda: LabelSmoothingCrossEntropy(0.1),
                  lambda p, t, r: F.cross_entropy(p, t, label_smoothing=0.1, reduction=r)),
}


@pytest.mark.parametrize('mixer', [MixUpS, CutMixS])
@pytest.mark.parametrize('loss', sorted(LOSSES))
def test_mixed_loss_blend_dominant_target_and_clean_validation(mixer, loss):
    make, ref = LOSSES[loss]
    loss_func, mix = make(), mixer(seed=0)
    reduced = lambda p, t: ref(p, t, 'sum' if loss == 'sum' else 'mean')

    class Check(Subscriber):
        order = Order.MIXUP - 1
        def __init__(self): self.n_train, self.n_valid, self.lams = 0, 0, []
        def before_batch(self, learn): self.clean = learn.batch
        def after_loss(self, learn):
            (x, y), p = self.clean, learn.preds
            if not learn.training:
                assert learn.batch is self.clean and mix.lam is None
                torch.testing.assert_close(learn.loss, reduced(p, y))
                self.n_valid += 1
                return
            lam, perm = mix.lam, mix.perm
            self.lams.append(lam)
            if mixer is MixUpS: torch.testing.assert_close(learn.batch[0], lam * x + (1 - lam) * x[perm])
            assert torch.equal(learn.batch[1], y if lam >= 0.5 else y[perm])
            torch.testing.assert_close(learn.loss, lam * reduced(p, y) + (1 - lam) * reduced(p, y[perm]))
            items = per_item_loss(learn.loss_func, p, learn.batch[1])     # the per-item path blends too
            torch.testing.assert_close(items, lam * ref(p, y, 'none') + (1 - lam) * ref(p, y[perm], 'none'))
            self.n_train += 1

    check = Check()
    learn = image_learner(loss_func, subs=[mix, check])
    learn.fit(2)
    assert (check.n_train, check.n_valid) == (8, 2)
    assert min(check.lams) < 0.5 <= max(check.lams)                  # both dominant-target branches were exercised
    assert learn.loss_func is loss_func


@pytest.mark.parametrize('exc', [RuntimeError('boom'), KeyboardInterrupt(), CancelFitException()])
def test_loss_restored_whatever_happens(exc):
    loss_func = LabelSmoothingCrossEntropy()
    learn = image_learner(loss_func, subs=[MixUpS()])
    if isinstance(exc, CancelFitException): learn.fit(1, subs=[Fail(exc)])
    else:
        with pytest.raises(type(exc)) as info: learn.fit(1, subs=[Fail(exc)])
        assert info.value is exc   # the subscriber's own exception, not another of its type
    assert learn.loss_func is loss_func
    learn.fit(1)                                                     # and the learner still trains


def test_one_mixer_per_fit():
    learn = image_learner(subs=[MixUpS()])
    with pytest.raises(ValueError, match='one mixing subscriber'): learn.fit(1, subs=[CutMixS()])
    assert learn.loss_func is F.cross_entropy


def test_reproducible_under_set_seed_and_state_dict():
    def weights(seed):
        set_seed(seed)
        learn = image_learner(subs=[MixUpS()])
        learn.fit(2)
        return learn.model[1].weight.detach()
    assert torch.equal(weights(1), weights(1)) and not torch.equal(weights(1), weights(2))
    a = MixUpS(seed=5)
    state = a.state_dict()
    first = [torch.randperm(8, generator=a.generator) for _ in range(3)]
    b = MixUpS(seed=6)
    b.load_state_dict(state)
    assert all(torch.equal(p, torch.randperm(8, generator=b.generator)) for p in first)


def test_mixup_trains():
    set_seed(0)
    learn = image_learner(subs=[MixUpS()])
    learn.fit(5)
    preds, targs = learn.get_preds(reduce='argmax')
    assert (preds == targs).float().mean() > 0.8


# -- tta ---------------------------------------------------------------------------------------------------------
def trained():
    learn = image_learner()
    learn.fit(1)
    return learn


def test_tta_blend():
    learn = trained()
    plain, targs = learn.get_preds()
    with torch.no_grad(): flipped = learn.model.eval()(learn.dls.valid.tensors[0].flip(-1))
    flip = lambda x: x.flip(-1)
    torch.testing.assert_close(learn.tta(beta=1., transform=flip)[0], plain)
    torch.testing.assert_close(learn.tta(beta=0., transform=flip)[0], flipped)
    torch.testing.assert_close(learn.tta(n=3, beta=0.4, transform=flip)[0], 0.6 * flipped + 0.4 * plain)
    sm = lambda p: p.softmax(1)
    torch.testing.assert_close(learn.tta(transform=flip, act=sm)[0], 0.75 * sm(flipped) + 0.25 * sm(plain))
    assert torch.equal(learn.tta(transform=flip)[1], targs)


def test_tta_random_views_are_averaged():
    learn = trained()
    noise = lambda x: x + torch.randn_like(x)
    set_seed(0)
    preds = learn.tta(n=64, beta=0., transform=noise)[0]
    set_seed(0)
    one = learn.tta(n=1, beta=0., transform=noise)[0]
    assert not torch.allclose(preds, one)                            # different views were drawn and averaged


def test_tta_reuses_augment_and_restores_subscribers():
    learn = image_learner(subs=[AugmentS(lambda x: x.flip(-1)), AugmentS(lambda x: x * 2)])
    learn.fit(1)
    subs = list(learn.subs)
    with torch.no_grad(): both = learn.model.eval()(learn.dls.valid.tensors[0].flip(-1) * 2)
    torch.testing.assert_close(learn.tta(beta=0.)[0], both)
    assert learn.subs == subs
    with pytest.raises(ValueError, match='needs a `transform`'): image_learner().tta()


def test_tta_honours_a_predict_provider():
    class Double(Subscriber):
        def predict(self, learn): learn.preds = 2 * learn.model(learn.batch[0])
    learn = trained()
    plain = learn.get_preds()[0]
    learn.add_subs(Double())
    torch.testing.assert_close(learn.tta(beta=0.5, transform=lambda x: x)[0], 2 * plain)
