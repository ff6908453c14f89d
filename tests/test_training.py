"Step mechanics: gradient clipping, accumulation, the NaN guard and the weight EMA (nntrain.subs.training)."
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import CancelStepException, Order, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS, grad_norm, opt_grads
from nntrain.testing import same_weights
from tests.contract import n_hooks


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def learner(model=None, n=40, bs=8, seed=0, lr=0.1, opt_func=torch.optim.SGD):
    "A classifier without batch norm on random data, batches in a fixed order."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    set_seed(seed)
    dls = DataLoaders.from_tensors(x, y, x[:16], y[:16], batch_size=bs, shuffle=False)
    return Learner(model or mlp(), dls, F.cross_entropy, opt_func, lr=lr)


def weights(model): return [p.detach().clone() for p in model.parameters()]


class Steps(Subscriber):
    "Counts after_step, and keeps the weights after each step."
    order = Order.METRICS
    def __init__(self): self.n, self.last = 0, None
    def after_step(self, learn): self.n, self.last = self.n + 1, weights(learn.model)


class Norms(Subscriber):
    "Records the total gradient norm at its order."
    def __init__(self, order): self.order, self.seen = order, []
    def after_backward(self, learn): self.seen.append(grad_norm(opt_grads(learn)))


# -- GradClipS ---------------------------------------------------------------------------------------------------

def test_grad_norm_matches_torch():
    gs = [torch.randn(3, 4), torch.randn(5)]
    for p in (1., 2., math.inf):
        ref = torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]), p)
        torch.testing.assert_close(grad_norm(gs, p), ref)


def test_clip_norm_reports_preclip_norm_and_clips():
    learn, clip = learner(), GradClipS(max_norm=0.05)
    before, after = Norms(Order.GUARD - 1), Norms(Order.GUARD + 1)
    learn.fit(1, subs=[clip, before, after], valid=False)
    assert isinstance(clip.last_norm, torch.Tensor)
    torch.testing.assert_close(clip.last_norm, before.seen[-1])
    assert all(b > 0.05 for b in before.seen)
    assert all(a <= 0.05 + 1e-5 for a in after.seen)


def test_clip_value_clamps_each_element():
    learn, clip = learner(), GradClipS(max_norm=1e-3, mode='value')
    class Check(Subscriber):
        order = Order.GUARD + 1
        def after_backward(self, learn):
            assert max(g.abs().max() for g in opt_grads(learn)) <= 1e-3
    before = Norms(Order.GUARD - 1)
    learn.fit(1, subs=[clip, Check(), before], valid=False)
    torch.testing.assert_close(clip.last_norm, before.seen[-1])


def test_clip_bad_mode():
    with pytest.raises(ValueError, match='mode'): GradClipS(mode='l2')


# -- GradAccumS --------------------------------------------------------------------------------------------------

def _one_epoch(batches, subs=(), opt_func=torch.optim.SGD):
    set_seed(0)
    learn = Learner(mlp(), (batches, batches), F.cross_entropy, opt_func, lr=0.5)
    learn.fit(1, subs=subs, valid=False)
    return learn


