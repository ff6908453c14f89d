"""Issue 18, rules 4, 5, 7 and 8: compound calls check everything first, only subscribers are subscribers, an error's
advice works when followed, and nothing is silently a no-op.

A refused call must leave weights, optimizer state, counters, history, frozen flags and files bitwise as they were
(`state_of` / `assert_same`, as in tests/test_hardening.py, plus the parameters' requires_grad flags and splitter).
"""
import importlib
import warnings
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nntrain.core import CancelFitException, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.run import Run
from nntrain.subs.augment import AugmentS, MixUpS
from nntrain.subs.checkpoint import CheckpointS
from nntrain.subs.metrics import MetricsS, on_preds
from nntrain.subs.precision import MixedPrecisionS
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, sched_exp, sched_lin
from nntrain.subs.tracking import EarlyStoppingS
from nntrain.subs.training import EMAS
from nntrain.testing import synth_dls, synth_learner, tiny_classifier
from nntrain.transfer import default_splitter
from tests.test_hardening import Counter, assert_same, state_of

importlib.import_module('nntrain.transfer')       # patches freeze, fine_tune onto Learner
importlib.import_module('nntrain.subs.lr_find')   # patches lr_find


def full_state(learn) -> dict:
    "`state_of`, plus what a compound call changes first: the frozen flags, the splitter, the optimizer's rates."
    return {**state_of(learn), 'grad': [p.requires_grad for p in learn.model.parameters()],
            'splitter': learn.splitter, 'lrs': None if learn.opt is None else [g['lr'] for g in learn.opt.param_groups]}


def assert_unchanged(before: dict, learn) -> None:
    after = full_state(learn)
    assert_same(before, after)
    assert before['grad'] == after['grad'] and before['splitter'] is after['splitter'] and before['lrs'] == after['lrs']


def body_head():
    "A small classifier with a body and a head (two parameter groups for the default splitter)."
    set_seed(0)
    x, y = torch.randn(48, 8), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(model, DataLoaders.from_tensors(x, y, x[:32], y[:32], batch_size=16), F.cross_entropy,
                   torch.optim.AdamW, lr=1e-2)


# -- rule 4: compound operations validate every argument before the first change ------------------------------------
@pytest.mark.parametrize('kwargs, error, message', [
    (dict(pct_strat=0.2), TypeError, "unexpected keyword argument 'pct_strat'; did you mean 'pct_start'?"),
    (dict(lr_max=0.1), TypeError, "unexpected keyword argument 'lr_max'"),
    (dict(resume=True), TypeError, "unexpected keyword argument 'resume'"),
    (dict(div=0), ValueError, 'div must be a finite number in (0, inf), got 0'),
    (dict(div=-5.), ValueError, 'div must be a finite number in (0, inf), got -5.0'),
    (dict(div_final=float('inf')), ValueError, 'div_final must be a finite number'),
    (dict(moms=(0.95, 1.5, 0.95)), ValueError, 'moms[1] must be a finite number in [0, 1)'),
    (dict(moms=0.9), ValueError, 'moms must be (start, middle, end) momentums or None'),
    (dict(pct_start=1.5), ValueError, 'pct_start must be a finite number in [0, 1]'),
    (dict(base_lr=-1e-3), ValueError, 'base_lr must be a finite number'),
    (dict(lr_mult=0.5), ValueError, 'lr_mult must be a finite number in [1, inf)'),
    (dict(freeze_epochs=-1), ValueError, 'freeze_epochs must be an int >= 0'),
    (dict(train_bn='no'), TypeError, 'train_bn must be True or False'),
    (dict(subs=[None]), TypeError, 'subs[0] is None, not a subscriber'),
    (dict(subs=[Counter]), TypeError, 'pass an instance, Counter()'),
    (dict(n_batches=0), ValueError, 'n_batches must be an int >= 1'),
    (dict(train=False, valid=False), ValueError, 'has nothing to do'),
    (dict(valid='yes'), TypeError, 'valid must be True or False'),
])
def test_fine_tune_checks_everything_before_freezing(kwargs, error, message):
    "Issue 18's examples: a misspelt keyword and a bad schedule argument, after freezing and a whole frozen epoch."
    learn = body_head()
    learn.fit(1)
    before = full_state(learn)
    with pytest.raises(error) as e: learn.fine_tune(1, **kwargs)
    assert message in str(e.value)
    assert_unchanged(before, learn)
    learn.fine_tune(1, freeze_epochs=1)   # and it works after


