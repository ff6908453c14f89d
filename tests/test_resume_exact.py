"""Issue 18, rules 1 and 2: exact resume from every checkpoint nntrain writes, and a resume that cannot be exact says so.

Each test runs a fit straight through, then the same fit stopped (Ctrl-C, or an error) and resumed from the latest
exact checkpoint in a fresh learner, as a script started again would; the two must end bit for bit alike: weights,
optimizer state, history rows (times made 0 by a still clock), every subscriber's state and the files they write.
"""
import copy
import os
import signal
import time
import warnings
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from nntrain import run as run_module
from nntrain.core import CancelFitException, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS
from nntrain.subs.checkpoint import CheckpointS, latest_checkpoint
from nntrain.subs.metrics import MetricsS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.precision import MixedPrecisionS
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, one_cycle_scheds
from nntrain.subs.tensorboard import TensorBoardS
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from tests.contract import files_on_disk, same_state


class _StillClock:
    @staticmethod
    def perf_counter() -> float: return 0.


@pytest.fixture(autouse=True)
def still_clock(monkeypatch):
    "Every row's time is 0, so histories and logs compare bit for bit."
    monkeypatch.setattr(run_module, 'time', _StillClock)


class FloatSum:
    "A metric summing predictions in float32: its result depends on how batches are grouped into updates."
    def __init__(self): self.reset()
    def reset(self): self.total = torch.zeros(())
    def update(self, preds, *targets): self.total = self.total + preds.float().sum()
    def compute(self): return self.total
    def state_dict(self): return {'total': self.total}
    def load_state_dict(self, state): self.total = state['total'].clone()


class SampleAtEval(nn.Module):
    "A model that draws random numbers in every forward pass, validation included (e.g. sampling a latent)."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    def forward(self, x): return self.body(x) + 0.1 * torch.randn(len(x), 3)


def make_learner(*subs, model=SampleAtEval, train_dl=None, bs=8, n_train=64, metrics=True, images=False):
    "The same fit every time it is called, as a script started twice would be."
    set_seed(0)
    shape = (3, 4, 4) if images else (6,)
    x, y = torch.randn(96, *shape), torch.randint(0, 3, (96,))
    dls = DataLoaders.from_tensors(x[:n_train], y[:n_train], x[64:], y[64:], batch_size=bs)
    if train_dl is not None: dls.train = train_dl(x[:n_train], y[:n_train])
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), model()) if images else model()
    extra = [MetricsS(acc=MulticlassAccuracy(), total=FloatSum(), flush_every=40)] if metrics else []
    return Learner(net, dls, F.cross_entropy, torch.optim.AdamW, 1e-2, [*extra, *subs])


class CtrlC(Subscriber):
    "Press Ctrl-C (a real SIGINT) once, at `event` when `when(learn)` holds."
    order = -100
    def __init__(self, event, when):
        self.when, self.done = when, False
        setattr(self, event, self._press)
    def _press(self, learn):
        if not self.done and self.when(learn):
            self.done = True
            os.kill(os.getpid(), signal.SIGINT)


class Crash(Subscriber):
    "Raise an error (not a clean stop) at `event` when `when(learn)` holds: interrupted.pt is then not exact."
    order = 99   # after CheckpointS: its checkpoint of the moment is written first
    def __init__(self, event, when):
        self.when = when
        setattr(self, event, self._crash)
    def _crash(self, learn):
        if self.when(learn): raise RuntimeError('crash')


def observed(learn, subs=()) -> dict:
    "What an uninterrupted and a resumed fit must agree on."
    return {'weights': learn.model.state_dict(), 'opt': copy.deepcopy(learn.opt.state_dict()),
            'history': [dict(r) for r in learn.history], 'step': learn.global_step,
            'subs': [s.state_dict() for s in subs if callable(getattr(s, 'state_dict', None))]}


def differences(a: dict, b: dict) -> list:
    return [k for k in a if not same_state(a[k], b[k])]


def stop_and_resume(tmp_path, make, stopper, n_epochs=3, every=1, subs=lambda: [], files=None, pause=0.):
    "Run `make(...)` straight, and stopped by `stopper` then resumed; return both observations (and files, if asked)."
    cwd = os.getcwd()
    try: return _stop_and_resume(tmp_path, make, stopper, n_epochs, every, subs, files, pause)
    finally: os.chdir(cwd)

