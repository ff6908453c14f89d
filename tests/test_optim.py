"Each optimizer against its torch.optim counterpart (LAMB against the paper's update), step by step."
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.learner import Learner, MomentumLearner
from nntrain.testing import same_weights, synth_dls, synth_learner
from nntrain.optim import (LAMB, SGD, Adam, AdamW, Momentum, RMSProp, StatsOptimizer,
                           adam_opt, average_grad, rmsprop_opt, sgd_opt, sgd_step, step_stat)

N_STEPS = 5


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(3, generator=g))]


def _grads(n=N_STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, generator=g), torch.randn(3, generator=g)] for _ in range(n)]


def _trajectory(make_opt, grads=None):
    "Weights after each step of `make_opt(params)` fed the same gradients."
    ps = _params()
    opt = make_opt(ps)
    out = []
    for gs in grads or _grads():
        for p, g in zip(ps, gs, strict=True): p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def _assert_same(a, b, atol=1e-6):
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for pa, pb in zip(sa, sb, strict=True):
            assert torch.allclose(pa, pb, atol=atol, rtol=1e-5), f'step {i + 1}: max diff {(pa - pb).abs().max()}'


PAIRS = {
    'sgd': (partial(SGD, lr=0.1), partial(torch.optim.SGD, lr=0.1)),
    'sgd_wd': (partial(SGD, lr=0.1, weight_decay=0.3), partial(torch.optim.SGD, lr=0.1, weight_decay=0.3)),
    'momentum': (partial(Momentum, lr=0.1, momentum=0.8),
                 partial(torch.optim.SGD, lr=0.1, momentum=0.8, dampening=0.8)),
    'rmsprop': (partial(RMSProp, lr=0.01, alpha=0.9, eps=1e-6),
                partial(torch.optim.RMSprop, lr=0.01, alpha=0.9, eps=1e-6)),
    'adam': (partial(Adam, lr=0.01, betas=(0.8, 0.95)), partial(torch.optim.Adam, lr=0.01, betas=(0.8, 0.95))),
    'adam_l2': (partial(Adam, lr=0.01, weight_decay=0.2), partial(torch.optim.Adam, lr=0.01, weight_decay=0.2)),
    'adamw': (partial(AdamW, lr=0.01, weight_decay=0.2), partial(torch.optim.AdamW, lr=0.01, weight_decay=0.2)),
    'adamw_default_wd': (AdamW, torch.optim.AdamW),
    # the generic optimizer's compositions
    'stats_sgd': (partial(sgd_opt, lr=0.1, wd=0.3), partial(torch.optim.SGD, lr=0.1, weight_decay=0.3)),
    'stats_rmsprop': (partial(rmsprop_opt, lr=0.01, sqr_mom=0.9), partial(torch.optim.RMSprop, lr=0.01, alpha=0.9)),
    'stats_adamw': (partial(adam_opt, lr=0.01, mom=0.8, wd=0.2),
                    partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.999), weight_decay=0.2)),
}


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_matches_torch(name):
    ours, theirs = PAIRS[name]
    _assert_same(_trajectory(ours), _trajectory(theirs))


def test_param_groups_match_torch():
    "Discriminative learning rates: each group uses its own hyper-parameters."
    groups = lambda ps: [{'params': [ps[0]], 'lr': 1e-3}, {'params': [ps[1]], 'weight_decay': 0.5}]
    _assert_same(_trajectory(lambda ps: AdamW(groups(ps), lr=0.05)),
                 _trajectory(lambda ps: torch.optim.AdamW(groups(ps), lr=0.05)))


def test_momentum_weight_decay_is_decoupled():
    "Momentum's weight decay shrinks the weights before the step; it is not folded into the average."
    ps, grads = _params(), _grads()
    opt = Momentum(ps, lr=0.1, momentum=0.8, weight_decay=0.3)
    ref = [p.detach().clone() for p in ps]
    bufs = [None, None]
    for gs in grads:
        for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
            p.grad = g.clone()
            bufs[i] = g.clone() if bufs[i] is None else 0.8 * bufs[i] + 0.2 * g
            ref[i] = ref[i] * (1 - 0.1 * 0.3) - 0.1 * bufs[i]
        opt.step()
    for p, r in zip(ps, ref, strict=True): assert torch.allclose(p, r, atol=1e-6)


def _lamb_reference(w, grads, lr, b1, b2, eps, wd):
    "You et al. 2019, Algorithm 2, transcribed for one layer (phi = identity)."
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        r = m_hat / (v_hat.sqrt() + eps)
        u = r + wd * w
        trust = (w.norm() / u.norm()) if w.norm() > 0 and u.norm() > 0 else 1.
        w = w - lr * trust * u
        out.append(w.clone())
    return out


@pytest.mark.parametrize('wd', [0., 0.1])
def test_lamb_matches_paper(wd):
    grads = _grads()
    ours = _trajectory(partial(LAMB, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd), grads)
    for j in range(2):
        ref = _lamb_reference(_params()[j].detach(), [gs[j] for gs in grads], 0.02, 0.9, 0.99, 1e-6, wd)
        for i in range(N_STEPS): assert torch.allclose(ours[i][j], ref[i], atol=1e-6), f'param {j}, step {i + 1}'


