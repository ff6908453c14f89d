"The standard subscribers read no tensor on the host inside a batch (tests/nosync.py says how that is caught)."
import pytest
import torch
from torcheval.metrics import MulticlassAccuracy

from nntrain.core import Subscriber
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS, _beta, rand_box
from nntrain.subs.checkpoint import CheckpointS
from nntrain.subs.device import DeviceS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.monitor import ActivationStatsS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.precision import ChannelsLastS, MixedPrecisionS
from nntrain.subs.progress import ProgressS
from nntrain.subs.schedule import ParamSchedulerS, one_cycle_scheds
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from nntrain.testing import tiny_classifier
from tests.nosync import no_host_sync_in_batches

CPU_DRAWS = (_beta, rand_box)   # the mixers draw lam and boxes on the CPU on purpose: no device is waited for

STANDARD = {
    'DeviceS': lambda: DeviceS('cpu'),
    'NormalizationS': NormalizationS,
    'MetricsS': lambda: MetricsS(acc=MulticlassAccuracy()),
    'ProgressS': lambda: ProgressS(plot=True, comment_every=1e9),   # its comment is throttled, and syncs when shown
    'AugmentS': lambda: AugmentS(lambda x: x.flip(-1)),
    'MixUpS': MixUpS,
    'CutMixS': CutMixS,
    'MixedPrecisionS': MixedPrecisionS,
    'ChannelsLastS': ChannelsLastS,
    'GradClipS': GradClipS,
    'GradAccumS': lambda: GradAccumS(2),
    'TerminateOnNaNS-unchecked': lambda: TerminateOnNaNS(check_every=10**6),   # a checked batch syncs by design
    'EMAS': EMAS,
    'ParamSchedulerS': lambda: ParamSchedulerS(one_cycle_scheds(0.1)),
    'ActivationStatsS': ActivationStatsS,
    'CheckpointS-epoch': lambda: CheckpointS('ck'),
    'EarlyStoppingS': EarlyStoppingS,
    'CSVLoggerS': lambda: CSVLoggerS('log.csv'),
}


@pytest.mark.parametrize('name', sorted(STANDARD))
def test_no_host_sync_inside_batches(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learn = tiny_classifier(images=True, subs=[MetricsS()])
    with no_host_sync_in_batches(learn, allow=CPU_DRAWS):
        learn.fit(2, subs=[STANDARD[name]()])
    assert learn.global_step >= len(learn.dls.train) and len(learn.history) in (4, 8)   # 8: two MetricsS


READS = {'item': lambda t: t.item(), 'float': float, 'int': int, 'bool': bool, 'if': lambda t: 1 if t else 0,
         'tolist': lambda t: t.tolist(), 'numpy': lambda t: t.numpy(), 'cpu': lambda t: t.cpu(),
         'format': lambda t: f'{t:.3f}', 'repr': repr, 'str': str}


@pytest.mark.parametrize('name', sorted(READS))
def test_the_guard_catches_every_kind_of_read(name):
    "A subscriber reading the loss on the host in batch 1 is caught, whatever the spelling; batch 0 is exempt."
    class Reader(Subscriber):
        def after_batch(self, learn):
            if learn.iter in (0, 1): READS[name](learn.loss.detach())
    learn = tiny_classifier()
    with pytest.raises(AssertionError, match='host sync inside a batch'):
        with no_host_sync_in_batches(learn): learn.fit(1, subs=[Reader()])
    assert learn.global_step == 2   # batch 0 passed (the learner's checks run there), batch 1 was caught
    assert torch.tensor(2.).item() == 2. and float(torch.tensor(1.5)) == 1.5   # the patches are gone