def _stop_and_resume(tmp_path, make, stopper, n_epochs, every, subs, files, pause):
    (tmp_path / 'straight').mkdir(); (tmp_path / 'stopped').mkdir()
    os.chdir(tmp_path / 'straight')
    set_seed(1)   # subscribers seeded from torch's generator (MixUpS, CutMixS) start alike in both runs
    straight_subs = subs()
    straight = make(*straight_subs, CheckpointS('ck', every=every))
    straight.run_id = 'run'   # the same run id: files and checkpoints compare bit for bit
    straight.fit(n_epochs)
    os.chdir(tmp_path / 'stopped')
    set_seed(1)
    first = make(*subs(), CheckpointS('ck', every=every))
    first.run_id = 'run'
    try: first.fit(n_epochs, subs=[stopper])   # a Ctrl-C, an error, or a subscriber's CancelFitException
    except (KeyboardInterrupt, RuntimeError): pass
    assert first.global_step < straight.global_step, 'the stopper did not stop the fit'
    path = latest_checkpoint('ck').resolve()
    saved = SimpleNamespace(name=path.name, state=torch.load(path, weights_only=True))   # before rotation deletes it
    time.sleep(pause)   # TensorBoard reads a folder's event files in the order of their names, which hold the second
    resumed_subs = subs()
    resumed = make(*resumed_subs, CheckpointS('ck', every=every))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the stopper is a subscriber the resumed fit lacks: it says so
        resumed.load(path)
        assert resumed.run_id == 'run'   # the checkpoint's run goes on
        resumed.fit(n_epochs, resume=True)
    a, b = observed(straight, straight_subs), observed(resumed, resumed_subs)
    if files is not None:
        a['files'], b['files'] = (files(tmp_path / d) for d in ('straight', 'stopped'))
    return a, b, saved


# -- rule 1: the examples ---------------------------------------------------------------------------------------
def test_an_epoch_end_checkpoint_resumes_without_a_duplicate_row_with_a_model_that_samples_at_eval(tmp_path):
    "Crash just after the checkpoint of epoch 1 (written when epoch 2 starts): no valid pass runs twice."
    stopper = Crash('before_epoch', lambda learn: learn.epoch == 2 and learn.training)
    a, b, saved = stop_and_resume(tmp_path, make_learner, stopper, every='epoch')
    assert saved.name == 'step-16.pt'   # interrupted.pt, written after an error, is not exact: skipped
    assert differences(a, b) == [] and len(b['history']) == 6
    assert [(r['epoch'], r['phase']) for r in b['history']] == [(e, p) for e in range(3) for p in ('train', 'valid')]


@pytest.mark.parametrize('every', ['epoch', 5])
def test_ctrl_c_at_the_end_of_an_epoch_resumes_exactly_and_keeps_its_best_model(tmp_path, every):
    "The epoch's files are written on the way out: its rotating checkpoint (or interrupted.pt) and best.pt."
    stopper = CtrlC('after_epoch', lambda learn: learn.epoch == 1 and not learn.training)
    a, b, saved = stop_and_resume(tmp_path, make_learner, stopper, every=every, files=_csv_and_checkpoint_names)
    assert saved.name == ('step-16.pt' if every == 'epoch' else 'interrupted.pt') and differences(a, b) == []
    assert 'ck/run/best.pt' in b['files']['ckpt']


@pytest.mark.parametrize('press_at', [1, 4, 9])   # a group's first micro-batch, its second, the epoch's last batch
def test_ctrl_c_in_the_middle_of_a_grad_accum_group_with_dropout_resumes_exactly(tmp_path, press_at):
    "The stop waits for the group's optimizer step; the checkpoint holds that step's position and random state."
    stopper = CtrlC('after_backward', lambda learn: learn.training and learn.epoch == 1 and learn.iter == press_at)
    make = partial(make_learner, model=SampleAtEval, bs=7)   # 10 batches (the last of 1): groups of 3, 3, 3 and 1
    a, b, saved = stop_and_resume(tmp_path, make, stopper, every='epoch', subs=lambda: [GradAccumS(3)])
    assert saved.name == 'interrupted.pt' and differences(a, b) == []
    counters = saved.state['counters']
    assert counters['global_step'] == 4 + {1: 1, 4: 2, 9: 4}[press_at]   # 4 steps an epoch: stopped after the group's
    assert counters['position'] == {1: [1, True, 3], 4: [1, True, 6], 9: [1, False, 0]}[press_at]


