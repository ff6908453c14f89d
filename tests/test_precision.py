"Mixed precision, channels-last and compile subscribers (nntrain.subs.precision), alone and with the step mechanics."
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import CancelStepException, Order, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.precision import ChannelsLastS, CompileS, MixedPrecisionS, make_scaler, resolve_precision
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS, grad_norm, opt_grads
from nntrain.testing import same_state, same_weights

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def learner(n=96, bs=16, seed=0, device='cpu', lr=0.1):
    "A learnable 3-class problem (the class shows in the inputs), no batch norm."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    x = x + F.one_hot(y, 8).float() * 2
    set_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    dls = DataLoaders.from_tensors(x, y, x[:32], y[:32], batch_size=bs, seed=seed, device=device)
    return Learner(model, dls, F.cross_entropy, torch.optim.SGD, lr=lr)


class Seen(Subscriber):
    "Records preds/loss dtypes, the scaler, and counts after_step."
    order = Order.METRICS
    def __init__(self): self.dtypes, self.scalers, self.steps, self.grads = set(), [], 0, set()
    def before_fit(self, learn): self.scalers.append(getattr(learn, 'scaler', 'absent'))
    def after_loss(self, learn): self.dtypes.add((learn.preds.dtype, learn.loss.dtype))
    def after_step(self, learn): self.steps += 1
    def after_backward(self, learn): self.grads |= {g.dtype for g in opt_grads(learn)}


class Overflow(Subscriber):
    "Makes one gradient infinite on the given (epoch, batch) pairs, before MixedPrecisionS unscales."
    order = Order.PRECISION - 10
    def __init__(self, at): self.at = set(at)
    def after_backward(self, learn):
        if (learn.epoch, learn.iter) in self.at: learn.model[0].weight.grad[0, 0] = math.inf


# -- choosing ----------------------------------------------------------------------------------------------------

def test_resolve_precision(monkeypatch):
    assert resolve_precision('cpu') == 'bf16'
    assert resolve_precision('mps') == 'fp32'
    assert resolve_precision('cpu', 'fp16') == resolve_precision('cuda', torch.float16) == 'fp16'
    assert resolve_precision('cuda', 'bfloat16') == 'bf16' and resolve_precision('cpu', 'fp32') == 'fp32'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert resolve_precision('cuda') == 'bf16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    assert resolve_precision('cuda') == 'fp16'
    with pytest.raises(ValueError, match='dtype must be'): resolve_precision('cpu', 'int8')
    with pytest.raises(ValueError, match='dtype must be'): MixedPrecisionS('fp8')


def test_auto_on_cpu_says_bf16(capsys):
    learn, mp = learner(), MixedPrecisionS('auto')
    learn.fit(1, subs=[mp])
    assert mp.chosen == 'bf16' and 'bf16 on cpu' in capsys.readouterr().out
    learn.fit(1, subs=[mp])
    assert capsys.readouterr().out == ''   # said once


# -- bf16 on CPU -------------------------------------------------------------------------------------------------

def test_bf16_cpu_trains_and_preds_are_bf16():
    learn, seen = learner(), Seen()
    start = learn.validate()['loss']
    learn.fit(4, subs=[MixedPrecisionS('bf16'), seen])
    end = learn.validate()['loss']
    assert end < 0.7 * start
    assert seen.dtypes == {(torch.bfloat16, torch.float32)}
    assert seen.scalers == [None] and learn.scaler is None
    assert seen.grads == {torch.float32} and all(p.dtype == torch.float32 for p in learn.model.parameters())


