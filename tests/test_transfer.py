"Splitters, freezing, discriminative learning rates, adapt_head and fine_tune (nntrain.transfer)."
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18

from nntrain.core import Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.datasets import mnist_sample
from nntrain.learner import Learner
from nntrain.models import resnet, simple_cnn
from nntrain.optim import AdamW as NtAdamW, Momentum, adam_opt, sgd_opt
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, one_cycle_scheds, sched_lin
from nntrain.transfer import adapt_head, cut_body, default_splitter, make_head, n_features

ids = lambda xs: [id(x) for x in xs]   # parameters compare by identity
# By name: running nbs/24_transfer.ipynb in this process (tests/test_notebooks.py) patches Learner again with the
# notebook's own functions and classes.
is_frozen_bn = lambda s: type(s).__name__ == 'FrozenBnS'


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # small convolutions on a shared machine
    yield
    torch.set_num_threads(n)


def img_learner(model=None, opt_func=torch.optim.AdamW, lr=1e-2, n=32, size=16, c=1, **kw) -> Learner:
    "A learner on random `c`-channel images, 10 classes, 4 batches."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, c, size, size, generator=g) + 1, torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    return Learner(model or simple_cnn(), DataLoaders.from_tensors(x, y, x, y, batch_size=8), F.cross_entropy,
                   opt_func, lr=lr, **kw)


def snapshot(model): return {k: v.clone() for k, v in model.state_dict().items()}
def changed(before, model): return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def three_groups(m): return [list(m[:2].parameters()), list(m[2:4].parameters()), list(m[4:].parameters())]


class GroupLRs(Subscriber):
    "The learning rate of each param group at every optimizer step."
    def __init__(self): self.lrs = []
    def after_step(self, learn): self.lrs.append([g['lr'] for g in learn.opt.param_groups])


# -- splitters -----------------------------------------------------------------------------------------------------
def test_default_splitter_sequential_models():
    m = simple_cnn()
    body, head = default_splitter(m)
    assert ids(head) == ids(m[-1].parameters())                     # the Linear after AdaptiveAvgPool2d
    assert ids(body) == ids(m[:4].parameters())
    r = resnet()
    assert ids(default_splitter(r)[1]) == ids(r[-2:].parameters())  # Linear and BatchNorm1d after the pooling
    no_pool = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 10, 3), nn.Flatten())
    assert ids(default_splitter(no_pool)[1]) == ids(no_pool[2].parameters())   # the last child with parameters
    pool_last = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1))
    assert ids(default_splitter(pool_last)[1]) == ids(pool_last[1].parameters())


def test_default_splitter_attribute_heads():
    tv = resnet18(weights=None)
    body, head = default_splitter(tv)
    assert ids(head) == ids(tv.fc.parameters())
    assert set(ids(body)) == set(ids(tv.parameters())) - set(ids(head))
    mb = mobilenet_v3_small(weights=None)
    assert ids(default_splitter(mb)[1]) == ids(mb.classifier.parameters())

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        def forward(self, x): return self.head(self.trunk(x))
    w = WithHead()
    assert [ids(g) for g in default_splitter(w)] == [ids(w.trunk.parameters()), ids(w.head.parameters())]


@pytest.mark.parametrize('model, msg', [(nn.Linear(3, 2), 'Pass splitter='),
                                        (nn.Sequential(nn.Linear(3, 2)), 'no body before its head'),
                                        (nn.Sequential(nn.ReLU()), 'no body before its head')])
def test_default_splitter_refuses(model, msg):
    with pytest.raises(ValueError, match=msg): default_splitter(model)


# -- freezing ------------------------------------------------------------------------------------------------------
OPTS = {'torch AdamW wd': partial(torch.optim.AdamW, weight_decay=0.1),
        'torch SGD momentum wd': partial(torch.optim.SGD, momentum=0.9, weight_decay=0.1),
        'torch Adam L2': partial(torch.optim.Adam, weight_decay=0.1),
        'nntrain AdamW': partial(NtAdamW, weight_decay=0.1),
        'nntrain Momentum': partial(Momentum, weight_decay=0.1),
        'nntrain adam_opt': partial(adam_opt, wd=0.1),
        'nntrain sgd_opt': partial(sgd_opt, wd=0.1)}
