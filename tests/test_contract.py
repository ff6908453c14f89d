"""One registry for the subscriber contract: every `Subscriber` exported from `nntrain.subs.*` needs an entry here.

Each entry is a factory (no arguments) and a learner maker. Every entry must pass `check_contract` (two fits, an
error mid-fit, no trace left) and `check_run_scopes` (validate, get_preds and lr_find between two fits change nothing).
`test_every_shipped_subscriber_is_registered` fails for a subscriber class with no entry.
"""
import importlib
import pkgutil
from functools import partial

import pytest
import torch
from torcheval.metrics import MulticlassAccuracy

import nntrain.subs
from nntrain.core import Subscriber, set_seed
from nntrain.losses import LabelSmoothingCrossEntropy
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS
from nntrain.subs.checkpoint import CheckpointS
from nntrain.subs.debug import DebugS, SyncAuditS, TraceS
from nntrain.subs.tensorboard import TensorBoardS
from nntrain.subs.device import DeviceS
from nntrain.subs.distributed import DistributedS
from nntrain.subs.lr_find import LRFindS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.monitor import ActivationStatsS, ModelMonitorS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.precision import ChannelsLastS, CompileS, MixedPrecisionS
from nntrain.subs.progress import ProgressS
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, one_cycle_scheds, sched_cos, sched_lin
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from nntrain.testing import tiny_classifier
from tests.contract import check_contract, check_run_scopes, files_on_disk, n_hooks, snapshot

images = partial(tiny_classifier, images=True)   # (N, 1, 4, 4) inputs, so CutMix has something to cut


def images_smoothed():
    learn = images()
    learn.loss_func = LabelSmoothingCrossEntropy()
    return learn


def with_metrics():
    "For the subscribers that read the rows MetricsS writes."
    return tiny_classifier(subs=[MetricsS()])


# name -> (factory, learner maker, extra arguments for check_contract)
REGISTRY = {
    'DeviceS': (DeviceS, tiny_classifier, {}),
    'NormalizationS': (NormalizationS, tiny_classifier, {}),
    'MetricsS': (MetricsS, tiny_classifier, {}),
    'MetricsS+accuracy': (lambda: MetricsS(accuracy=MulticlassAccuracy()), tiny_classifier, {}),
    'ProgressS': (ProgressS, tiny_classifier, {}),
    'ProgressS+plot': (lambda: ProgressS(plot=True), tiny_classifier, {}),
    'ParamSchedulerS': (lambda: ParamSchedulerS({'lr': sched_cos(0.1, 0.01), 'mom': sched_lin(0.9, 0.8)}),
                        tiny_classifier, {}),
    'ParamSchedulerS+one_cycle': (lambda: ParamSchedulerS(one_cycle_scheds(0.1)), tiny_classifier, {}),
    'SchedulerS+step': (lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2)),
                        tiny_classifier, {}),
    'SchedulerS+epoch': (lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9), 'epoch'),
                         tiny_classifier, {}),
    'LRFindS': (lambda: LRFindS(num_it=5), tiny_classifier, {}),
    'AugmentS': (lambda: AugmentS(lambda x: x + 0.1 * torch.randn_like(x)), tiny_classifier, {}),
    'MixUpS': (MixUpS, tiny_classifier, {}),
    'MixUpS+smoothing': (MixUpS, images_smoothed, {}),
    'CutMixS': (CutMixS, images, {}),
    'MixedPrecisionS': (MixedPrecisionS, tiny_classifier, {}),
    'MixedPrecisionS+auto': (lambda: MixedPrecisionS('auto', verbose=False), tiny_classifier, {}),
    'ChannelsLastS': (ChannelsLastS, tiny_classifier, {}),
    'CompileS': (lambda: CompileS(backend='eager'), tiny_classifier, {}),   # traces without code generation: fast
    'GradClipS': (GradClipS, tiny_classifier, {}),
    'GradClipS+value': (lambda: GradClipS(0.1, mode='value'), tiny_classifier, {}),
    'GradAccumS': (lambda: GradAccumS(2), tiny_classifier, {}),
    'TerminateOnNaNS': (TerminateOnNaNS, tiny_classifier, {}),
    'EMAS': (EMAS, tiny_classifier, {}),
    'ModelMonitorS+cancel=False': (lambda: ModelMonitorS(show=False, cancel=False), tiny_classifier, {}),
    'ModelMonitorS+modules': (lambda: ModelMonitorS(modules=['0', '2'], show=False, cancel=False), tiny_classifier, {}),
    # The default monitor cancels every fit after its first forward: the failure must come before that.
    'ModelMonitorS': (lambda: ModelMonitorS(show=False), tiny_classifier, dict(fail_event='before_batch', fail_at=0)),
    'ActivationStatsS': (ActivationStatsS, tiny_classifier, {}),
    'ActivationStatsS+every=2': (lambda: ActivationStatsS(every=2, modules=['1']), tiny_classifier, {}),
    'CheckpointS': (lambda: CheckpointS('ckpt'), with_metrics, {}),
    'CheckpointS+every=2': (lambda: CheckpointS('ckpt', every=2, keep=2), with_metrics, {}),
    'EarlyStoppingS': (EarlyStoppingS, with_metrics, {}),
    'EarlyStoppingS+restore_best': (lambda: EarlyStoppingS(patience=1, restore_best=True), with_metrics, {}),
    'CSVLoggerS': (lambda: CSVLoggerS('h.csv'), with_metrics, {}),
    'TraceS': (TraceS, tiny_classifier, {}),
    'SyncAuditS': (SyncAuditS, tiny_classifier, {}),
    'DebugS': (lambda: DebugS('after_loss', f=lambda learn: None), tiny_classifier, {}),
    'TensorBoardS': (lambda: TensorBoardS('tb'), with_metrics, {}),
    'DistributedS': (DistributedS, tiny_classifier, {}),   # alone (no torchrun): does nothing, changes nothing
    'ProgressS+table=phase': (lambda: ProgressS(table='phase'), tiny_classifier, {}),
}
if hasattr(torch.amp, 'GradScaler'):
    REGISTRY['MixedPrecisionS+fp16'] = (lambda: MixedPrecisionS('fp16'), tiny_classifier, {})