def test_fine_tune_follows_its_advice_and_trains():
    learn = body_head()
    scheds = learn.fine_tune(1, pct_start=0.2, div_final=1e4, moms=(0.9, 0.8, 0.9), n_batches=2)
    assert len(scheds) == 2 and learn.global_step == 4 and learn.frozen_groups() == [False, False]


@pytest.mark.parametrize('call, message', [
    (lambda l: l.fit_one_cycle(1, div=0), 'div must be a finite number in (0, inf), got 0'),
    (lambda l: l.fit_one_cycle(1, div=-25.), 'div must be'),
    (lambda l: l.fit_one_cycle(1, div_final=-1.), 'div_final must be'),
    (lambda l: l.fit_one_cycle(1, pct_start=-0.1), 'pct_start must be'),
    (lambda l: l.fit_one_cycle(1, moms=(0.9, float('nan'), 0.9)), 'moms[1] must be'),
    (lambda l: l.fit_one_cycle(1, lr_max=float('inf')), 'lr_max must be a finite number'),
    (lambda l: l.fit_one_cycle(1, lr_max=-0.1), 'lr_max must be a finite number in (0, inf), got -0.1'),
    (lambda l: l.fit_flat_cos(1, div_final=0.), 'div_final must be'),
    (lambda l: l.fit_flat_cos(1, pct_start=2), 'pct_start must be'),
    (lambda l: l.fit(1, subs=[ParamSchedulerS({'lr': sched_lin(0.1, -0.1)})]),
     "the schedule of 'lr' (param group 0) gives -0.002 at pct_train=0.51: a learning rate must be finite and not "
     "negative"),
    (lambda l: l.fit(1, subs=[ParamSchedulerS({'lr': sched_exp(0., 0.1)})]), "the schedule of 'lr' (param group 0) fails"),
    (lambda l: l.fit(1, subs=[ParamSchedulerS({'mom': sched_lin(0.9, float('inf'))})]),
     "the schedule of 'mom' (param group 0) gives"),
])
def test_schedule_arguments_giving_bad_rates_are_refused_naming_them_before_any_step(call, message):
    importlib.import_module('nntrain.subs.schedule')
    learn = synth_learner(opt_func=partial(torch.optim.SGD, momentum=0.9))
    learn.fit(1)
    before = full_state(learn)
    with pytest.raises(ValueError) as e: call(learn)
    assert message in str(e.value)
    assert_unchanged(before, learn)


@pytest.mark.parametrize('how', ['fit lr', 'learner lr', 'list', 'fit_one_cycle', 'SchedulerS'])
def test_a_spread_of_rates_on_one_parameter_group_is_refused_before_any_change(how):
    "lr=slice(lo, hi) on an optimizer with one group must not silently become one rate (rule 4), on every path."
    importlib.import_module('nntrain.subs.schedule')
    learn = synth_learner()
    learn.fit(1)
    spread = slice(1e-3, 1e-1)
    if how == 'learner lr': learn.lr = spread
    before = full_state(learn)
    calls = {'fit lr': lambda: learn.fit(1, lr=spread), 'learner lr': lambda: learn.fit(1),
             'list': lambda: learn.fit(1, lr=[0.1, 0.2]),
             'fit_one_cycle': lambda: learn.fit_one_cycle(1, spread),
             'SchedulerS': lambda: learn.fit(1, subs=[SchedulerS(partial(torch.optim.lr_scheduler.OneCycleLR,
                                                                           max_lr=spread, total_steps=4))])}
    with pytest.raises(ValueError, match='spreads rates over parameter groups, but the optimizer has one|2 learning '
                                         'rates for 1 param groups'):
        calls[how]()
    assert_unchanged(before, learn)