HEAD = {'6.weight', '6.bias'}   # simple_cnn: module 6 is the Linear head


@pytest.mark.parametrize('opt_func', OPTS.values(), ids=OPTS.keys())
def test_frozen_body_bitwise_unchanged(opt_func):
    learn = img_learner(opt_func=opt_func).freeze(train_bn=False)
    before = snapshot(learn.model)
    learn.fit(2)
    assert changed(before, learn.model) == HEAD          # weights, batch-norm weights and running statistics


@pytest.mark.parametrize('opt_func', OPTS.values(), ids=OPTS.keys())
def test_frozen_after_training_with_state(opt_func):
    "Momentum and Adam moments built up before the freeze do not keep moving the frozen weights."
    learn = img_learner(opt_func=opt_func, splitter=default_splitter)
    learn.fit(1)
    opt = learn.opt
    learn.freeze(train_bn=False)
    assert learn.opt is opt                              # same groups: the optimizer and its state are kept
    before = snapshot(learn.model)
    learn.fit(1)
    assert changed(before, learn.model) == HEAD


def test_train_bn_keeps_batch_norm_training():
    learn = img_learner(opt_func=partial(torch.optim.AdamW, weight_decay=0.1)).freeze()
    before = snapshot(learn.model)
    learn.fit(1)
    body = {k for k in before if not k.startswith('6.')}
    bn = {k for k in body if '.1.' in k}                 # conv_block(...)[1] is the BatchNorm2d
    assert {'0.1.weight', '0.1.bias', '0.1.running_mean', '0.1.running_var'} <= bn
    assert changed(before, learn.model) == HEAD | bn
    assert not any(is_frozen_bn(s) for s in learn.subs)
    assert all(p.requires_grad for m in learn.model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def test_frozen_parameters_get_no_gradient():
    learn = img_learner().freeze(train_bn=False)
    frozen = learn.param_groups()[0]
    learn.model.train()
    learn.loss_func(learn.model(learn.dls.train.tensors[0][:8]), learn.dls.train.tensors[1][:8]).backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None for p in learn.param_groups()[1])


def test_freeze_sets_default_splitter_and_rebuilds_optimizer():
    learn = img_learner()
    learn.fit(1)
    assert len(learn.opt.param_groups) == 1
    learn.freeze()
    assert learn.splitter.__name__ == "default_splitter" and learn.opt is None
    learn.fit(1)
    assert len(learn.opt.param_groups) == 2
    assert learn.frozen_groups() == [True, False]
    opt = learn.opt
    learn.unfreeze()
    assert learn.opt is opt and learn.frozen_groups() == [False, False]
    assert all(p.requires_grad for p in learn.model.parameters())


def test_unfreeze_without_splitter_keeps_one_group():
    learn = img_learner()
    for p in learn.model.parameters(): p.requires_grad_(False)
    learn.unfreeze()
    assert learn.splitter is None and all(p.requires_grad for p in learn.model.parameters())


def test_freeze_to_counts_groups():
    learn = img_learner(splitter=three_groups)
    assert learn.freeze_to(1).frozen_groups() == [True, False, False]
    assert learn.freeze_to(-1).frozen_groups() == [True, True, False]
    assert learn.freeze_to(-3).frozen_groups() == [False, False, False]
    before = snapshot(learn.model)
    learn.freeze_to(2, train_bn=False)
    learn.fit(1)
    assert {k.split('.')[0] for k in changed(before, learn.model)} == {'6'}   # groups 0-1: modules 0-3