def test_bf16_get_preds_under_autocast():
    "Every batch's predictions are what the model gives under bf16 autocast, bit for bit: not fp32 ones, cast."
    learn, mp = learner(), MixedPrecisionS('bf16')
    learn.add_subs(mp)
    preds, targets = learn.get_preds()
    assert preds.dtype == torch.bfloat16 and len(preds) == len(targets) == 32
    learn.remove_subs(mp)
    plain, _ = learn.get_preds()
    learn.model.eval()
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        ref = torch.cat([learn.model(x) for x, _ in learn.dls.valid])
    assert same_state(preds, ref)
    assert not same_state(preds, plain.to(torch.bfloat16))       # autocast is not the fp32 result rounded at the end
    torch.testing.assert_close(preds.float(), plain, atol=0.1, rtol=0.05)


def test_fp32_is_plain():
    learn, seen = learner(), Seen()
    learn.fit(1, subs=[MixedPrecisionS('fp32'), seen])
    ref = learner()
    ref.fit(1)
    assert seen.dtypes == {(torch.float32, torch.float32)}
    assert same_weights(learn, ref)


# -- fp16 and the scaler (on the CPU where torch supports it, and on CUDA) -------------------------------------

def _fp16_devices():
    devices = ['cpu'] if hasattr(torch.amp, 'GradScaler') else []
    return devices + [pytest.param('cuda', marks=needs_cuda)]


@pytest.mark.parametrize('device', _fp16_devices())
def test_fp16_trains_with_scaler(device):
    learn, mp, seen = learner(device=device), MixedPrecisionS('fp16'), Seen()
    start = learn.validate()['loss']
    learn.fit(4, subs=[mp, seen])
    assert learn.validate()['loss'] < 0.7 * start
    assert seen.dtypes == {(torch.float16, torch.float32)}
    assert seen.scalers[0] is mp.scaler and mp.scaler is not None and learn.scaler is None
    assert learn.global_step == seen.steps == 4 * 6


@pytest.mark.parametrize('device', _fp16_devices())
def test_skipped_fp16_step_is_not_counted(device):
    learn, mp, seen, ema = learner(device=device), MixedPrecisionS('fp16'), Seen(), EMAS()
    weights = {}
    class Keep(Subscriber):
        order = Order.PRECISION - 11
        def after_backward(self, learn):
            if learn.iter == 2: weights['before'] = [p.detach().clone() for p in learn.model.parameters()]
        def after_batch(self, learn):
            if learn.training and learn.iter == 2:
                weights['after'] = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, subs=[mp, seen, ema, Keep(), Overflow([(0, 2)])], valid=False)
    assert learn.global_step == seen.steps == ema.n_updates == 5
    assert mp.scaler.get_scale() == 65536. / 2
    assert same_weights(weights['before'], weights['after'])   # skipped: untouched
    assert all(p.grad is None or not p.grad.abs().sum() for p in learn.model.parameters())


def test_scaler_state_round_trip():
    learn, mp = learner(), MixedPrecisionS('fp16')
    learn.fit(1, subs=[mp, Overflow([(0, 1), (0, 3)])], valid=False)
    state = mp.state_dict()
    assert state['scaler']['scale'] == 65536. / 4
    buf = io.BytesIO(); torch.save(state, buf); buf.seek(0)
    state = torch.load(buf, weights_only=True)   # plain numbers only: safe to load
    fresh = MixedPrecisionS('fp16')
    fresh.load_state_dict(state)                 # before any fit: applied when the scaler is made
    assert fresh.state_dict() == state
    learner().fit(1, subs=[fresh], train=False)
    assert fresh.scaler.get_scale() == 65536. / 4 and fresh.scaler.state_dict() == state['scaler']
    live = MixedPrecisionS('fp16')
    learner().fit(1, subs=[live], train=False)
    live.load_state_dict(state)                  # into an existing scaler
    assert live.scaler.get_scale() == 65536. / 4
    assert MixedPrecisionS('bf16').state_dict() == {'scaler': None}


def test_scaler_carries_on_across_fits():
    learn, mp = learner(), MixedPrecisionS('fp16')
    learn.fit(1, subs=[mp, Overflow([(0, 1)])], valid=False)
    scaler = mp.scaler
    learn.fit(1, subs=[mp], valid=False)
    assert mp.scaler is scaler and scaler.get_scale() == 65536. / 2