def test_the_advice_for_a_spread_of_rates_works():
    "Following each part of the advice: a new learner with a splitter; on this learner, a splitter and reset_opt."
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    dls = DataLoaders.from_tensors(x, y, x, y, batch_size=8)
    model = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match='splitter=default_splitter') as e: Learner(model(), dls).fit(1, lr=slice(1e-3, 0.1))
    assert 'reset_opt=True' in str(e.value)
    fresh = Learner(model(), dls, splitter=default_splitter)
    fresh.fit(1, lr=slice(1e-3, 0.1))
    assert [g['lr'] for g in fresh.opt.param_groups] == pytest.approx([1e-3, 0.1])
    existing = Learner(model(), dls)
    existing.fit(1)
    existing.splitter = default_splitter
    with pytest.raises(ValueError, match='has one'): existing.fit(1, lr=slice(1e-3, 0.1))   # without reset_opt
    existing.fit(1, lr=slice(1e-3, 0.1), reset_opt=True)
    assert len(existing.opt.param_groups) == 2
    frozen = Learner(model(), dls)
    frozen.fit(1)
    frozen.freeze()
    frozen.fit(1, lr=slice(1e-3, 0.1))
    assert [g['lr'] for g in frozen.opt.param_groups] == pytest.approx([1e-3, 0.1])


def test_the_lr_finder_result_advice_works():
    learn = synth_learner()
    result = learn.lr_find(num_it=10, show_plot=False)
    with pytest.raises(TypeError, match='e.g. lr=result.valley'): learn.fit(1, lr=result)
    learn.fit(1, lr=result.valley)


# -- rule 5: only subscribers are subscribers, once each ----------------------------------------------------------
class Plain(Subscriber):
    def after_batch(self, learn): pass


BAD_SUBS = {'None': (None, 'subs[0] is None, not a subscriber'),
            'a function': (print, 'subs[0] is a function, not a subscriber'),
            'a lambda': (lambda learn: None, 'subs[0] is a function, not a subscriber'),
            'a string': ('ProgressS', "subs[0] is 'ProgressS', not a subscriber"),
            'an int': (3, 'subs[0] is 3, not a subscriber'),
            'a class': (Plain, 'subs[0] is the class Plain, not a subscriber: pass an instance, Plain()'),
            'an object without events': (object(), 'not a subscriber')}


def _entry_points():
    "Every place that takes subscribers: (name, call(learn, subs))."
    def execute(learn, subs):
        learn.execute(Run('validate', [(learn.dls.valid, False)]), subs)
    return {'Learner': lambda learn, subs: Learner(nn.Linear(1, 1), synth_dls(), F.mse_loss, subs=subs),
            'add_subs': lambda learn, subs: learn.add_subs(*subs),
            'fit': lambda learn, subs: learn.fit(1, subs=subs),
            'fit_one_cycle': lambda learn, subs: learn.fit_one_cycle(1, subs=subs),
            'fit_flat_cos': lambda learn, subs: learn.fit_flat_cos(1, subs=subs),
            'fine_tune': lambda learn, subs: learn.fine_tune(1, subs=subs),
            'audit_syncs': lambda learn, subs: learn.audit_syncs(subs=subs),
            'execute': execute}


@pytest.mark.parametrize('entry', sorted(_entry_points()))
@pytest.mark.parametrize('bad', sorted(BAD_SUBS))
def test_only_subscribers_are_accepted_everywhere(entry, bad):
    importlib.import_module('nntrain.subs.schedule'); importlib.import_module('nntrain.subs.debug')
    learn = body_head()
    learn.fit(1)
    before = full_state(learn)
    item, message = BAD_SUBS[bad]
    with pytest.raises(TypeError) as e: _entry_points()[entry](learn, [item])
    assert message in str(e.value)
    assert_unchanged(before, learn)


@pytest.mark.parametrize('entry', sorted(_entry_points()))
def test_a_subscriber_once_each(entry):
    importlib.import_module('nntrain.subs.schedule'); importlib.import_module('nntrain.subs.debug')
    learn = body_head()
    learn.fit(1)
    sub = Plain()
    before = full_state(learn)
    with pytest.raises(ValueError, match=r'subs\[1\] \(Plain\(order=0\)\) appears twice in subs'):
        _entry_points()[entry](learn, [sub, sub])
    assert_unchanged(before, learn)
    if entry in ('Learner', 'execute'): return
    learn.add_subs(sub)
    before = full_state(learn)
    with pytest.raises(ValueError, match='already subscribed to this learner'): _entry_points()[entry](learn, [sub])
    assert_unchanged(before, learn)