def test_frozen_bn_survives_a_subscriber_toggling_modes():
    "A subscriber that evaluates mid-epoch and calls model.train() after does not unfreeze the batch norms."
    class EvalEveryStep(Subscriber):
        def after_step(self, learn):
            learn.model.eval()
            learn.model.train()
    learn = img_learner().freeze(train_bn=False)
    before = snapshot(learn.model)
    learn.fit(2, subs=[EvalEveryStep()])
    assert changed(before, learn.model) == HEAD


def test_checkpoint_of_a_frozen_learner(tmp_path):
    "Freezing is not saved: freeze the new learner the same way, then load (its optimizer has the groups)."
    learn = img_learner().freeze(train_bn=False)
    learn.fit(1)
    path = learn.save(tmp_path / 'frozen.pt')
    fresh = img_learner()
    with pytest.raises(ValueError, match='param groups'): fresh.load(path)
    fresh.freeze(train_bn=False).load(path)
    before = snapshot(fresh.model)
    fresh.fit(1)
    assert changed(before, fresh.model) == HEAD


def test_train_bn_false_then_true_removes_frozen_bn():
    learn = img_learner().freeze(train_bn=False)
    assert sum(is_frozen_bn(s) for s in learn.subs) == 1
    learn.freeze(train_bn=False)
    assert sum(is_frozen_bn(s) for s in learn.subs) == 1   # replaced, not added twice
    learn.freeze()
    assert not any(is_frozen_bn(s) for s in learn.subs)


def test_frozen_bn_modes_restored_after_fit():
    learn = img_learner().freeze(train_bn=False)
    learn.model.eval()
    learn.fit(1)
    assert not any(m.training for m in learn.model.modules())      # the learner restores the modes it found


@pytest.mark.parametrize('n, msg', [(2, r'n must be in \[-2, 1\]'), (-3, '2 parameter groups'),
                                    (1.0, 'n must be an int'), (True, 'n must be an int')])
def test_freeze_to_refuses_before_changing(n, msg):
    learn = img_learner()
    learn.fit(1)
    opt = learn.opt
    with pytest.raises((ValueError, TypeError), match=msg): learn.freeze_to(n)
    assert learn.splitter is None and learn.opt is opt and all(p.requires_grad for p in learn.model.parameters())


def test_freeze_refuses_bad_splitters_and_runs():
    learn = img_learner(splitter=lambda m: [list(m.parameters()), list(m[-1].parameters())])
    with pytest.raises(ValueError, match='more than one group'): learn.freeze()
    learn = img_learner(splitter=lambda m: [[], list(m.parameters())])
    with pytest.raises(ValueError, match='empty parameter group'): learn.freeze()
    learn = img_learner()
    with pytest.raises(TypeError, match='train_bn'): learn.freeze(train_bn='no')

    class FreezeInFit(Subscriber):
        def before_fit(self, learn): learn.freeze()
    with pytest.raises(RuntimeError, match='during a fit'): img_learner().fit(1, subs=[FreezeInFit()])
    learn = Learner(nn.Linear(3, 2), img_learner().dls)
    with pytest.raises(ValueError, match='Pass splitter='): learn.freeze()
    assert learn.splitter is None


# -- discriminative learning rates ---------------------------------------------------------------------------------
def test_fit_slice_spreads_over_groups():
    learn = img_learner(opt_func=torch.optim.SGD, splitter=three_groups)
    learn.fit(1, lr=slice(1e-4, 1e-2))
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-4, 1e-3, 1e-2])
    learn.fit(1, lr=slice(1e-2))
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-2])


@pytest.mark.parametrize('lr, want', [(slice(1e-3, 1e-1), [1e-3, 1e-2, 1e-1]), (slice(1e-1), [1e-2, 1e-2, 1e-1]),
                                      ([1e-3, 2e-3, 3e-3], [1e-3, 2e-3, 3e-3])])