# -- composition -------------------------------------------------------------------------------------------------

class CountUnscale(Subscriber):
    "Wraps learn.scaler.unscale_ with a counter for the fit."
    order = Order.PRECISION + 1
    def __init__(self): self.n = 0
    def before_fit(self, learn):
        self.scaler, orig = learn.scaler, learn.scaler.unscale_
        def counted(opt):
            self.n += 1
            return orig(opt)
        self.scaler.unscale_ = counted
    def cleanup_fit(self, learn): vars(self.scaler).pop('unscale_', None)


def test_fp16_composes_with_clip_accum_guard_ema():
    learn = learner(n=112)   # 7 training batches: with n_acc=2, steps after batches 2, 4, 6 and 7
    mp, clip, acc, guard = MixedPrecisionS('fp16'), GradClipS(0.5), GradAccumS(2), TerminateOnNaNS()
    ema, seen = EMAS(), Seen()
    count = CountUnscale()
    norms = []
    class Spy(Subscriber):
        order = Order.GUARD + 1
        def after_backward(self, learn): norms.append(grad_norm(opt_grads(learn)))
    learn.fit(2, subs=[mp, clip, acc, guard, ema, seen, count, Spy(), Overflow([(1, 3)])])
    # epoch 1's second step overflowed: skipped, not counted, still unscaled exactly once
    assert count.n == 2 * 4 == len(norms)
    assert learn.global_step == seen.steps == ema.n_updates == 2 * 4 - 1
    assert guard.reason is None
    finite = [n for n in norms if torch.isfinite(n)]
    assert len(finite) == 7 and all(n <= 0.5 + 1e-4 for n in finite)   # clipped true gradients, not scaled ones
    assert torch.isfinite(clip.last_norm) and clip.last_norm < 1e3    # the scale is 65536: these are unscaled


def test_fp16_clip_equals_fp32_clip_direction():
    "Unscale-then-clip gives the same update as clipping in fp32 (up to fp16 forward noise)."
    a, b = learner(), learner()
    start = [p.detach().clone() for p in b.model.parameters()]
    a.fit(1, subs=[MixedPrecisionS('fp16'), GradClipS(0.1)], valid=False)
    b.fit(1, subs=[GradClipS(0.1)], valid=False)
    assert a.global_step == b.global_step == len(b.dls.train)
    update = lambda l: torch.cat([(p.detach() - s).flatten()
                                  for p, s in zip(l.model.parameters(), start, strict=True)])
    ua, ub = update(a), update(b)
    assert ub.norm() > 0.03                             # both moved well beyond the tolerance below
    assert (ua - ub).norm() < 1e-2 * ub.norm()           # the same update, up to fp16 forward noise


def test_step_cancelled_after_unscale_leaves_scaler_usable():
    learn, mp, seen = learner(), MixedPrecisionS('fp16'), Seen()
    class CancelOdd(Subscriber):
        order = Order.GUARD
        def after_backward(self, learn):
            if learn.iter % 2: raise CancelStepException()
    learn.fit(1, subs=[mp, CancelOdd(), seen], valid=False)   # unscale_ twice in a step would raise
    assert learn.global_step == seen.steps == 3 and mp.scaler.get_scale() == 65536.


def test_nan_guard_with_fp16_checks_loss_only():
    learn, guard = learner(), TerminateOnNaNS()
    learn.fit(1, subs=[MixedPrecisionS('fp16'), guard, Overflow([(0, 2)])], valid=False)
    assert guard.reason is None and learn.global_step == 5   # an overflow is the scaler's business
    learn.loss_func = lambda p, y: F.cross_entropy(p, y) * math.nan
    with pytest.warns(RuntimeWarning, match='loss'):
        learn.fit(1, subs=[MixedPrecisionS('fp16'), guard], valid=False)
    assert learn.global_step == 5


