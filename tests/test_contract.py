"""The subscriber contract, applied to every entry of the registry (tests/registry.py) that it applies to.

Every entry must pass `check_contract` (two fits, an error mid-fit, no trace left) and `check_run_scopes` (validate,
get_preds and lr_find between two fits change nothing). `test_every_shipped_subscriber_is_registered` fails for a
subscriber class with no entry.
"""
import pytest

from nntrain.core import Subscriber, set_seed
from nntrain.subs.augment import CutMixS
from nntrain.subs.checkpoint import CheckpointS
from nntrain.subs.device import DeviceS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.monitor import ModelMonitorS
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS
from nntrain.testing import same_weights, tiny_classifier
from tests.contract import check_contract, check_run_scopes, files_on_disk, n_hooks, snapshot
from tests.registry import REGISTRY, params, shipped_subscribers


def test_every_shipped_subscriber_is_registered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # factories that take a path only store it, but stay out of the repository anyway
    covered = {type(e.factory()) for e in REGISTRY.values()}
    missing = sorted(c.__module__ + '.' + c.__qualname__ for c in shipped_subscribers() - covered)
    assert not missing, f'subscribers with no entry in tests/registry.py REGISTRY: {missing}'


def test_discovery_finds_the_subscribers():
    "The walk sees modules and classes (a discovery that found nothing would pass the test above)."
    found = shipped_subscribers()
    assert {DeviceS, MetricsS, CheckpointS, EMAS, CutMixS} <= found and len(found) >= 20
    assert all(issubclass(c, Subscriber) for c in found)


@pytest.mark.parametrize('name', params('contract'))
def test_contract(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    e = REGISTRY[name]
    check_contract(e.factory, e.learner, **e.contract)


@pytest.mark.parametrize('name', params('contract'))
def test_validate_predict_and_lr_find_leave_no_trace(name, tmp_path, capsys):
    "Issue 8: for every shipped subscriber, runs that are not fits change nothing a later fit could see."
    e = REGISTRY[name]
    check_run_scopes(e.factory, e.learner, tmp_path, lr_find=e.lr_find)


class FailInForward(Subscriber):
    "Raise inside the first training batch's forward pass, before the monitor can cancel."
    def before_fit(self, learn): self.handle = learn.model[0].register_forward_hook(self.boom)
    def boom(self, *args): raise RuntimeError('injected failure')
    def cleanup_fit(self, learn): self.handle.remove()


def test_contract_model_monitor_cancelling():
    "The cancelling monitor, with the failure inside the first forward pass: no hooks, weights unchanged."
    sub, learn = ModelMonitorS(show=False), tiny_classifier()
    before = snapshot(learn)
    weights = {k: t.clone() for k, t in learn.model.state_dict().items()}
    learn.fit(1, subs=[sub])
    learn.fit(1, subs=[sub])
    assert snapshot(learn) == before and learn.global_step == 0 and sub.summary is not None
    with pytest.raises(RuntimeError, match='injected failure'): learn.fit(1, subs=[sub, FailInForward()])
    assert snapshot(learn) == before and n_hooks(learn.model) == 0
    assert learn.preds is None and learn.loss is None
    assert same_weights(weights, learn)
    learn.fit(1, subs=[sub])


def test_validate_after_training_leaves_logs_checkpoints_and_early_stopping_alone(tmp_path, monkeypatch):
    "Issue 8's scenario: three validate() calls after a fit change no row, no file and no stopper state."
    monkeypatch.chdir(tmp_path)
    set_seed(0)
    stop = EarlyStoppingS(patience=2)
    learn = tiny_classifier(subs=[MetricsS(), CheckpointS('ck', every=2), stop, CSVLoggerS('log.csv')])
    learn.fit(2)
    history, files, state = [dict(r) for r in learn.history], files_on_disk(tmp_path), stop.state_dict()
    assert len(history) == 4 and 'log.csv' in files and any(f.startswith(f'ck/{learn.run_id}/step-') for f in files)
    rows = [learn.validate() for _ in range(3)]
    assert learn.history == history and files_on_disk(tmp_path) == files
    assert not list((tmp_path / 'ck').rglob('interrupted.pt'))
    assert stop.state_dict() == state and stop.stopped_epoch is None
    for row in rows:
        assert row['phase'] == 'valid' and set(row) == set(history[-1])
        assert row['loss'] == pytest.approx(history[-1]['loss'], rel=1e-6)   # the weights the last valid pass saw
    learn.fit(1)   # the stopper did not carry three bogus epochs without improvement into this fit
    assert len(learn.history) == 6 and stop.stopped_epoch is None