@pytest.mark.parametrize('how', ['ctrl-c', 'error after a step checkpoint'])
def test_a_mid_epoch_resume_row_covers_the_whole_epoch_metrics_too(tmp_path, how):
    "The resumed epoch's row: loss and metrics (an exact count and a float sum, flushed in chunks) of all its batches."
    if how == 'ctrl-c': stopper = CtrlC('after_step', lambda learn: learn.global_step == 13)
    else: stopper = Crash('after_step', lambda learn: learn.global_step == 13)
    a, b, saved = stop_and_resume(tmp_path, make_learner, stopper, every=3)
    assert saved.name == ('interrupted.pt' if how == 'ctrl-c' else 'step-12.pt')
    assert differences(a, b) == []
    assert set(b['history'][2]) == {'epoch', 'phase', 'loss', 'acc', 'total', 'time'}


def test_ctrl_c_during_a_phases_last_batch_waits_for_its_row(tmp_path):
    "The stop comes after after_epoch, so the saved row has its metrics (and early stopping has counted it)."
    stopper = CtrlC('after_step', lambda learn: learn.global_step == 8)   # the last training batch of epoch 0
    a, b, saved = stop_and_resume(tmp_path, make_learner, stopper, every='epoch',
                                 subs=lambda: [EarlyStoppingS(patience=5)])
    assert saved.state['counters']['position'] == [0, False, 0] and 'acc' in saved.state['history'][0]
    assert differences(a, b) == []


# -- rule 1: every subscriber's state, and the files of those that write ------------------------------------------
def _scalars(folder):
    "TensorBoard's view of each run folder under `folder`: tag -> [(step, value)] (wall times left out)."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for d in sorted(p for p in folder.rglob('*') if p.is_dir() and any(f.name.startswith('events') for f in p.iterdir())):
        ev = EventAccumulator(str(d), size_guidance={'scalars': 0}).Reload()
        out[d.name] = {t: [(e.step, e.value) for e in ev.Scalars(t)] for t in ev.Tags()['scalars']}
    return out


def _csv_and_checkpoint_names(folder):
    files = files_on_disk(folder)
    # the stopped run's interrupted.pt stays beside the resumed run's later files (it is older: never picked again)
    return {'csv': files.get('log.csv'), 'ckpt': sorted(k for k in files if k.startswith('ck/') and 'interrupted' not in k)}


SUBS = {
    'EarlyStoppingS': (lambda: [EarlyStoppingS(patience=1, restore_best=True, min_delta=1e-4)], None),
    'ParamSchedulerS': (lambda: [ParamSchedulerS(one_cycle_scheds(0.05))], None),
    'SchedulerS': (lambda: [SchedulerS(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05, total_steps=24))],
                   None),
    'EMAS': (lambda: [EMAS(0.9)], None),
    'MixUpS': (lambda: [MixUpS(0.4)], None),
    'AugmentS': (lambda: [AugmentS(lambda x: x + 0.1 * torch.randn_like(x), on_valid=True)], None),
    'TerminateOnNaNS': (lambda: [TerminateOnNaNS(check_every=3)], None),
    'NormalizationS': (lambda: [NormalizationS()], None),
    'MixedPrecisionS': (lambda: [MixedPrecisionS('bf16')], None),
    'MixedPrecisionS+fp16': (lambda: [MixedPrecisionS('fp16')], None),   # the gradient scaler's state
    'GradClipS+GradAccumS': (lambda: [GradClipS(0.5), GradAccumS(2)], None),
    'CSVLoggerS': (lambda: [CSVLoggerS('log.csv')], _csv_and_checkpoint_names),
    'TensorBoardS': (lambda: [TensorBoardS('tb')], _scalars),
}


