"""Issue 18, rule 3: no run can delete or take another run's files.

Checkpoints, CSV logs and TensorBoard event files know which run wrote them (`learn.run_id`, kept by checkpoints: a
resumed fit goes on as the run it continues); rotation and `latest_checkpoint` look only at one run's files, and a log
shared by several runs keeps every row and every column of each.
"""
import csv
import os
import warnings

import pytest
import torch

from nntrain.core import Subscriber, new_run_id, set_seed
from nntrain.subs.checkpoint import CheckpointS, checkpoints, is_exact, latest_checkpoint, run_folders
from nntrain.subs.metrics import MetricsS
from nntrain.subs.tracking import CSVLoggerS
from nntrain.testing import tiny_classifier
from tests.contract import files_on_disk, same_state


def learner(*subs, run_id=None):
    set_seed(0)
    learn = tiny_classifier(subs=[MetricsS(), *subs])   # 3 training batches an epoch
    if run_id is not None: learn.run_id = run_id
    return learn


class Crash(Subscriber):
    "An error after optimizer step `at` (after the step's checkpoint): interrupted.pt is written, not exact."
    order = 99
    def __init__(self, at): self.at = at
    def after_batch(self, learn):
        if learn.training and learn.global_step == self.at: raise RuntimeError('crash')


def test_a_second_run_in_the_same_folder_deletes_nothing_and_is_the_latest(tmp_path):
    "Issue 18's example: run B's first checkpoint was deleted at once by rotation, and `latest` returned run A's."
    a = learner(CheckpointS(tmp_path, every=1, keep=2), run_id='a')
    a.fit(3)
    files_a = files_on_disk(tmp_path / 'a')
    assert sorted(files_a) == ['best.pt', 'step-8.pt', 'step-9.pt']
    b = learner(CheckpointS(tmp_path, every=1, keep=2), run_id='b')
    b.fit(1)
    assert files_on_disk(tmp_path / 'a') == files_a                       # run A's files, byte for byte
    assert [p.name for p in checkpoints(tmp_path / 'b')] == ['step-2.pt', 'step-3.pt']   # B's own rotation
    assert latest_checkpoint(tmp_path) == tmp_path / 'b' / 'step-3.pt'   # the run written to last
    assert latest_checkpoint(tmp_path, run_id='a') == tmp_path / 'a' / 'step-9.pt'
    assert [p.name for p in checkpoints(tmp_path, run_id='a')] == ['step-8.pt', 'step-9.pt']
    assert run_folders(tmp_path) == [tmp_path / 'a', tmp_path / 'b']
    assert torch.load(tmp_path / 'b' / 'step-3.pt', weights_only=True)['run_id'] == 'b'


def test_resume_auto_continues_the_latest_run_in_its_own_folder(tmp_path):
    a = learner(CheckpointS(tmp_path, every=1), run_id='a')
    a.fit(2)
    files_a = files_on_disk(tmp_path / 'a')
    b = learner(CheckpointS(tmp_path, every=1), run_id='b')
    with pytest.raises(RuntimeError, match='crash'): b.fit(2, subs=[Crash(4)])
    assert not is_exact(tmp_path / 'b' / 'interrupted.pt')
    restarted = learner(CheckpointS(tmp_path, every=1))   # a new process: a new run id, until it resumes
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the resumed fit lacks the Crash subscriber: it says so
        restarted.fit(2, resume='auto')
    assert restarted.run_id == 'b' and restarted.global_step == 6
    assert files_on_disk(tmp_path / 'a') == files_a
    assert sorted(p.name for p in (tmp_path).iterdir()) == ['a', 'b']   # nothing written under the new id
    straight = learner(run_id='b')
    straight.fit(2)
    assert same_state(straight.model.state_dict(), restarted.model.state_dict())


