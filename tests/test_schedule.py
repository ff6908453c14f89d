"Schedule curves, ParamSchedulerS, SchedulerS, fit_one_cycle and fit_flat_cos."
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import CancelStepException, Order, Subscriber
from nntrain.learner import Learner
from nntrain.testing import synth_dls, synth_learner
from nntrain.optim import SGD, AdamW, adam_opt
from nntrain.subs.schedule import (ParamSchedulerS, SchedulerS, combine_scheds, cos_1cycle_anneal, get_hyper,
                                   one_cycle_scheds, sched_cos, sched_exp, sched_lin, sched_no)

POS = [i / 100 for i in range(101)]


def _learn(opt_func=torch.optim.SGD, lr=0.1, seed=0, subs=()):
    return synth_learner(subs, lr, opt_func, seed)


# -- curves ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sched', [sched_lin, sched_cos, sched_exp])
@pytest.mark.parametrize('start,end', [(1., 1e-3), (1e-3, 1.)])
def test_curve_endpoints_and_monotone(sched, start, end):
    f = sched(start, end)
    assert f(0.) == pytest.approx(start) and f(1.) == pytest.approx(end)
    vals = [f(p) for p in POS]
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d <= 1e-12 for d in diffs) if end < start else all(d >= -1e-12 for d in diffs)


def test_curve_shapes():
    lin, cos, exp = sched_lin(2., 4.), sched_cos(2., 4.), sched_exp(1e-4, 1.)
    assert lin(0.25) == pytest.approx(2.5)
    for p in POS: assert cos(p) + cos(1 - p) == pytest.approx(6.)       # cosine is symmetric about its midpoint
    assert cos(0.01) - 2. < lin(0.01) - 2.                              # and flat at the ends
    for p in POS: assert math.log10(exp(p)) == pytest.approx(-4 + 4 * p)   # exponential: linear in log space
    assert all(sched_no(3., 9.)(p) == 3. for p in POS)


def test_combine_scheds_segments_and_continuity():
    f = combine_scheds([0.25, 0.75], cos_1cycle_anneal(1., 10., 0.))
    assert f(0.) == pytest.approx(1.) and f(0.25) == pytest.approx(10.) and f(1.) == pytest.approx(0.)
    assert f(0.25 - 1e-9) == pytest.approx(10.) and f(0.125) == pytest.approx(5.5)
    assert f(0.625) == pytest.approx(5.)
    assert f(-1.) == f(0.) and f(2.) == f(1.)                           # clipped to [0, 1]
    g = combine_scheds([0.5, 0., 0.5], [sched_lin(0., 1.), sched_no(99., 99.), sched_lin(1., 0.)])
    assert g(0.5) == pytest.approx(1.) and 99. not in [g(p) for p in POS]


@pytest.mark.parametrize('pcts,n,why', [([0.5, 0.6], 2, 'must sum to 1'), ([0.5, 0.5], 3, '2 fractions for 3'),
                                        ([-0.5, 1.5], 2, 'must be non-negative')])
def test_combine_scheds_rejects_bad_fractions(pcts, n, why):
    with pytest.raises(ValueError, match=why):
        combine_scheds(pcts, [sched_no(1., 1.)] * n)


# -- ParamSchedulerS --------------------------------------------------------------------------------------------
def test_param_scheduler_maps_mom_to_the_optimizer():
    for opt_func, key in [(AdamW, 'betas'), (torch.optim.SGD, 'momentum'), (adam_opt, 'mom')]:
        learn = _learn(opt_func)
        ps = ParamSchedulerS({'mom': sched_lin(0.9, 0.8)})
        learn.fit(1, subs=[ps])
        val = learn.opt.param_groups[0][key]
        assert (val[0] if key == 'betas' else val) == pytest.approx(ps.hps['mom'][-1])
        assert ps.hps['mom'][0] == pytest.approx(0.9)