def test_subs_that_are_not_a_list_are_refused():
    for subs in (Plain(), 'ProgressS', None, 3):
        with pytest.raises(TypeError, match='subs must be a list of subscribers'):
            Learner(nn.Linear(1, 1), synth_dls(), F.mse_loss, subs=subs)


# -- rule 7: an error's advice works when followed ----------------------------------------------------------------
@pytest.mark.parametrize('key', ['model', 'state_dict', 'model_state_dict'])
def test_loading_your_own_checkpoint_dict_advises_load_weights_which_works(tmp_path, key):
    "Issue 18's example: `{'model': state_dict, 'epoch': 3}`; load refuses it and says what does load it."
    source = synth_learner(seed=1)
    source.fit(1)
    path = tmp_path / 'mine.pt'
    torch.save({key: source.model.state_dict(), 'epoch': 3, 'optimizer': source.opt.state_dict()}, path)
    learn = synth_learner()
    learn.fit(1)
    before = full_state(learn)
    with pytest.raises(ValueError, match=r'it holds model weights, which learn.load_weights\(path\) loads'):
        learn.load(path)
    assert_unchanged(before, learn)
    learn.load_weights(path)   # the advice
    assert all(torch.equal(a, b) for a, b in zip(learn.model.state_dict().values(),
                                                 source.model.state_dict().values()))
    assert learn.global_step == before['counters'][0]   # weights only


def test_a_file_without_weights_says_where_it_looked(tmp_path):
    torch.save({'epoch': 3, 'note': 'no weights'}, tmp_path / 'x.pt')
    learn = synth_learner()
    with pytest.raises(ValueError, match="nor does it hold model weights \\(under 'model', 'state_dict'"):
        learn.load(tmp_path / 'x.pt')
    with pytest.raises(ValueError, match="holds no model weights \\(it has \\['epoch', 'note'\\]"):
        learn.load_weights(tmp_path / 'x.pt')


def test_the_advice_of_a_load_with_a_missing_subscriber_works(tmp_path):
    source = synth_learner(subs=[Counter()])
    source.fit(1)
    path = source.save(tmp_path / 'c.pt')
    learn = synth_learner()
    with pytest.raises(ValueError, match=r"add them \(Counter\(\.\.\.\)\) to continue the run exactly"):
        learn.load(path)
    learn.add_subs(Counter())   # the advice
    learn.load(path)
    learn.fit(1, resume=True)
    with pytest.raises(ValueError, match='To start from its weights only: learn.load_weights'):
        synth_learner().load(path)
    other = synth_learner()
    other.load_weights(path)   # the other advice of the same message
    assert torch.equal(other.model.weight, source.model.weight)


def test_resume_advice_works(tmp_path):
    learn = synth_learner()
    with pytest.raises(ValueError, match=r'needs a state loaded with learn.load\(path\) first'): learn.fit(1, resume=True)
    learn.fit(2, subs=[_StopAt(3)])
    path = learn.save(tmp_path / 's.pt')
    learn.load(path)
    with pytest.raises(ValueError, match=r'resume it with fit\(2, resume=True\)'): learn.fit(3, resume=True)
    with pytest.raises(ValueError, match='no lr or reset_opt'): learn.fit(2, resume=True, lr=0.1)
    learn.fit(2, resume=True)
    assert learn.global_step == 8


def test_auto_resume_advice_works(tmp_path):
    learn = synth_learner(subs=[CheckpointS(tmp_path, every=1)])
    learn.fit(2, subs=[_StopAt(3)])
    again = synth_learner(subs=[CheckpointS(tmp_path, every=1)])
    with pytest.raises(ValueError, match=r'resume it with fit\(2, resume="auto"\), or start a new fit in another'):
        again.fit(3, resume='auto')
    assert again.global_step == 0 and again.run_id != learn.run_id   # nothing was loaded
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        again.fit(2, resume='auto')   # the first advice
    assert again.global_step == 8
    other = synth_learner(subs=[CheckpointS(tmp_path / 'other', every=1)])
    other.fit(3, resume='auto')   # the second advice: a new fit in another folder
    assert other.global_step == 12


class _StopAt(Subscriber):
    def __init__(self, n): self.n = n
    def after_step(self, learn):
        if learn.global_step == self.n: raise CancelFitException()