def shipped_subscribers() -> set:
    "Every Subscriber subclass named in the `__all__` of a module of `nntrain.subs`."
    found = set()
    for info in pkgutil.iter_modules(nntrain.subs.__path__):
        mod = importlib.import_module(f'nntrain.subs.{info.name}')
        for name in getattr(mod, '__all__', ()):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, Subscriber) and obj is not Subscriber: found.add(obj)
    return found


def test_every_shipped_subscriber_is_registered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # factories that take a path only store it, but stay out of the repository anyway
    covered = {type(factory()) for factory, _, _ in REGISTRY.values()}
    missing = sorted(c.__module__ + '.' + c.__qualname__ for c in shipped_subscribers() - covered)
    assert not missing, f'subscribers with no entry in tests/test_contract.py REGISTRY: {missing}'


def test_discovery_finds_the_subscribers():
    "The walk sees modules and classes (a discovery that found nothing would pass the test above)."
    found = shipped_subscribers()
    assert {DeviceS, MetricsS, CheckpointS, EMAS, CutMixS} <= found and len(found) >= 20
    assert all(issubclass(c, Subscriber) for c in found)


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_contract(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    factory, make_learner, kwargs = REGISTRY[name]
    check_contract(factory, make_learner, **kwargs)


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_validate_predict_and_lr_find_leave_no_trace(name, tmp_path, capsys):
    "Issue 8: for every shipped subscriber, runs that are not fits change nothing a later fit could see."
    factory, make_learner, _ = REGISTRY[name]
    check_run_scopes(factory, make_learner, tmp_path)


class FailInForward(Subscriber):
    "Raise inside the first training batch's forward pass, before the monitor can cancel."
    def before_fit(self, learn): self.handle = learn.model[0].register_forward_hook(self.boom)
    def boom(self, *args): raise RuntimeError('injected failure')
    def cleanup_fit(self, learn): self.handle.remove()


def test_contract_model_monitor_cancelling():
    "The cancelling monitor, with the failure inside the first forward pass: no hooks, weights unchanged."
    sub, learn = ModelMonitorS(show=False), tiny_classifier()
    before = snapshot(learn)
    weights = [t.clone() for t in learn.model.state_dict().values()]
    learn.fit(1, subs=[sub])
    learn.fit(1, subs=[sub])
    assert snapshot(learn) == before and learn.global_step == 0 and sub.summary is not None
    with pytest.raises(RuntimeError, match='injected failure'): learn.fit(1, subs=[sub, FailInForward()])
    assert snapshot(learn) == before and n_hooks(learn.model) == 0
    assert learn.preds is None and learn.loss is None
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.state_dict().values()))
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
