"The LR finder: suggestions, stopping, and above all no side effects (fit after lr_find == fit without it)."
import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nntrain.core import Order, Subscriber
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.optim import AdamW
from nntrain.subs.lr_find import LRFindS, minimum_lr, steep_lr, valley_lr
from nntrain.subs.schedule import SchedulerS
from nntrain.testing import same_state, same_weights, state_diffs


class Flaky(nn.Module):
    "A small classifier with BatchNorm and Dropout (global RNG) that raises on forward call `fail_at`, if set."
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
        self.register_buffer('calls_seen', torch.zeros(()), persistent=False)
        self.calls, self.fail_at = 0, None

    def forward(self, x):
        self.calls += 1
        self.calls_seen += 1
        if self.fail_at is not None and self.calls >= self.fail_at: raise RuntimeError('model failed mid-search')
        return self.net(x)


class Count(Subscriber):
    "Counts training batches; has a state_dict, so the finder must restore it when it runs during the search."
    def __init__(self, in_lr_find=True):
        self.n = 0
        if not in_lr_find: self.runs = ('fit', 'validate', 'predict')
    def after_batch(self, learn): self.n += learn.training
    def state_dict(self): return {'n': self.n}
    def load_state_dict(self, sd): self.n = sd['n']


def _dls(torch_loader=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    if torch_loader:
        gen = torch.Generator().manual_seed(1)
        return DataLoaders(DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True, generator=gen),
                           DataLoader(TensorDataset(x[256:], y[256:]), batch_size=64))
    return DataLoaders.from_tensors(x[:256], y[:256], x[256:], y[256:], batch_size=32, seed=1)


def _learn(opt_func=torch.optim.SGD, torch_loader=False, subs=()):
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    return Learner(Flaky(), _dls(torch_loader), F.cross_entropy, opt_func, lr=0.05, subs=subs)


def _capture(learn):
    "Everything lr_find must leave as it found it."
    m = learn.model
    return dict(
        tensors=[t.detach().clone() for t in list(m.parameters()) + list(m.buffers())],
        grads=[None if p.grad is None else p.grad.clone() for p in m.parameters()],
        opt=learn.opt, opt_state=None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
        counters={k: getattr(learn, k) for k in ('n_epochs', 'epoch', 'n_iter', 'iter', 'global_step', 'pct_train',
                                                  'training', 'lr', 'dl', 'batch', 'preds', 'loss')},
        history=copy.deepcopy(learn.history), history_obj=learn.history, subs=list(learn.subs),
        loss_func=learn.loss_func, opt_func=learn.opt_func, model=learn.model, dls=learn.dls,
        torch_rng=torch.get_rng_state(), py_rng=random.getstate(), np_rng=np.random.get_state()[1].tolist(),
        loaders=[_loader_state(dl) for dl in learn.dls])


def _loader_state(dl):
    if hasattr(dl, 'state_dict'): return dl.state_dict()['generator']
    return dl.generator.get_state() if dl.generator is not None else None


def _assert_unchanged(before, after):
    diff = {k: state_diffs(before[k], after[k])[:3] for k in before if not same_state(before[k], after[k])}
    assert not diff, f'lr_find changed: {diff}'


def _final(learn):
    return [t.detach().clone() for t in list(learn.model.parameters()) + list(learn.model.buffers())]


# -- the bit-for-bit guarantee ----------------------------------------------------------------------------------
def test_fit_after_lr_find_is_bit_for_bit_fit_without():
    "With a torch DataLoader (15_lr_find shows the same with nntrain's own loader)."
    torch_loader = True
    def run(find):
        learn = _learn(torch_loader=torch_loader)
        if find:
            before = _capture(learn)
            learn.lr_find(num_it=20)
            _assert_unchanged(before, _capture(learn))
        learn.fit(2)
        return _final(learn), torch.rand(3), random.random(), np.random.rand()
    with_find, without = run(True), run(False)
    assert same_weights(with_find[0], without[0])
    assert torch.equal(with_find[1], without[1]) and with_find[2:] == without[2:]


def test_bit_for_bit_with_existing_optimizer_state_and_subscribers():
    "Mid-training: AdamW state, a torch scheduler and a stateful subscriber all survive a search untouched."
    def run(find):
        count = Count()
        sched = SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5))
        learn = _learn(AdamW, subs=[count, sched])
        learn.fit(1)
        sched_state = copy.deepcopy(sched.state_dict())
        if find:
            before = _capture(learn)
            learn.lr_find(num_it=30, end_lr=1e3)
            _assert_unchanged(before, _capture(learn))
            assert count.n == len(learn.dls.train) and sched.state_dict() == sched_state
        learn.fit(1)
        return _final(learn) + [s['grad_avg'] for s in learn.opt.state.values()]
    assert same_weights(run(True), run(False))


# -- restore when the search fails or diverges ------------------------------------------------------------------
def test_restores_everything_when_the_model_raises_mid_search():
    learn = _learn(AdamW, subs=[Count()])
    learn.fit(1)
    before = _capture(learn)
    learn.model.fail_at = learn.model.calls + 5
    with pytest.raises(RuntimeError, match='model failed mid-search'):
        learn.lr_find(num_it=50)
    _assert_unchanged(before, _capture(learn))
    learn.model.fail_at = None
    learn.fit(1)                                      # still usable

    ref = _learn(AdamW, subs=[Count()])
    ref.fit(1); ref.fit(1)
    assert same_weights(_final(learn), _final(ref))


