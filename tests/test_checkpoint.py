"Checkpoints and exact resume, early stopping, CSV logging."
import csv
import os
import signal
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.augment import MixUpS
from nntrain.subs.checkpoint import CheckpointS, checkpoints, latest_checkpoint
from nntrain.subs.metrics import MetricsS
from nntrain.subs.schedule import SchedulerS
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS, GradAccumS
from nntrain.testing import same_weights


@pytest.fixture(autouse=True)
def sigint_raises():
    "These tests press Ctrl-C with a real SIGINT: let it arrive even where the runner was started with SIGINT ignored."
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # as `cmd &` from a script leaves it
    yield
    signal.signal(signal.SIGINT, previous)


def make_learner(*subs, n=96, bs=8):
    "The same run every time it is called, as a script started twice would be."
    set_seed(0)
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    dls = DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], batch_size=bs)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    return Learner(model, dls, F.cross_entropy, torch.optim.AdamW, 1e-2, [MetricsS(), *subs])


class Crash(Subscriber):
    "Presses Ctrl-C (a real SIGINT) right after optimizer step `at`, before the other subscribers' after_step."
    order = -100
    def __init__(self, at): self.at = at
    def after_step(self, learn):
        if learn.global_step == self.at: os.kill(os.getpid(), signal.SIGINT)


extra_subs = {
    'plain': lambda: [],
    'one-cycle SchedulerS': lambda: [SchedulerS(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05,
                                                        total_steps=24))],
    'MixUpS': lambda: [MixUpS(0.4)],
    'EMAS': lambda: [EMAS(0.9)],
    'GradAccumS': lambda: [GradAccumS(2)],
}


@pytest.mark.parametrize('kind', sorted(extra_subs))
@pytest.mark.parametrize('crash_at', [5, 8, 13])    # mid-epoch, at an epoch boundary, mid-epoch later
def test_resume_is_exact(tmp_path, kind, crash_at):
    n_epochs = 3
    if kind == 'GradAccumS': crash_at = {5: 2, 8: 4, 13: 7}[crash_at]     # it steps every other batch
    reference = make_learner(*extra_subs[kind]())
    reference.fit(n_epochs)

    first = make_learner(*extra_subs[kind](), CheckpointS(tmp_path, every=1))
    with pytest.raises(KeyboardInterrupt, match='stopped by Ctrl-C'):
        first.fit(n_epochs, subs=[Crash(crash_at)])
    resumed = make_learner(*extra_subs[kind](), CheckpointS(tmp_path, every=1))
    resumed.load(latest_checkpoint(tmp_path))
    assert resumed.global_step == crash_at
    resumed.fit(n_epochs, resume=True)
    assert resumed.global_step == reference.global_step
    assert same_weights(resumed, reference)
    assert [r['loss'] for r in resumed.history if r['phase'] == 'valid'] == \
           [r['loss'] for r in reference.history if r['phase'] == 'valid']


def test_checkpoint_files_rotation_best_and_weights_only(tmp_path):
    ck = CheckpointS(tmp_path, every='epoch', keep=2)
    learn = make_learner(ck)
    learn.fit(4)
    run = tmp_path / learn.run_id   # each run writes in its own folder
    assert ck.run_dir == run and [p.name for p in tmp_path.iterdir()] == [learn.run_id]
    assert [p.name for p in checkpoints(tmp_path)] == ['step-24.pt', 'step-32.pt'] == [p.name for p in checkpoints(run)]
    assert (run / 'best.pt').exists() and not (run / 'interrupted.pt').exists()
    assert not [p for p in run.iterdir() if p.name.endswith('.tmp')]
    state = torch.load(run / 'step-32.pt', weights_only=True)   # plain tensors and containers only
    assert state['counters']['global_step'] == 32 and len(state['history']) == 8 and state['run_id'] == learn.run_id
    best = torch.load(run / 'best.pt', weights_only=True)
    valid = [r['loss'] for r in best['history'] if r['phase'] == 'valid']
    assert valid[-1] == min(r['loss'] for r in learn.history if r['phase'] == 'valid')


def test_loading_into_a_learner_without_a_subscriber_is_an_error(tmp_path):
    learn = make_learner(MixUpS(0.4))
    learn.fit(1)
    learn.save(tmp_path / 'run.pt')
    with pytest.raises(ValueError, match='lacks'):
        make_learner().load(tmp_path / 'run.pt')


def test_resume_needs_a_load():
    "Resuming with another length is refused in 40_checkpoint's demonstration."
    with pytest.raises(ValueError, match='load'):
        make_learner().fit(2, resume=True)


def test_validate_between_load_and_resume_keeps_the_position(tmp_path):
    reference = make_learner()
    reference.fit(2)
    first = make_learner(CheckpointS(tmp_path, every=1))
    with pytest.raises(KeyboardInterrupt, match='stopped by Ctrl-C'):
        first.fit(2, subs=[Crash(6)])
    resumed = make_learner(CheckpointS(tmp_path, every=1)).load(latest_checkpoint(tmp_path))
    resumed.validate()
    resumed.get_preds()
    resumed.fit(2, resume=True)
    assert same_weights(resumed, reference)