def test_lamb_zero_weights_use_unit_trust():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1., -2., 0.5])
    LAMB([p], lr=0.1).step()
    assert torch.isfinite(p).all() and p.abs().max() > 0


ALL = {'sgd': partial(SGD, lr=0.1, weight_decay=0.1), 'momentum': partial(Momentum, lr=0.1),
       'rmsprop': partial(RMSProp, lr=0.01), 'adam': partial(Adam, lr=0.01), 'adamw': partial(AdamW, lr=0.01),
       'lamb': partial(LAMB, lr=0.01, weight_decay=0.1), 'stats_adam': partial(adam_opt, lr=0.01)}


@pytest.mark.parametrize('name', sorted(ALL))
def test_state_dict_round_trip(name):
    "Saving after 2 steps and resuming in a fresh optimizer gives the uninterrupted trajectory exactly."
    make, grads = ALL[name], _grads()
    full = _trajectory(make, grads)
    ps = _params()
    opt = make(ps)
    for gs in grads[:2]:
        for p, g in zip(ps, gs, strict=True): p.grad = g.clone()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in ps]
    ps2 = [nn.Parameter(w) for w in weights]
    opt2 = make(ps2)
    opt2.load_state_dict(sd)
    assert opt2.state_dict()['param_groups'] == opt.state_dict()['param_groups']
    for i, gs in enumerate(grads[2:], start=2):
        for p, g in zip(ps2, gs, strict=True): p.grad = g.clone()
        opt2.step()
        assert same_weights(ps2, full[i]), f'step {i + 1} differs after resuming'


@pytest.mark.parametrize('name', sorted(ALL))
def test_works_with_torch_lr_scheduler(name):
    "A torch scheduler drives our optimizers' learning rate (and momentum for OneCycleLR)."
    ps = _params()
    opt = ALL[name](ps)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for gs in _grads():
        for p, g in zip(ps, gs, strict=True): p.grad = g.clone()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]['lr'])
    base = ALL[name].keywords['lr']
    assert lrs == pytest.approx([base, base / 2, base / 2, base / 4, base / 4])


def test_one_cycle_scheduler_cycles_betas():
    ps = _params()
    opt = AdamW(ps, lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, pct_start=0.5)
    for _ in range(4):   # torch's one-cycle peaks at step pct_start * total_steps - 1
        for p, g in zip(ps, _grads(1)[0], strict=True): p.grad = g
        opt.step(); sched.step()
    assert opt.param_groups[0]['lr'] == pytest.approx(0.1)
    assert opt.param_groups[0]['betas'][0] == pytest.approx(0.85)


def test_closure_returns_loss():
    p = nn.Parameter(torch.tensor([1.0]))
    opt = Adam([p], lr=0.1)
    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss
    assert opt.step(closure).item() == pytest.approx(1.0)
    assert p.item() < 1.0


def test_stats_optimizer_defaults_and_errors():
    opt = StatsOptimizer(_params(), [sgd_step], [average_grad, step_stat], lr=0.5)
    assert opt.defaults == {'lr': 0.5, 'mom': 0.9}
    with pytest.raises(TypeError, match='no stat or stepper uses'):
        StatsOptimizer(_params(), [sgd_step], wd=0.1)


@pytest.mark.parametrize('bad', [dict(lr=-1.), dict(momentum=1.), dict(weight_decay=-0.1)])
def test_rejects_bad_hypers(bad):
    with pytest.raises(ValueError, match=f'{next(iter(bad))} must be'):
        Momentum(_params(), **bad)


def test_adam_rejects_bad_betas():
    with pytest.raises(ValueError, match='betas'):
        AdamW(_params(), betas=(0.9, 1.0))


def _fit_weights(learn_cls, opt_func, **kw):
    torch.manual_seed(0)
    learn = learn_cls(nn.Linear(1, 1), synth_dls(), F.mse_loss, opt_func, lr=0.05, **kw)
    learn.fit(2)
    return [p.detach().clone() for p in learn.model.parameters()]


def test_momentum_learner_is_heavy_ball_momentum():
    "Decaying gradients by mom instead of zeroing them = torch SGD with momentum and no dampening."
    a = _fit_weights(MomentumLearner, torch.optim.SGD, mom=0.8)
    b = _fit_weights(Learner, partial(torch.optim.SGD, momentum=0.8))
    for x, y in zip(a, b, strict=True): assert torch.allclose(x, y, atol=1e-5)
    c = _fit_weights(Learner, torch.optim.SGD)
    assert not all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, c, strict=True))


def test_optimizers_train_through_learner():
    "Every optimizer lowers the loss of the synthetic regression when used as a Learner's opt_func."
    for name, make in ALL.items():
        learn = synth_learner(lr=0.05, opt_func=lambda ps, lr, make=make: make(ps))
        before = learn.validate()['loss']
        learn.fit(3)
        assert learn.validate()['loss'] < before, name