def test_restores_everything_after_divergence():
    learn = _learn(subs=[Count()])
    for p in learn.model.parameters(): p.grad = torch.full_like(p, 0.5)   # pending gradients survive too
    before = _capture(learn)
    res = learn.lr_find(num_it=100, start_lr=1e-3, end_lr=1e6)
    assert len(res.lrs) < 100                         # it stopped early
    _assert_unchanged(before, _capture(learn))
    assert learn.opt is None                          # no optimizer existed before, none exists after


def test_restores_buffers_a_subscriber_replaced():
    "Moving a module to a device replaces its buffer objects: the restore must write into the model's current ones."
    class Replace(Subscriber):
        def before_fit(self, learn):
            for m in learn.model.modules():
                if isinstance(m, nn.BatchNorm1d): m.running_mean = m.running_mean.clone()
    learn = _learn()
    learn.fit(1)
    learn.add_subs(Replace())
    bn = learn.model.net[1]
    stats = bn.running_mean.clone()
    learn.lr_find(num_it=10)
    assert torch.equal(bn.running_mean, stats)


# -- the search itself ------------------------------------------------------------------------------------------
def test_stops_on_divergence_and_on_non_finite_loss():
    finder = LRFindS(start_lr=1e-3, end_lr=1e6, num_it=100)
    learn = _learn()
    learn.fit(10, subs=[finder], valid=False)
    assert finder.diverged and len(finder.lrs) < 100
    assert finder.losses[-1] > 4 * min(finder.losses[:-1]) or not math.isfinite(finder.losses[-1])

    calls = []
    def nan_after_5(preds, y):
        calls.append(1)
        loss = F.cross_entropy(preds, y)
        return loss * float('nan') if len(calls) > 5 else loss
    learn = _learn()
    learn.loss_func = nan_after_5
    res = learn.lr_find(num_it=50)
    assert len(res.lrs) == 6 and not math.isfinite(res.losses[-1])
    assert all(math.isfinite(v) for v in res.suggestions().values())
    assert learn.loss_func is nan_after_5


def test_runs_num_it_batches_over_several_epochs_without_stop_div():
    learn = _learn()
    res = learn.lr_find(start_lr=1e-5, end_lr=1e-1, num_it=20, stop_div=False)   # 8 batches per epoch
    assert len(res.lrs) == 20
    assert res.lrs[0] == pytest.approx(1e-5) and res.lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(res.lrs, res.lrs[1:])]
    assert ratios == pytest.approx([ratios[0]] * 19)                              # exponential ramp


def test_linear_mode():
    res = _learn().lr_find(start_lr=1e-3, end_lr=1e-1, num_it=12, mode='linear', stop_div=False)
    steps = [b - a for a, b in zip(res.lrs, res.lrs[1:])]
    assert steps == pytest.approx([steps[0]] * 11) and res.lrs[-1] == pytest.approx(1e-1)


def test_suggestions_are_within_the_tried_range():
    res = _learn().lr_find(num_it=60, end_lr=100)
    lo, hi = min(res.lrs), max(res.lrs)
    assert res.valley in res.lrs and res.steep in res.lrs
    assert all(lo <= v <= hi for v in res.suggestions().values())
    assert res.minimum <= max(res.lrs[i] for i in range(len(res.lrs)) if res.losses[i] == min(res.losses))


def test_only_in_lr_find_subscribers_run_during_the_search():
    inside, outside = Count(in_lr_find=True), Count(in_lr_find=False)

    class Seen(Subscriber):
        runs = ('fit',)
        order = Order.METRICS
        def __init__(self): self.events = 0
        def before_batch(self, learn): self.events += 1
    seen = Seen()
    learn = _learn(subs=[inside, outside, seen])
    subs = list(learn.subs)

    class Peek(Subscriber):
        "Runs during the search (runs everywhere by default): records the run's kind and subscriber set."
        def before_fit(self, learn): self.kind, self.subs = learn.run_kind, list(learn.subs)
    peek = Peek()
    learn.add_subs(peek)
    learn.lr_find(num_it=10)
    assert seen.events == 0 and outside.n == 0 and inside.n == 0   # inside's count is restored after the search
    assert peek.kind == 'lr_find' and inside in peek.subs
    assert any(isinstance(s, LRFindS) for s in peek.subs)
    assert learn.subs == sorted(subs + [peek], key=lambda s: s.order)


def test_suggestion_functions():
    lrs = [10 ** (-5 + i / 10) for i in range(51)]
    losses = [3 - math.tanh(3 * (math.log10(lr) + 3)) + (20 * (math.log10(lr) + 1) ** 2 if lr > 0.1 else 0)
              for lr in lrs]
    assert 10 ** -3.11 < steep_lr(lrs, losses) < 10 ** -2.89
    best = lrs[min(range(51), key=losses.__getitem__)]
    assert minimum_lr(lrs, losses) == pytest.approx(best / 10)
    assert 1e-5 < valley_lr(lrs, losses) < best
    assert valley_lr([1e-3], [1.]) == 1e-3 and steep_lr([1e-3], [1.]) == 1e-3