def test_the_latest_run_without_an_exact_checkpoint_resumes_nothing_rather_than_another_run(tmp_path):
    a = learner(CheckpointS(tmp_path, every=1), run_id='a')
    a.fit(1)
    b = learner(CheckpointS(tmp_path, every='epoch'), run_id='b')
    with pytest.raises(RuntimeError, match='crash'): b.fit(2, subs=[Crash(1)])   # before B's first epoch checkpoint
    assert [p.name for p in (tmp_path / 'b').iterdir()] == ['interrupted.pt']
    assert latest_checkpoint(tmp_path) is None                        # not run A's: that would continue another run
    assert latest_checkpoint(tmp_path, exact=False) == tmp_path / 'b' / 'interrupted.pt'
    fresh = learner(CheckpointS(tmp_path, every='epoch'))
    fresh.fit(1, resume='auto')                                       # starts fresh, as its own run
    assert fresh.run_id not in ('a', 'b') and (tmp_path / fresh.run_id / 'step-3.pt').exists()


def test_a_checkpoint_carries_its_run_and_only_a_full_load_takes_it(tmp_path):
    a = learner(run_id='a')
    a.fit(1)
    path = a.save(tmp_path / 'a.pt')
    assert torch.load(path, weights_only=True)['run_id'] == 'a'
    other = learner()
    mine = other.run_id
    other.load_weights(path)
    assert other.run_id == mine              # weights only: still its own run
    other.load(path)
    assert other.run_id == 'a'               # its state: it goes on as run a
    broken = learner()
    state = a.state_dict()
    state['subs'] = {'Missing': {}}
    with pytest.raises(ValueError, match='lacks'): broken.load_state_dict(state)
    assert broken.run_id != 'a'              # a refused load leaves the run id too


def test_run_ids_are_checked_and_fresh_ones_differ(monkeypatch):
    learn = learner()
    for bad in ('', '../up', 'a/b', '.hidden', 3, None, 'x' * 101):
        with pytest.raises(ValueError, match='a run id names folders'): learn.run_id = bad
    ids = {new_run_id() for _ in range(20)}
    assert len(ids) == 20
    state = torch.get_rng_state()
    new_run_id()
    assert torch.equal(state, torch.get_rng_state())   # no generator moves
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'abc/123')   # every rank of a torchrun job (and its restarts): one id
    assert new_run_id() == new_run_id() == 'job-abc_123'
    assert learner().run_id == 'job-abc_123'


# -- CSV logs ---------------------------------------------------------------------------------------------------------
def read_rows(path):
    with open(path, newline='') as f: return list(csv.DictReader(f))


def test_a_log_of_another_run_is_refused_unchanged_and_the_advice_works(tmp_path):
    log = tmp_path / 'log.csv'
    learner(CSVLoggerS(log), run_id='a').fit(2)
    before = log.read_bytes()
    b = learner(CSVLoggerS(log), run_id='b')
    weights = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(FileExistsError, match="holds the rows of another run \\('a'; this run is 'b'\\): pass append=True"):
        b.fit(1)
    assert log.read_bytes() == before and b.global_step == 0 and b.history == []
    assert same_state(weights, b.model.state_dict())
    b.remove_subs(*[s for s in b.subs if isinstance(s, CSVLoggerS)])
    b.add_subs(CSVLoggerS(log, append=True))   # the advice
    b.fit(1)
    rows = read_rows(log)
    assert [(r['run'], r['epoch'], r['phase']) for r in rows] == \
        [('a', '0', 'train'), ('a', '0', 'valid'), ('a', '1', 'train'), ('a', '1', 'valid'),
         ('b', '0', 'train'), ('b', '0', 'valid')]


def test_appending_never_drops_a_column_or_a_row(tmp_path):
    from torcheval.metrics import MulticlassAccuracy
    log = tmp_path / 'log.csv'
    log.write_text('epoch,phase,loss,note\n0,valid,1.0,by hand\n')   # a log of an earlier tool: no run ids
    learn = learner(CSVLoggerS(log, append=True), run_id='a')
    learn.fit(1, subs=[MetricsS(acc=MulticlassAccuracy())])   # a column the old log lacks
    learn.fit(1)                                              # rows without it
    rows = read_rows(log)
    assert list(rows[0]) == ['run', 'epoch', 'phase', 'loss', 'note', 'acc', 'time']
    assert rows[0] == {'run': '', 'epoch': '0', 'phase': 'valid', 'loss': '1.0', 'note': 'by hand', 'time': '',
                       'acc': ''}
    assert [r['run'] for r in rows] == [''] + ['a'] * 4
    assert rows[1]['acc'] != '' and rows[4]['acc'] == ''
    assert [float(r['loss']) for r in rows[1:]] == [r['loss'] for r in learn.history]