def test_param_scheduler_unknown_name_fails_before_any_step():
    learn = _learn(SGD)
    w = learn.model.weight.detach().clone()
    with pytest.raises(KeyError, match="no hyper-parameter for 'mom'"):
        learn.fit_one_cycle(1)                          # our SGD has no momentum
    assert torch.equal(learn.model.weight, w) and learn.global_step == 0
    learn.fit_one_cycle(1, moms=None)                   # works without a momentum schedule
    assert learn.global_step == len(learn.dls.train)


class _ReadLr(Subscriber):
    "Write down the learning rate seen by every batch, with the phase (after schedulers set it)."
    order = Order.SCHEDULE + 1
    def __init__(self): self.seen = []
    def before_batch(self, learn): self.seen.append((learn.training, learn.opt.param_groups[0]['lr']))


def test_param_scheduler_does_not_act_in_validation():
    learn = _learn()
    ps, reader = ParamSchedulerS({'lr': sched_lin(0.1, 0.01)}), _ReadLr()
    learn.fit(2, subs=[ps, reader])
    # a valid pass sees the lr the last training batch set, unchanged
    prev = None
    for training, lr in reader.seen:
        if not training: assert lr == prev
        prev = lr
    recorded = list(ps.hps['lr'])
    learn.add_subs(ps)
    learn.validate()
    assert ps.hps['lr'] == recorded                     # validate() neither schedules nor wipes the records


def test_param_scheduler_per_group_and_cancelled_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1))
    opt_func = lambda ps, lr: AdamW([{'params': model[0].parameters()}, {'params': model[1].parameters()}], lr=lr)
    learn = Learner(model, synth_dls(), F.mse_loss, opt_func, lr=0.1)

    class Accumulate(Subscriber):
        def after_backward(self, learn):
            if learn.iter % 2 == 0: raise CancelStepException()
    rec = learn.fit_one_cycle(2, lr_max=[1e-3, 1e-2], subs=[Accumulate()])
    assert len(rec.hps['lr']) == learn.global_step == 2 * len(learn.dls.train) // 2
    assert max(rec.hps['lr']) <= 1e-2 and learn.opt.param_groups[0]['lr'] < learn.opt.param_groups[1]['lr']
    with pytest.raises(ValueError, match='param groups'):
        learn.fit(1, subs=[ParamSchedulerS({'lr': [sched_no(1., 1.)] * 3})])


# -- fit_one_cycle / fit_flat_cos -----------------------------------------------------------------------------
@pytest.mark.parametrize('pct_start', [0.25, 0.5])
def test_one_cycle_peaks_at_pct_start(pct_start):
    learn = _learn(AdamW)
    rec = learn.fit_one_cycle(4, lr_max=0.02, pct_start=pct_start, div=10, div_final=1e3)
    lrs, moms, n = rec.hps['lr'], rec.hps['mom'], 4 * len(learn.dls.train)
    assert len(lrs) == n
    peak = round(pct_start * n)
    assert max(range(n), key=lrs.__getitem__) == peak and lrs[peak] == pytest.approx(0.02)
    assert min(range(n), key=moms.__getitem__) == peak and moms[peak] == pytest.approx(0.85)
    assert lrs[0] == pytest.approx(0.002) and moms[0] == pytest.approx(0.95)
    assert lrs[-1] < lrs[0] and lrs[-1] >= 0.02 / 1e3
    assert learn.opt.param_groups[0]['lr'] == lrs[-1]    # final values stay (documented)


def test_fit_flat_cos_defaults_to_learner_lr():
    learn = _learn(lr=0.03)
    rec = learn.fit_flat_cos(4)
    assert rec.hps['lr'][0] == pytest.approx(0.03) and rec.hps['lr'][-1] < 0.01
    assert len(rec.hps['lr']) == 4 * len(learn.dls.train)


def test_one_cycle_scheds_function():
    s = one_cycle_scheds([1e-3, 1e-2], moms=None)
    assert 'mom' not in s and len(s['lr']) == 2 and s['lr'][1](0.25) == pytest.approx(1e-2)


# -- SchedulerS -----------------------------------------------------------------------------------------------
def _step_lr(opt): return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