@pytest.mark.parametrize('stop', ['mid-epoch', 'epoch end'])
@pytest.mark.parametrize('name', sorted(SUBS))
def test_every_subscribers_state_resumes_exactly(tmp_path, name, stop):
    if name == 'TensorBoardS': pytest.importorskip('tensorboard')
    subs, files = SUBS[name]
    when = (lambda learn: learn.global_step == 11) if stop == 'mid-epoch' else \
           (lambda learn: learn.epoch == 0 and not learn.training)
    stopper = CtrlC('after_step' if stop == 'mid-epoch' else 'after_epoch', when)
    a, b, _ = stop_and_resume(tmp_path, make_learner, stopper, every=1, subs=subs, files=files,
                              pause=1.1 if name == 'TensorBoardS' else 0.)
    assert differences(a, b) == []


def test_cutmix_resumes_exactly(tmp_path):
    stopper = CtrlC('after_step', lambda learn: learn.global_step == 11)
    a, b, _ = stop_and_resume(tmp_path, partial(make_learner, images=True, model=SampleAtEval), stopper,
                              subs=lambda: [CutMixS()])
    assert differences(a, b) == []


# -- rule 1 (and 2): loaders that draw their order when an epoch starts -------------------------------------------
LOADERS = {
    'DataLoader with a generator': lambda x, y: DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                                                           generator=torch.Generator().manual_seed(0)),
    'DataLoader without a generator': lambda x, y: DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
    'a list of batches': lambda x, y: [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)],
}


@pytest.mark.parametrize('stop', ['mid-epoch', 'epoch end', 'last batch checkpoint'])
@pytest.mark.parametrize('loader', sorted(LOADERS) + ['TensorLoader'])
def test_loaders_resume_exactly_from_any_position(tmp_path, loader, stop):
    "Mid-epoch, the loader starts again from the random and loader states its epoch started from: the same order."
    at = {'mid-epoch': 13, 'epoch end': 16, 'last batch checkpoint': 16}[stop]
    # the last: an error just after the step checkpoint of a pass's last batch (all its batches done, no row yet)
    stopper = (Crash('after_batch', lambda learn: learn.training and learn.global_step == at) if 'checkpoint' in stop
               else CtrlC('after_step', lambda learn: learn.global_step == at))
    make = partial(make_learner, train_dl=LOADERS.get(loader))
    a, b, saved = stop_and_resume(tmp_path, make, stopper)
    position = saved.state['counters']['position']
    assert position == {'mid-epoch': [1, True, 5], 'epoch end': [1, False, 0], 'last batch checkpoint': [1, True, 8]}[stop]
    assert differences(a, b) == []


def test_a_resume_in_a_process_whose_random_state_moved_is_still_exact(tmp_path):
    "The order of a loader without a generator comes from the checkpoint, not from whatever the process drew before."
    def make(*subs):
        learn = make_learner(*subs, train_dl=LOADERS['DataLoader without a generator'])
        torch.rand(5)   # this script draws more random numbers before fitting than the one that was stopped
        return learn
    stopper = CtrlC('after_step', lambda learn: learn.global_step == 21)
    a, b, _ = stop_and_resume(tmp_path, make, stopper)
    assert differences(a, b) == []


# -- rule 2: a resume that cannot be exact says so, and a refused one changes nothing ----------------------------------
def _checkpoint_mid_epoch(tmp_path, **fit_kwargs):
    learn = make_learner(CheckpointS(tmp_path, every=1))
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, subs=[CtrlC('after_step', lambda learn: learn.global_step == 5)], **fit_kwargs)
    return latest_checkpoint(tmp_path)


def _same_learner(a: Learner, b: Learner) -> bool:
    return same_state(observed(a), observed(b)) and a.run_id == b.run_id


@pytest.mark.parametrize('change, message', [
    (dict(bs=16), 'taken mid-epoch with a train loader of 8 batches of 8; this one has 4 batches of 16'),
    (dict(n_train=48), 'this one has 6 batches of 8'),
])
def test_a_mid_epoch_resume_with_another_training_set_is_refused_and_changes_nothing(tmp_path, change, message):
    path = _checkpoint_mid_epoch(tmp_path)
    learn = make_learner(CheckpointS(tmp_path, every=1), **change)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.load(path)
    before = copy.deepcopy(observed(learn))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='taken mid-epoch') as e: learn.fit(3, resume=True)
    assert message in str(e.value)
    assert same_state(before, observed(learn))