@pytest.mark.parametrize('opt_func', [torch.optim.SGD, torch.optim.Adam])
def test_accumulation_equals_one_big_batch(opt_func):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    small = _one_epoch([(x[i:i + 6], y[i:i + 6]) for i in range(0, 24, 6)], [GradAccumS(4)], opt_func)
    big = _one_epoch([(x, y)], opt_func=opt_func)
    assert small.global_step == big.global_step == 1
    for a, b in zip(small.model.parameters(), big.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    set_seed(0)
    assert not torch.equal(small.model[0].weight, mlp()[0].weight)   # it did train


def test_accumulation_counts_steps_not_batches():
    learn, steps = learner(n=40, bs=8), Steps()   # 5 training batches per epoch
    learn.fit(2, subs=[GradAccumS(2), steps])
    assert learn.global_step == steps.n == 2 * 3   # steps after batches 2, 4 and the last (partial) one


def test_accumulation_partial_group_is_a_mean():
    "Five batches with n_acc=2: the last step averages the single batch left, as an ordinary step would."
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(5)]
    acc = _one_epoch(batches, [GradAccumS(2)])
    ref_batches = [(torch.cat([batches[0][0], batches[1][0]]), torch.cat([batches[0][1], batches[1][1]])),
                   (torch.cat([batches[2][0], batches[3][0]]), torch.cat([batches[2][1], batches[3][1]])), batches[4]]
    ref = _one_epoch(ref_batches)
    assert acc.global_step == ref.global_step == 3
    for a, b in zip(acc.model.parameters(), ref.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_accumulation_keeps_reported_loss_unscaled():
    seen = []
    class Loss(Subscriber):
        order = Order.METRICS
        def after_batch(self, learn):
            if learn.training: seen.append(learn.loss.detach().clone())
    learn = learner()
    ref = []
    with torch.no_grad():
        for x, y in learn.dls.train: ref.append(F.cross_entropy(learn.model(x), y))
    learn.fit(1, subs=[GradAccumS(100), Loss()], valid=False)   # one step at the very end: weights fixed until then
    assert len(seen) == len(ref) == len(learn.dls.train)
    for a, b in zip(seen, ref, strict=True): torch.testing.assert_close(a, b)


# -- TerminateOnNaNS ---------------------------------------------------------------------------------------------

class Poison(nn.Module):
    "Outputs NaN (or `value`) while `armed`."
    def __init__(self, value=math.nan): super().__init__(); self.value, self.armed = value, False
    def forward(self, x): return x * self.value if self.armed else x


class ArmAt(Subscriber):
    "Arm `model[1]` on training batch `at` of epoch `epoch`."
    def __init__(self, at, epoch=0): self.at, self.epoch = at, epoch
    def before_batch(self, learn):
        learn.model[1].armed = learn.training and learn.iter == self.at and learn.epoch == self.epoch


def _poisoned(value=math.nan):
    return nn.Sequential(nn.Linear(4, 8), Poison(value), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize('opt_func', [torch.optim.SGD, torch.optim.Adam])
def test_nan_on_third_batch_keeps_last_good_weights(opt_func):
    learn, guard, steps = learner(_poisoned(), opt_func=opt_func), TerminateOnNaNS(), Steps()
    with pytest.warns(RuntimeWarning, match='epoch 1, batch 2'):
        learn.fit(3, subs=[guard, steps, ArmAt(2, epoch=1)])
    assert learn.global_step == steps.n == 5 + 2
    assert same_weights(learn.model.parameters(), steps.last)   # bitwise
    assert guard.module == '1 (Poison)'
    assert 'loss (nan)' in guard.reason and 'epoch 1, batch 2' in guard.reason and '1 (Poison)' in guard.reason
    assert n_hooks(learn.model) == 0
    assert learn.state_dict()['counters']['position'] == [1, True, 2]   # stopped there: no third epoch
    assert [r['epoch'] for r in learn.history] == [0, 0]


def test_inf_loss_is_caught():
    learn, guard, steps = learner(), TerminateOnNaNS(), Steps()
    def loss(p, y): return F.cross_entropy(p, y) * (math.inf if steps.n == 3 else 1.)
    learn.loss_func = loss
    with pytest.warns(RuntimeWarning):
        learn.fit(1, subs=[guard, steps])
    assert 'loss (inf)' in guard.reason and 'batch 3' in guard.reason
    assert guard.module is None and 'every module output was finite' in guard.reason
    assert same_weights(learn.model.parameters(), steps.last)


def test_nonfinite_gradient_with_finite_loss_is_caught():
    learn, guard, steps = learner(), TerminateOnNaNS(), Steps()
    w = learn.model[0].weight
    w.register_hook(lambda g: g * math.nan if steps.n == 2 else g)
    with pytest.warns(RuntimeWarning):
        learn.fit(1, subs=[guard, steps])
    assert 'gradient of 0.weight' in guard.reason and 'loss' not in guard.reason.split(' at ')[0]
    assert same_weights(learn.model.parameters(), steps.last)


def test_nan_guard_sees_accumulating_batches():
    "With GradAccumS, a NaN on a batch that only accumulates is reported at that batch, before any step."
    learn, guard, steps = learner(_poisoned()), TerminateOnNaNS(), Steps()
    start = weights(learn.model)
    with pytest.warns(RuntimeWarning, match='batch 2'):
        learn.fit(1, subs=[guard, steps, ArmAt(2), GradAccumS(4)])
    assert steps.n == 0 and learn.global_step == 0
    assert same_weights(learn.model.parameters(), start)


def test_forensics_restores_buffers_and_rng():
    model = nn.Sequential(nn.Linear(4, 8), Poison(), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    learn, guard = learner(model), TerminateOnNaNS()
    bufs = {}
    class Keep(Subscriber):
        order = Order.MIXUP + 1
        def after_loss(self, learn):
            bufs['b'] = [b.clone() for b in learn.model.buffers()]
            bufs['rng'] = torch.get_rng_state()
    with pytest.warns(RuntimeWarning):
        learn.fit(1, subs=[guard, Keep(), ArmAt(1)])
    assert guard.module == '1 (Poison)'
    for a, b in zip(bufs['b'], learn.model.buffers(), strict=True):   # the poisoned batch made the running stats NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(bufs['rng'], torch.get_rng_state())


def test_nan_guard_check_every():
    learn, guard = learner(_poisoned()), TerminateOnNaNS(check_every=2)
    with pytest.warns(RuntimeWarning, match='batch 2'):   # batch 1 is unchecked; batch 2 is checked
        learn.fit(1, subs=[guard, ArmAt(2)])
    with pytest.raises(ValueError, match='check_every'): TerminateOnNaNS(check_every=0)


def test_nan_guard_quiet_on_finite_runs():
    learn, guard = learner(), TerminateOnNaNS()
    learn.fit(2, subs=[guard])
    assert guard.reason is None and learn.global_step == 10


# -- EMAS --------------------------------------------------------------------------------------------------------

class Keep(Subscriber):
    "The weights before the fit and after each step (before EMAS updates)."
    order = EMAS.order - 1
    def __init__(self): self.start, self.steps = None, []
    def before_fit(self, learn):
        if self.start is None: self.start = weights(learn.model)
    def after_step(self, learn): self.steps.append(weights(learn.model))


def test_ema_matches_hand_computed_average():
    learn, ema, keep = learner(lr=0.5), EMAS(decay=0.7), Keep()
    learn.fit(2, subs=[ema, keep])
    learn.fit(1, subs=[ema, keep])    # the average carries on across fits
    hand = keep.start
    for w in keep.steps: hand = [0.7 * h + 0.3 * p for h, p in zip(hand, w, strict=True)]
    assert ema.n_updates == learn.global_step == len(keep.steps) == 15
    for e, h in zip(ema.ema, hand, strict=True): assert torch.allclose(e, h, atol=1e-6)
    assert not all(torch.allclose(e, p) for e, p in zip(ema.ema, learn.model.parameters(), strict=True))
    assert same_weights(learn.model.parameters(), keep.steps[-1])   # live weights back


def test_ema_counts_optimizer_steps_only():
    learn, ema = learner(), EMAS()
    learn.fit(1, subs=[ema, GradAccumS(2)])
    assert ema.n_updates == learn.global_step == 3


def test_ema_is_used_for_validation_and_get_preds():
    learn, ema = learner(lr=0.5), EMAS(decay=0.5)
    seen = []
    class Spy(Subscriber):
        def before_batch(self, learn):
            if not learn.training: seen.append(weights(learn.model))
    learn.fit(1, subs=[ema, Spy()])
    assert same_weights(seen[-1], ema.ema)
    live = weights(learn.model)
    learn.add_subs(ema)
    preds, _ = learn.get_preds()
    learn.remove_subs(ema)
    ref = mlp()
    with torch.no_grad():
        for p, e in zip(ref.parameters(), ema.ema, strict=True): p.copy_(e)
        torch.testing.assert_close(preds, ref(learn.dls.valid.tensors[0]))
    assert same_weights(learn.model.parameters(), live)


@pytest.mark.parametrize('event', ['after_predict', 'after_batch'])
def test_ema_live_weights_restored_after_exception_in_validation(event):
    learn, ema = learner(lr=0.5), EMAS(decay=0.5)
    learn.fit(1, subs=[ema])
    live = weights(learn.model)
    class Boom(Subscriber):
        pass
    def boom(self, learn):
        if not learn.training: raise RuntimeError('boom')
    setattr(Boom, event, boom)
    with pytest.raises(RuntimeError, match='boom'):
        learn.fit(1, subs=[ema, Boom()], train=False)
    assert same_weights(learn.model.parameters(), live)
    assert ema.backup is None


def test_ema_state_dict_round_trip():
    learn, ema = learner(), EMAS(decay=0.9)
    learn.fit(1, subs=[ema])
    state = ema.state_dict()
    buf = io.BytesIO(); torch.save(state, buf); buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = EMAS(decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.n_updates == ema.n_updates
    assert same_weights(other.ema, ema.ema)
    bad = EMAS(); bad.load_state_dict({'decay': 0.9, 'n_updates': 0, 'ema': [torch.zeros(2)]})
    with pytest.raises(ValueError, match='other parameter shapes'): learner().fit(1, subs=[bad])


def test_cancelled_step_does_not_update_ema():
    learn, ema = learner(), EMAS()
    class Skip(Subscriber):
        def after_backward(self, learn):
            if learn.iter % 2: raise CancelStepException()
    learn.fit(1, subs=[ema, Skip()])
    assert ema.n_updates == learn.global_step == 3


def test_nan_reason_survives_validation_and_resets_on_next_fit():
    learn, guard = learner(_poisoned()), TerminateOnNaNS()
    learn.add_subs(guard)
    arm = ArmAt(1)
    with pytest.warns(RuntimeWarning):
        learn.fit(1, subs=[arm])
    reason = guard.reason
    learn.model[1].armed = False
    learn.validate()
    learn.get_preds()
    assert guard.reason == reason and reason is not None
    learn.fit(1)
    assert guard.reason is None


def test_accumulation_discards_partial_sums_of_a_stopped_fit():
    from nntrain.core import CancelFitException
    learn, acc = learner(), GradAccumS(4)
    class StopAt(Subscriber):
        order = Order.METRICS
        def after_batch(self, learn):
            if learn.training and learn.iter == 1: raise CancelFitException()
    learn.fit(1, subs=[acc, StopAt()])          # two batches accumulated, no step
    assert learn.global_step == 0 and acc.count == 0
    assert all(p.grad is None or not p.grad.any() for p in learn.model.parameters())


def test_huge_finite_gradient_is_not_a_nan():
    "A gradient whose squared norm overflows float32 but whose elements are finite does not stop training."
    learn, guard = learner(), TerminateOnNaNS()
    learn.model[0].weight.register_hook(lambda g: g + 1e30)
    learn.fit(1, subs=[guard, GradClipS(1.0)], valid=False)
    assert guard.reason is None and learn.global_step == 5