def test_fit_one_cycle_per_group(lr, want):
    learn, rec = img_learner(opt_func=torch.optim.AdamW, splitter=three_groups), GroupLRs()
    sched = learn.fit_one_cycle(2, lr_max=lr, subs=[rec])
    peaks = [max(r[i] for r in rec.lrs) for i in range(3)]
    assert peaks == pytest.approx(want, rel=0.05)
    for r in rec.lrs: assert [v / r[-1] for v in r] == pytest.approx([w / want[-1] for w in want])
    assert sched.hps['lr'] == pytest.approx([r[-1] for r in rec.lrs])


def test_fit_one_cycle_learner_lr_slice():
    learn, rec = img_learner(opt_func=torch.optim.AdamW, splitter=three_groups, lr=slice(1e-4, 1e-2)), GroupLRs()
    learn.fit_one_cycle(1, subs=[rec])
    assert rec.lrs[0] == pytest.approx([1e-4 / 25, 1e-3 / 25, 1e-2 / 25])


def test_fit_flat_cos_per_group():
    learn, rec = img_learner(opt_func=torch.optim.SGD, splitter=three_groups), GroupLRs()
    learn.fit_flat_cos(2, lr=slice(1e-3, 1e-1), subs=[rec])
    assert rec.lrs[0] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert rec.lrs[-1][0] < 1e-3 / 1.5                   # annealing in the last quarter
    for r in rec.lrs: assert [v / r[-1] for v in r] == pytest.approx([1e-2, 1e-1, 1])


def test_param_scheduler_list_and_slice():
    learn, rec = img_learner(opt_func=torch.optim.SGD, splitter=three_groups), GroupLRs()
    learn.fit(1, subs=[ParamSchedulerS({'lr': [sched_lin(1e-3, 0.), sched_lin(1e-2, 0.), sched_lin(1e-1, 0.)]}), rec])
    assert rec.lrs[0] == pytest.approx([1e-3, 1e-2, 1e-1])
    rec = GroupLRs()
    learn.fit(1, subs=[ParamSchedulerS(one_cycle_scheds(slice(1e-3, 1e-1), moms=None)), rec])
    assert rec.lrs[0] == pytest.approx([1e-3 / 25, 1e-2 / 25, 1e-1 / 25])
    with pytest.raises(ValueError, match='2 schedules'):
        learn.fit(1, subs=[ParamSchedulerS({'lr': [sched_lin(1., 0.)] * 2})])


def test_scheduler_keeps_fit_slice_rates():
    learn, rec = img_learner(opt_func=torch.optim.SGD, splitter=three_groups), GroupLRs()
    step = SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    learn.fit(1, lr=slice(1e-3, 1e-1), subs=[step, rec])
    assert rec.lrs[0] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert rec.lrs[-1] == pytest.approx([5e-4, 5e-3, 5e-2])


def test_scheduler_partial_one_cycle():
    n = 4
    cases = ((slice(1e-3, 1e-1), [1e-2, 1e-1, 1.]), (0.1, [1., 1., 1.]), ([1e-2, 1e-2, 1e-1], [.1, .1, 1.]))
    for max_lr, want in cases:
        learn, rec = img_learner(opt_func=torch.optim.SGD, splitter=three_groups), GroupLRs()
        learn.fit(1, subs=[SchedulerS(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=max_lr, total_steps=n)), rec])
        assert len(rec.lrs) == n
        for r in rec.lrs: assert [v / r[-1] for v in r] == pytest.approx(want)


# -- adapt_head ----------------------------------------------------------------------------------------------------
def test_adapt_head_torchvision_resnet():
    tv = resnet18(weights=None)
    m = adapt_head(tv, 3)
    assert ids(m.body) == ids(list(tv.children())[:8]) and m.body[0] is tv.conv1
    assert [type(l).__name__ for l in m.head][1:] == ['Flatten', 'BatchNorm1d', 'Dropout', 'Linear']
    assert m.head[-1].in_features == 1024 and m.head[-1].out_features == 3
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    mx = F.adaptive_max_pool2d(m.body(x), 1).flatten(1)
    assert torch.equal(m.head[:2](m.body(x))[:, :512], mx)   # max, then average (fastai's order)
    assert m(x).shape == (4, 3)
    assert ids(default_splitter(m)[1]) == ids(m.head.parameters())