def test_an_epoch_boundary_resume_with_another_training_set_warns(tmp_path):
    learn = make_learner(CheckpointS(tmp_path, every='epoch'))
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, subs=[CtrlC('after_epoch', lambda learn: not learn.training)])
    other = make_learner(CheckpointS(tmp_path, every='epoch'), bs=16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        other.load(latest_checkpoint(tmp_path))
    with pytest.warns(RuntimeWarning, match='another number of steps'): other.fit(2, resume=True)
    assert other.global_step == 8 + 4


@pytest.mark.parametrize('saved, resumed, message', [
    (dict(n_batches=3), dict(), 'taken in a fit with n_batches=3; resume it with fit(3, resume=True, n_batches=3)'),
    (dict(), dict(n_batches=3), 'taken in a fit with n_batches=None'),
    (dict(valid=False), dict(), 'making training passes; this one makes training passes and validation passes: '
                                'resume it as it was, fit(3, resume=True, train=True, valid=False)'),
    (dict(), dict(valid=False), 'resume it as it was, fit(3, resume=True, train=True, valid=True)'),
])
def test_a_resume_of_another_kind_of_fit_is_refused_and_changes_nothing(tmp_path, saved, resumed, message):
    path = _checkpoint_mid_epoch(tmp_path, **saved)
    learn = make_learner(CheckpointS(tmp_path, every=1))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.load(path)
    before = copy.deepcopy(observed(learn))
    with pytest.raises(ValueError) as e: learn.fit(3, resume=True, **resumed)
    assert message in str(e.value)
    assert same_state(before, observed(learn))
    learn.fit(3, resume=True, **saved)   # the advice works: the loaded state was kept


def test_a_resume_with_other_subscribers_says_which(tmp_path):
    learn = make_learner(GradClipS(0.5))
    learn.fit(1, subs=[EMAS(0.9)])
    path = learn.save(tmp_path / 'a.pt')
    other = make_learner(GradClipS(0.5), EMAS(0.9), TerminateOnNaNS())
    other.load(path)
    with pytest.warns(RuntimeWarning, match=r"this learner has \['TerminateOnNaNS'\], the checkpoint's fit did not"):
        other.fit(1, resume=True)
    lacking = make_learner()
    lacking.add_subs(EMAS(0.9))
    lacking.load(path)
    with pytest.warns(RuntimeWarning, match=r"the checkpoint's fit had \['GradClipS'\], this learner lacks them"):
        lacking.fit(1, resume=True)


def test_resuming_a_complete_fit_says_there_is_nothing_to_do(tmp_path):
    learn = make_learner(CheckpointS(tmp_path))
    learn.fit(2)
    again = make_learner(CheckpointS(tmp_path))
    with pytest.warns(RuntimeWarning, match='is complete: resuming it has nothing left to do'):
        again.fit(2, resume='auto')
    assert again.global_step == learn.global_step and same_state(observed(again)['weights'], observed(learn)['weights'])
    again.fit(1)   # the advice: a new fit from these weights
    assert again.global_step == learn.global_step + 8


def test_a_checkpoint_holds_the_phase_start_and_is_plain_data(tmp_path):
    "A mid-phase checkpoint holds the random and loader states its phase started from; it loads with weights_only."
    path = _checkpoint_mid_epoch(tmp_path)
    state = torch.load(path, weights_only=True)
    assert state['format'] == 3 and state['counters']['position'] == [0, True, 5]
    assert set(state['phase']['start']) == {'rng', 'loader'} and len(state['phase']['loss']['sizes']) == 5
    fit = state['counters']['fit']
    assert fit['n_batches'] is None and fit['phases'] == [True, False]
    assert sorted(fit['subs']) == ['CheckpointS', 'CtrlC', 'MetricsS']
    assert state['subs']['MetricsS']['buffers'][0]['preds'].shape == (8, 3)   # 40 elements flush: 8 x 3 waiting


def test_cancel_fit_between_epochs_then_resume_is_exact(tmp_path):
    "A subscriber stopping the fit (CancelFitException) after an epoch: the epoch checkpoint is written on the way out."
    class StopAfter(Subscriber):
        order = 99
        def after_epoch(self, learn):
            if learn.epoch == 1 and not learn.training: raise CancelFitException()
    a, b, saved = stop_and_resume(tmp_path, make_learner, StopAfter(), every='epoch')
    assert saved.name == 'step-16.pt' and differences(a, b) == []