def test_validate_between_load_and_resume_keeps_the_phase_metrics(tmp_path):
    "A loaded mid-phase metric state waits for the fit that resumes it: the row covers the whole phase."
    import warnings
    with warnings.catch_warnings():   # torcheval's import warns about torch.jit.script
        warnings.simplefilter('ignore')
        from torcheval.metrics import MulticlassAccuracy
    metrics = lambda: MetricsS(accuracy=MulticlassAccuracy())
    reference = make_learner(metrics())
    reference.fit(2)
    with pytest.raises(KeyboardInterrupt):
        make_learner(metrics(), CheckpointS(tmp_path, every=1)).fit(2, subs=[Crash(5)])
    resumed = make_learner(metrics(), CheckpointS(tmp_path, every=1)).load(latest_checkpoint(tmp_path))
    resumed.validate()
    resumed.fit(2, resume=True)
    assert [r['accuracy'] for r in resumed.history] == [r['accuracy'] for r in reference.history]


def test_early_stopping_patience_and_restore():
    learn = make_learner()
    stop = EarlyStoppingS(patience=1, restore_best=True, min_delta=10.)   # nothing improves by 10: stop after epoch 1
    learn.fit(10, subs=[stop])
    assert stop.best_epoch == 0 and stop.stopped_epoch == 1
    assert len([r for r in learn.history if r['phase'] == 'valid']) == 2
    assert learn.validate()['loss'] == pytest.approx(stop.best)


def test_early_stopping_max_mode_and_train_phase():
    learn = make_learner()
    stop = EarlyStoppingS(monitor='loss', phase='train', mode='max', patience=2)   # train loss falls: never a max
    learn.fit(10, subs=[stop])
    assert stop.stopped_epoch == 2 and stop.best_epoch == 0


def test_csv_logger_writes_every_row(tmp_path):
    path = tmp_path / 'logs' / 'run.csv'
    learn = make_learner(CSVLoggerS(path))
    learn.fit(2)
    rows = list(csv.DictReader(open(path)))
    assert [(r['epoch'], r['phase']) for r in rows] == [('0', 'train'), ('0', 'valid'), ('1', 'train'), ('1', 'valid')]
    assert float(rows[-1]['loss']) == pytest.approx(learn.history[-1]['loss'])
    learn.fit(1)   # a second fit appends to the same file
    assert len(list(csv.DictReader(open(path)))) == 6


def test_ctrl_c_finishes_the_batch_and_a_second_stops_at_once():
    seen = []
    class Press(Subscriber):
        def __init__(self, times): self.times = times
        def after_loss(self, learn):
            if learn.training and learn.iter == 2:
                for _ in range(self.times): os.kill(os.getpid(), signal.SIGINT)
        def after_batch(self, learn): seen.append((learn.iter, learn.training))
    learn = make_learner()
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match='before batch 3'):
        learn.fit(2, subs=[Press(1)])
    assert seen[-1] == (2, True) and learn.global_step == 3     # batch 2 completed, then the fit stopped
    assert signal.getsignal(signal.SIGINT) is handler           # the previous handler is back
    seen.clear()
    learn = make_learner()
    with pytest.raises(KeyboardInterrupt) as info:
        learn.fit(2, subs=[Press(2)])
    assert not getattr(info.value, 'nntrain_clean_stop', False)           # the second press: no clean stop
    assert seen == [(0, True), (1, True)] and learn.global_step == 2   # stopped inside batch 2: no step
    learn.fit(1)                                                          # and usable again


def test_resume_at_an_epoch_boundary_is_exact_with_a_torch_dataloader(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset
    def make(*subs):
        learn = make_learner(*subs)
        train = learn.dls.train.tensors
        learn.dls.train = DataLoader(TensorDataset(*train), batch_size=8, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))
        return learn
    reference = make()
    reference.fit(3)
    first = make(CheckpointS(tmp_path, every='epoch'))
    with pytest.raises(KeyboardInterrupt, match='stopped by Ctrl-C'):
        first.fit(3, subs=[Crash(16)])        # 8 batches per epoch: the end of epoch 1
    resumed = make(CheckpointS(tmp_path, every='epoch')).load(latest_checkpoint(tmp_path))
    resumed.fit(3, resume=True)
    assert same_weights(resumed, reference)


def test_epoch_checkpoints_in_a_training_only_fit(tmp_path):
    learn = make_learner(CheckpointS(tmp_path, every='epoch', keep=5))
    learn.fit(3, valid=False)
    assert [p.name for p in checkpoints(tmp_path)] == ['step-8.pt', 'step-16.pt', 'step-24.pt']
    state = torch.load(tmp_path / learn.run_id / 'step-16.pt', weights_only=True)
    assert state['counters']['position'] == [2, True, 0]     # resumes at the start of the next epoch