def test_adapt_head_freeze_torchvision_on_tiny_images():
    tv = resnet18(weights=None)
    learn = img_learner(adapt_head(tv, 10), n=8, size=32, c=3, opt_func=partial(torch.optim.AdamW, weight_decay=0.1))
    learn.freeze(train_bn=False)
    before = snapshot(learn.model)
    learn.fit(1)
    moved = changed(before, learn.model)
    assert moved and all(k.startswith('head.') for k in moved)
    learn.freeze()
    before = snapshot(learn.model)
    learn.fit(1)
    moved = changed(before, learn.model)
    assert 'body.1.running_mean' in moved and 'body.1.weight' in moved and 'body.0.weight' not in moved
    assert not any(k.startswith('body.') and 'conv' in k for k in moved)


@pytest.mark.parametrize('make, x', [(simple_cnn, torch.randn(2, 1, 28, 28)), (resnet, torch.randn(2, 1, 28, 28))])
@pytest.mark.parametrize('concat', [True, False])
def test_adapt_head_nntrain_models(make, x, concat):
    net = make()
    m = adapt_head(net, 5, concat=concat, p=0.1)
    m.eval()
    assert m(x).shape == (2, 5)
    nf = 128 if make is simple_cnn else 256
    assert m.head[-1].in_features == (2 if concat else 1) * nf
    assert m.head[3].p == 0.1
    assert len(m.body) == 4 if make is simple_cnn else 6


def test_adapt_head_cut_and_refusals():
    assert adapt_head(simple_cnn(), 4, cut=2).head[-1].in_features == 2 * 32
    net = simple_cnn()
    assert cut_body(net, lambda m: m[:3])[2] is net[2]
    again = adapt_head(adapt_head(simple_cnn(), 5), 2)                     # cut before the old head
    assert again(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    assert adapt_head(simple_cnn(), 3, n_in=128).head[-1].in_features == 256
    with pytest.raises(ValueError, match='pass cut='): adapt_head(nn.Sequential(nn.Conv2d(1, 4, 3)), 2)
    with pytest.raises(ValueError, match='n_out'): adapt_head(simple_cnn(), 0)
    with pytest.raises(ValueError, match='p'): adapt_head(simple_cnn(), 2, p=1.)
    with pytest.raises(ValueError, match='no layer in the body'): adapt_head(simple_cnn(), 2, cut=0)
    with pytest.raises(ValueError, match=r'not \(N, C, H, W\)'): n_features(nn.Sequential(nn.Linear(3, 4)))
    assert n_features(simple_cnn()[:2]) == 32
    assert make_head(8, 3, concat=False)[-1].in_features == 8


def test_n_features_leaves_model_alone():
    body = simple_cnn()[:4].train()
    before = snapshot(body)
    assert n_features(body) == 128
    assert body.training and all(m.training for m in body.modules()) and not changed(before, body)


# -- fine_tune -----------------------------------------------------------------------------------------------------
def test_fine_tune_recipe():
    learn = img_learner(adapt_head(simple_cnn(), 10), n=64, opt_func=partial(torch.optim.AdamW, weight_decay=0.01))
    rec = GroupLRs()
    before = snapshot(learn.model)
    frozen, unfrozen = learn.fine_tune(2, base_lr=1e-2, subs=[rec])
    n = len(learn.dls.train)
    assert len(frozen.hps['lr']) == n and len(unfrozen.hps['lr']) == 2 * n
    first = rec.lrs[:n]
    assert all(r[0] == pytest.approx(r[1] / 10) for r in first)          # slice(base_lr): body at base_lr/10
    assert first[0][1] == pytest.approx(1e-2 / 25)                       # one-cycle's div=25
    second = rec.lrs[n:]
    assert second[0] == pytest.approx([5e-3 / 100 / 5, 5e-3 / 5])        # halved, lr_mult=100, div=5
    assert max(r[1] for r in second) == pytest.approx(5e-3, rel=0.05)
    assert changed(before, learn.model) == set(before) and learn.frozen_groups() == [False, False]


def test_fine_tune_without_frozen_epochs_and_checks():
    learn = img_learner(adapt_head(simple_cnn(), 10))
    scheds = learn.fine_tune(1, freeze_epochs=0)
    assert len(scheds) == 1 and learn.frozen_groups() == [False, False]
    bad = (({'freeze_epochs': -1}, 'freeze_epochs'), ({'base_lr': 0}, 'base_lr'), ({'lr_mult': 0.5}, 'lr_mult'),
           ({'epochs': 0}, 'epochs'), ({'pct_start': 2}, 'pct_start'))
    learn = img_learner(adapt_head(simple_cnn(), 10))
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg): learn.fine_tune(**{'epochs': 1, **kw})
        assert learn.splitter is None and all(p.requires_grad for p in learn.model.parameters())   # checked first