@needs_cuda
@pytest.mark.parametrize('dtype', ['bf16', 'fp16', 'auto'])
def test_cuda_mixed_precision_trains(dtype):
    learn, mp = learner(device='cuda'), MixedPrecisionS(dtype, verbose=False)
    start = learn.validate()['loss']
    learn.fit(4, subs=[mp])
    assert learn.validate()['loss'] < 0.7 * start
    assert (mp.scaler is not None) == (mp.chosen == 'fp16')


# -- channels-last and compile -----------------------------------------------------------------------------------

def conv_learner(device='cpu'):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 2, (32,), generator=g)
    set_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).to(device)
    dls = DataLoaders.from_tensors(x, y, x, y, batch_size=8, shuffle=False, device=device)
    return Learner(model, dls, F.cross_entropy, torch.optim.SGD, lr=0.1)


def test_channels_last_layout_and_same_result():
    learn, plain = conv_learner(), conv_learner()
    seen = set()
    class Layout(Subscriber):
        order = Order.METRICS
        def after_predict(self, learn):
            seen.add((learn.batch[0].is_contiguous(memory_format=torch.channels_last),
                      learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)))
    learn.fit(1, subs=[ChannelsLastS(), Layout()])
    plain.fit(1)
    assert seen == {(True, True)}
    assert learn.model[0].weight.is_contiguous()
    for p, q in zip(learn.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_channels_last_keeps_a_channels_last_model():
    learn = conv_learner()
    learn.model.to(memory_format=torch.channels_last)
    learn.fit(1, subs=[ChannelsLastS()])
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_trains_like_eager_and_restores_module():
    learn, plain, cs = learner(), learner(), CompileS(backend='eager')
    model = learn.model
    kinds = []
    class Which(Subscriber):
        def before_batch(self, learn): kinds.append(type(learn.model).__name__)
    learn.fit(1, subs=[cs, Which()])
    compiled = cs.compiled
    learn.fit(1, subs=[cs])
    plain.fit(2)
    assert learn.model is model and cs.compiled is compiled and set(kinds) == {'OptimizedModule'}
    for p, q in zip(learn.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_nan_forensics_under_compile_names_the_eager_module():
    class Poison(nn.Module):
        armed = False
        def forward(self, x): return x * math.nan if self.armed else x
    learn, guard = learner(), TerminateOnNaNS()
    learn.model = nn.Sequential(learn.model[0], Poison(), learn.model[1], learn.model[2])
    learn.model[1].armed = True
    with pytest.warns(RuntimeWarning):
        learn.fit(1, subs=[CompileS(backend='eager'), guard])
    assert guard.module == '1 (Poison)' and '0.weight' in guard.reason and '_orig_mod' not in guard.reason


@needs_cuda
def test_cuda_channels_last_bf16_conv():
    learn, plain = conv_learner('cuda'), conv_learner('cuda')
    learn.fit(1, subs=[ChannelsLastS(), MixedPrecisionS('bf16')])
    plain.fit(1)
    for p, q in zip(learn.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-2, rtol=2e-2)


def test_make_scaler_cpu():
    if not hasattr(torch.amp, 'GradScaler'): pytest.skip('torch.amp.GradScaler needs torch >= 2.3')
    assert make_scaler('cpu').get_scale() == 65536.


def test_everything_together_under_compile():
    learn, ema, cs = learner(), EMAS(decay=0.9), CompileS(backend='eager')
    model = learn.model
    start = learn.validate()['loss']
    subs = [cs, MixedPrecisionS('bf16'), GradAccumS(2), GradClipS(1.0), TerminateOnNaNS(), ema]
    learn.fit(3, subs=subs)
    assert learn.model is model and learn.global_step == ema.n_updates == 3 * 3
    assert learn.validate()['loss'] < start