def test_monitor_advice_works(tmp_path):
    learn = tiny_classifier(subs=[MetricsS()])
    with pytest.raises(KeyError, match='or pass monitor=None'): learn.fit(1, subs=[CheckpointS(tmp_path, monitor='acc')])
    learn.fit(1, subs=[CheckpointS(tmp_path / 'b', monitor=None)])   # the advice
    from torcheval.metrics import MulticlassAccuracy
    learn.fit(1, subs=[MetricsS(acc=MulticlassAccuracy()), EarlyStoppingS('acc', mode='max')])   # add the metric
    with pytest.raises(KeyError, match='add the metric to MetricsS'): learn.fit(1, subs=[EarlyStoppingS('accuracy')])


def test_metric_transform_advice_works():
    "Token scores (B, T, V): a metric that wants (N, C) says to give it a transform (flat_tokens()), which works."
    from torcheval.metrics import MulticlassAccuracy
    from nntrain.subs.metrics import flat_tokens
    x, y = torch.randn(16, 5, 4), torch.randint(0, 3, (16, 5))
    learn = Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, y, x, y, batch_size=8),
                    lambda p, t: F.cross_entropy(p.transpose(1, 2), t), lr=0.1)
    with pytest.raises(ValueError, match=r'Give it a transform: MetricsS\(acc=\(metric, transform\)\), e.g. '
                                         r'on_preds\(torch.sigmoid\) or flat_tokens\(\)'):
        learn.fit(1, subs=[MetricsS(acc=MulticlassAccuracy())])
    learn.fit(1, subs=[MetricsS(acc=(MulticlassAccuracy(), flat_tokens()))])
    assert 0 <= learn.history[-1]['acc'] <= 1
    assert on_preds(torch.sigmoid)(torch.zeros(2), torch.ones(2))[0].eq(0.5).all()


def test_fp16_with_a_step_provider_advice_works():
    class Step(Subscriber):
        def step(self, learn): learn.opt.step()
    learn = tiny_classifier()
    if not hasattr(torch.amp, 'GradScaler'): pytest.skip('torch without torch.amp.GradScaler')
    with pytest.raises(ValueError, match='use bf16'): learn.fit(1, subs=[MixedPrecisionS('fp16'), Step()])
    learn.fit(1, subs=[MixedPrecisionS('bf16'), Step()])


def test_mixing_without_a_loss_func_advice_works():
    learn = tiny_classifier()
    learn.loss_func = None
    learn.model = nn.Sequential(learn.model, _OwnLoss())
    with pytest.raises(ValueError, match='give the learner a loss_func'): learn.fit(1, subs=[MixUpS()])
    learn.model, learn.loss_func = learn.model[0], F.cross_entropy
    learn.fit(1, subs=[MixUpS()])


class _OwnLoss(nn.Module):
    def forward(self, x): return SimpleNamespace(logits=x, loss=x.mean())


def test_tta_and_augment_advice_works():
    learn = tiny_classifier(images=True)
    with pytest.raises(ValueError, match='or an AugmentS subscriber'): learn.tta()
    with pytest.raises(ValueError, match=r'learn.tta\(transform=...\)'): AugmentS(lambda x: x, on_train=False)
    preds, _ = learn.tta(transform=lambda x: x.flip(-1))   # the advice
    learn.add_subs(AugmentS(lambda x: x.flip(-1)))
    assert torch.allclose(learn.tta()[0], preds)


def test_freeze_advice_works():
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    dls = DataLoaders.from_tensors(x, y, x, y, batch_size=8)
    one = Learner(nn.Sequential(nn.Linear(4, 3)), dls, splitter=lambda m: [list(m.parameters())])
    before = full_state(one)
    with pytest.raises(ValueError, match='leaves nothing frozen: the model has 1 parameter group'): one.freeze()
    assert_unchanged(before, one)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    split = Learner(model, dls, splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())])   # the advice
    assert split.freeze().frozen_groups() == [True, False]
    with pytest.raises(ValueError, match='Pass splitter=f'): Learner(nn.Linear(4, 3), dls).freeze()