# -- transfer on MNIST: pretrain on digits 0-4, adapt to 5-9 -------------------------------------------------------
@pytest.fixture(scope='module')
def mnist_split():
    x_train, y_train, x_valid, y_valid = mnist_sample()
    lo, lo_v, hi, hi_v = y_train < 5, y_valid < 5, y_train >= 5, y_valid >= 5
    torch.set_num_threads(1)
    set_seed(0)
    pretrained = simple_cnn(5, channels=(8, 16, 32, 64))
    dls = DataLoaders.from_tensors(x_train[lo], y_train[lo], x_valid[lo_v], y_valid[lo_v], batch_size=64, seed=0)
    learn = Learner(pretrained, dls, F.cross_entropy, torch.optim.AdamW, lr=1e-2)
    learn.fit_one_cycle(3, valid=False)
    pre_acc = _accuracy(pretrained, x_valid[lo_v], y_valid[lo_v])
    new = DataLoaders.from_tensors(x_train[hi][:300], y_train[hi][:300] - 5, x_valid[hi_v], y_valid[hi_v] - 5,
                                   batch_size=16, seed=0)
    return pretrained, pre_acc, new


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad(): return (model(x).argmax(1) == y).float().mean().item()


def _transfer(body_model, dls, how: str) -> tuple[Learner, dict]:
    set_seed(1)
    learn = Learner(adapt_head(copy.deepcopy(body_model), 5), dls, F.cross_entropy, torch.optim.AdamW, lr=1e-2)
    before = snapshot(learn.model)
    if how == 'fine_tune': learn.fine_tune(3, base_lr=1e-2, valid=False)
    else:
        learn.freeze(train_bn=how == 'frozen body, BN trains')
        learn.fit_one_cycle(4, 1e-2, valid=False)
    return learn, before


def test_mnist_transfer(mnist_split):
    pretrained, pre_acc, dls = mnist_split
    assert pre_acc > 0.95                                    # the body learnt digits 0-4
    x, y = dls.valid.tensors
    head_only, before = _transfer(pretrained, dls, 'head only')
    moved = changed(before, head_only.model)
    assert moved and all(k.startswith('head.') for k in moved)   # the pretrained body: bitwise unchanged
    acc = {'head only': _accuracy(head_only.model, x, y)}
    for how in ('frozen body, BN trains', 'fine_tune'):
        acc[how] = _accuracy(_transfer(pretrained, dls, how)[0].model, x, y)
    set_seed(2)
    random_body = simple_cnn(5, channels=(8, 16, 32, 64))
    acc['random body, head only'] = _accuracy(_transfer(random_body, dls, 'head only')[0].model, x, y)
    assert min(acc.values()) > 0.5, acc                      # every run learns the new digits (chance: 0.2)
    for how in ('head only', 'frozen body, BN trains', 'fine_tune'):
        assert acc[how] > acc['random body, head only'] + 0.03, acc   # the pretrained features help