def test_a_resumed_run_rewrites_its_own_rows_once_and_keeps_the_others(tmp_path):
    log = tmp_path / 'log.csv'
    learner(CSVLoggerS(log), run_id='a').fit(1)
    first = learner(CSVLoggerS(log, append=True), CheckpointS(tmp_path / 'ck', every='epoch'), run_id='b')
    with pytest.raises(RuntimeError, match='crash'): first.fit(3, subs=[Crash(7)])   # epoch 2 crashes, row 1 logged
    assert [r['run'] for r in read_rows(log)].count('b') == 4
    resumed = learner(CSVLoggerS(log, append=True), CheckpointS(tmp_path / 'ck', every='epoch'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        resumed.fit(3, resume='auto')
    rows = read_rows(log)
    assert [(r['run'], r['epoch'], r['phase']) for r in rows] == [('a', '0', 'train'), ('a', '0', 'valid')] + \
        [('b', str(e), p) for e in range(3) for p in ('train', 'valid')]   # no row twice
    assert [float(r['loss']) for r in rows if r['run'] == 'b'] == [r['loss'] for r in resumed.history]


def test_a_file_that_is_not_a_log_is_never_written(tmp_path):
    path = tmp_path / 'data.csv'
    path.write_text('x,y\n1,2\n')
    for append in (False, True):
        learn = learner(CSVLoggerS(path, append=append))
        with pytest.raises(ValueError, match="is not a history log \\(its columns are \\['x', 'y'\\]\\)"): learn.fit(1)
        assert path.read_text() == 'x,y\n1,2\n' and learn.global_step == 0


def test_a_refused_fit_leaves_a_log_and_the_next_run_of_the_same_id_replaces_only_its_rows(tmp_path):
    log = tmp_path / 'log.csv'
    learner(CSVLoggerS(log), run_id='a').fit(1)
    again = learner(CSVLoggerS(log), run_id='a')   # the same run id, e.g. a user naming the run: its own log
    again.fit(2)
    assert [(r['run'], r['epoch']) for r in read_rows(log)] == [('a', '0'), ('a', '0'), ('a', '1'), ('a', '1')]


# -- TensorBoard ------------------------------------------------------------------------------------------------------
def test_each_run_writes_its_own_event_folder(tmp_path):
    pytest.importorskip('tensorboard')
    from nntrain.subs.tensorboard import TensorBoardS
    learner(TensorBoardS(tmp_path), run_id='a').fit(1)
    events_a = files_on_disk(tmp_path / 'a')
    learner(TensorBoardS(tmp_path), run_id='b').fit(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'b'] and files_on_disk(tmp_path / 'a') == events_a


def test_a_resumed_run_has_tensorboard_hide_its_crashed_tail(tmp_path):
    "Events the crashed run wrote after its checkpoint are purged: TensorBoard shows each step once."
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from nntrain.subs.tensorboard import TensorBoardS
    first = learner(TensorBoardS(tmp_path / 'tb'), CheckpointS(tmp_path / 'ck', every='epoch'), run_id='r')
    with pytest.raises(RuntimeError, match='crash'): first.fit(3, subs=[Crash(8)])   # epoch 2; checkpoint: step 6
    import time
    time.sleep(1.1)   # event files are read in the order of their names, which hold the second they were made
    resumed = learner(TensorBoardS(tmp_path / 'tb'), CheckpointS(tmp_path / 'ck', every='epoch'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        resumed.fit(3, resume='auto')
    ev = EventAccumulator(str(tmp_path / 'tb' / 'r'), size_guidance={'scalars': 0}).Reload()
    assert [e.step for e in ev.Scalars('lr/group0')] == list(range(1, 10))   # steps 7 and 8 once, not twice
    assert [e.step for e in ev.Scalars('loss/valid')] == [3, 6, 9]
    assert len(os.listdir(tmp_path / 'tb')) == 1