def test_the_iterator_advice_works():
    batches = list(synth_dls().train)
    class Stream:
        def __init__(self): self.it = iter(batches)
        def __len__(self): return len(batches)
        def __iter__(self): return self
        def __next__(self): return next(self.it)
    learn = synth_learner()
    learn.dls.train = Stream()
    before = full_state(learn)
    with pytest.raises(TypeError, match='which can be iterated only once.*e.g. a list of batches'): learn.fit(2)
    assert_unchanged(before, learn)
    learn.dls.train = batches   # the advice
    learn.fit(2)
    assert learn.global_step == 8


# -- error-location notes: the batch being fetched or run, the current position, never a stale one ------------------
class _Failing:
    "A loader whose batch `at` cannot be read."
    def __init__(self, batches, at): self.batches, self.at = batches, at
    def __len__(self): return len(self.batches)
    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.at: raise OSError('unreadable')
            yield b


def _note(call) -> str:
    with pytest.raises(Exception) as e: call()
    return [n for n in e.value.__notes__ if n.startswith('nntrain: stopped')][-1]


def test_error_notes_name_the_batch_being_fetched_and_the_position():
    learn = synth_learner()
    learn.fit(1)
    learn.dls.train = _Failing(list(synth_dls().train), 2)
    assert _note(lambda: learn.fit(2)) == ('nntrain: stopped while fetching train batch 2 (of 4) of epoch 0 of 2; a '
                                           'checkpoint now resumes at epoch 0, train pass, after 2 batches')
    learn.dls.train = _Failing(list(synth_dls().train), 0)
    assert 'while fetching train batch 0 (of 4) of epoch 0 of 1; a checkpoint now resumes at epoch 0, train pass, ' \
           'after 0 batches' in _note(lambda: learn.fit(1))
    # the last batch's fetch happens before it runs (the loader is asked past it then): still named as the last's
    learn.dls.train = _Failing(list(synth_dls().train), 4)
    learn.dls.train.__len__ = None
    class FourBatches(_Failing):
        def __len__(self): return 4
    learn.dls.train = FourBatches(list(synth_dls().train) + list(synth_dls().train)[:1], 4)
    assert 'while fetching train batch 4 (of 4)' in _note(lambda: learn.fit(1))


def test_error_notes_name_the_pass_and_the_kind_of_run_never_a_stale_one():
    class Raise(Subscriber):
        def __init__(self, event, when=lambda learn: True):
            self.when = when
            setattr(self, event, self.go)
        def go(self, learn):
            if self.when(learn): raise RuntimeError('x')
    learn = synth_learner()
    learn.fit(2)
    assert _note(lambda: learn.fit(1, subs=[Raise('before_fit')])) == \
        'nntrain: stopped at the start of the fit; a checkpoint now resumes at epoch 0, train pass, after 0 batches'
    assert 'at the end of the valid pass of epoch 1 of 2; a checkpoint now resumes at epoch 2, train pass' in \
        _note(lambda: learn.fit(2, subs=[Raise('after_epoch', lambda l: l.epoch == 1 and not l.training)]))
    assert 'at the start of the train pass of epoch 1 of 3' in \
        _note(lambda: learn.fit(3, subs=[Raise('before_epoch', lambda l: l.epoch == 1)]))
    assert _note(lambda: learn.fit(1, subs=[Raise('after_fit')])) == \
        'nntrain: stopped at the end of the fit; a checkpoint now resumes at epoch 1, train pass, after 0 batches'
    # a validation after a failed fit names its own batch, not the fit's epoch or position
    raising = Raise('after_batch', lambda l: l.run_kind == 'validate')
    learn.add_subs(raising)
    assert _note(lambda: learn.validate()) == 'nntrain: stopped in valid batch 0 (of 1) (validate)'
    learn.remove_subs(raising)
    assert _note(lambda: learn.validate(_Failing([(torch.zeros(2, 1), torch.zeros(2, 1))] * 3, 1))) == \
        'nntrain: stopped while fetching valid batch 1 (of 3) (validate)'
    assert 'while fetching valid batch 0 (of 1) (predict)' in _note(lambda: learn.get_preds(_Failing([None], 0)))