class _Watch(Subscriber):
    "Scheduler step count at the start and end of each valid pass."
    def __init__(self, s): self.s, self.valid = s, []
    def before_epoch(self, learn):
        if not learn.training: self.start = self.s.scheduler.last_epoch
    def after_epoch(self, learn):
        if not learn.training: self.valid.append((self.start, self.s.scheduler.last_epoch))


def test_scheduler_counts_optimizer_steps_not_batches():
    learn = _learn()

    class Accumulate(Subscriber):
        def after_backward(self, learn):
            if learn.iter % 2 == 1: raise CancelStepException()
    s = SchedulerS(_step_lr)
    watch = _Watch(s)
    learn.fit(3, subs=[s, Accumulate(), watch])
    assert learn.global_step == 3 * len(learn.dls.train) // 2
    assert s.scheduler.last_epoch == learn.global_step
    assert all(a == b for a, b in watch.valid) and len(watch.valid) == 3   # no stepping in validation
    assert learn.opt.param_groups[0]['lr'] == pytest.approx(0.1 * 0.5 ** (learn.global_step // 3))


def test_scheduler_epoch_interval_and_validate():
    learn = _learn()
    s = SchedulerS(_step_lr, interval='epoch')
    learn.add_subs(s)
    learn.fit(4)
    assert s.scheduler.last_epoch == 4
    learn.validate()
    learn.fit(2, train=False)
    assert s.scheduler.last_epoch == 4


def test_scheduler_kept_across_fits_and_rebuilt_for_a_new_optimizer():
    learn = _learn()
    s = SchedulerS(_step_lr)
    learn.add_subs(s)
    learn.fit(1); first = s.scheduler
    learn.fit(1)
    assert s.scheduler is first and s.scheduler.last_epoch == learn.global_step
    learn.fit(1, reset_opt=True)
    assert s.scheduler is not first and s.scheduler.optimizer is learn.opt
    assert s.scheduler.last_epoch == len(learn.dls.train)


def _cosine(opt): return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3)


def test_scheduler_state_round_trip_resumes_the_same_run():
    "Checkpoint after one epoch, resume in a fresh learner: same learning rates and same final weights."
    ref = _learn()
    s_ref, r_ref = SchedulerS(_cosine), _ReadLr()
    ref.fit(3, subs=[s_ref, r_ref])

    a = _learn()
    s_a, r_a = SchedulerS(_cosine), _ReadLr()
    a.fit(1, subs=[s_a, r_a])
    ckpt = dict(model=a.model.state_dict(), opt=a.opt.state_dict(), sched=s_a.state_dict(),
                dl=a.dls.train.state_dict(), step=a.global_step)

    b = _learn(seed=1)                                  # different init: everything must come from the checkpoint
    b.dls = _learn().dls
    b.model.load_state_dict(ckpt['model'])
    b.opt = b.opt_func(b.model.parameters(), b.lr)
    b.opt.load_state_dict(ckpt['opt'])
    b.dls.train.load_state_dict(ckpt['dl'])
    b.global_step = ckpt['step']
    s_b = SchedulerS(_cosine)
    s_b.load_state_dict(ckpt['sched'])
    assert s_b.state_dict()['last_epoch'] == ckpt['step']
    b.fit(2, subs=[s_b, r_a])
    assert [flag for flag, _ in r_a.seen] == [flag for flag, _ in r_ref.seen]
    assert [lr for _, lr in r_a.seen] == pytest.approx([lr for _, lr in r_ref.seen])
    assert s_b.scheduler.last_epoch == s_ref.scheduler.last_epoch
    for p, q in zip(b.model.parameters(), ref.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_scheduler_drives_one_cycle_lr_with_betas():
    learn = _learn(AdamW)
    n = 2 * len(learn.dls.train)
    s = SchedulerS(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=n))
    reader = _ReadLr()
    learn.fit(2, subs=[s, reader])
    assert s.scheduler.last_epoch == n
    lrs = [lr for training, lr in reader.seen if training]
    assert len(lrs) == n and lrs[0] == pytest.approx(0.05 / 25) and lrs[-1] < 0.05 / 1000   # the last step is annealed
    assert get_hyper(learn.opt.param_groups[0], 'mom') > 0.9             # betas[0] cycled back up