# -- rule 8: nothing is silently a no-op ----------------------------------------------------------------------------
def test_a_used_up_loader_is_an_error_and_a_short_one_a_warning():
    batches = list(synth_dls().train)
    class Shared:
        "An iterable whose iterator is shared between passes."
        def __init__(self): self.it = iter(batches)
        def __len__(self): return len(batches)
        def __iter__(self): return self.it
    learn = synth_learner()
    learn.dls.train = Shared()
    with pytest.raises(ValueError, match='the training loader yielded no batch though its len\\(\\) is 4') as e:
        learn.fit(3)   # epoch 1 finds nothing: issue 18's "takes one epoch of steps and logs nothing"
    assert 'while fetching train batch 0 (of 4) of epoch 1 of 3' in e.value.__notes__[-1]
    assert learn.global_step == 4 and len(learn.history) == 2
    class Short:
        def __len__(self): return 6
        def __iter__(self): return iter(batches)
    learn.dls.train = Short()
    with pytest.warns(RuntimeWarning, match='yielded 4 batches though its len\\(\\) is 6'): learn.fit(1)


def test_fit_with_no_batches_is_refused():
    learn = synth_learner()
    with pytest.raises(ValueError, match='n_batches must be an int >= 1'): learn.fit(1, n_batches=0)
    learn.dls.train = []
    with pytest.raises(ValueError, match='the training loader is empty'): learn.fit(1)


def test_an_empty_class_folder_is_refused_as_torchvision_does(tmp_path):
    for split in ('train', 'val'):
        for c in ('cat', 'dog'):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new('RGB', (4, 4)).save(tmp_path / split / c / '0.png')
    (tmp_path / 'train' / 'emu').mkdir()   # a class with no image
    (tmp_path / 'train' / 'emu' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\] hold no image"):
        DataLoaders.from_folder(tmp_path, num_workers=0)
    (tmp_path / 'val' / 'emu').mkdir()
    Image.new('RGB', (4, 4)).save(tmp_path / 'train' / 'emu' / '0.png')
    with pytest.raises(ValueError, match=r"val: class folder\(s\) \['emu'\] hold no image"):
        DataLoaders.from_folder(tmp_path, num_workers=0)
    Image.new('RGB', (4, 4)).save(tmp_path / 'val' / 'emu' / '0.png')   # the advice: add images
    assert DataLoaders.from_folder(tmp_path, num_workers=0).vocab == ['cat', 'dog', 'emu']


@pytest.mark.parametrize('make, message', [
    (lambda: AugmentS(lambda x: x, on_train=False), 'would augment no batch'),
    (lambda: EMAS(decay=1.0), 'decay must be a finite number in (0, 1), got 1.0'),
    (lambda: EMAS(decay=0.0), 'decay must be a finite number in (0, 1), got 0.0'),
])
def test_subscribers_whose_flags_would_do_nothing_are_refused(make, message):
    with pytest.raises(ValueError) as e: make()
    assert message in str(e.value)


def test_subscribers_that_cannot_act_in_this_fit_say_so(tmp_path):
    learn = tiny_classifier(subs=[MetricsS()])
    with pytest.warns(RuntimeWarning, match='EarlyStoppingS watches the valid rows, but this fit makes no valid pass'):
        learn.fit(1, valid=False, subs=[EarlyStoppingS()])
    with pytest.warns(RuntimeWarning, match='EarlyStoppingS watches the train rows'):
        learn.fit(1, train=False, subs=[EarlyStoppingS(phase='train')])
    with pytest.warns(RuntimeWarning, match='best.pt is not written'):
        learn.fit(1, valid=False, subs=[CheckpointS(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.fit(1, valid=False, subs=[CheckpointS(tmp_path / 'b', monitor=None)])   # as the warning says


def test_a_complete_fit_resumed_says_so(tmp_path):
    learn = synth_learner()
    learn.fit(1)
    path = learn.save(tmp_path / 'done.pt')
    learn.load(path)
    with pytest.warns(RuntimeWarning, match='nothing left to do'): learn.fit(1, resume=True)


def test_resume_auto_without_a_checkpointing_subscriber_says_so(tmp_path):
    learn = synth_learner()
    with pytest.warns(RuntimeWarning, match="no subscriber keeps checkpoints to resume from \\(e.g. CheckpointS\\)"):
        learn.fit(1, resume='auto')
    assert learn.global_step == 4
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        synth_learner(subs=[CheckpointS(tmp_path)]).fit(1, resume='auto')   # as it says
