"The registered subscribers read no tensor on the host inside a batch (`nntrain.testing.no_host_sync_in_batches`)."
import pytest
import torch

from nntrain.core import Subscriber
from nntrain.testing import no_host_sync_in_batches, tiny_classifier
from tests.registry import REGISTRY, names, params


@pytest.mark.parametrize('name', params('nosync'))
def test_no_host_sync_inside_batches(name, tmp_path, monkeypatch):
    "Each registry entry that does not say why it syncs: two epochs under the guard, every batch but the first checked."
    monkeypatch.chdir(tmp_path)
    e = REGISTRY[name]
    learn = e.learner()
    with no_host_sync_in_batches(learn, allow=e.allow) as guard:
        learn.fit(2, subs=[e.factory()])
    n = 2 * (len(learn.dls.train) + len(learn.dls.valid))
    assert guard.batches == n - 2 and len(learn.history) == 4   # each phase's first batch of the fit is exempt


def test_the_registry_says_why_each_unchecked_entry_syncs():
    "Leaving an entry out of the no-sync check takes a reason; most entries are checked."
    unchecked = [n for n, e in REGISTRY.items() if e.syncs is not None]
    assert all(isinstance(REGISTRY[n].syncs, str) and len(REGISTRY[n].syncs) > 20 for n in unchecked)
    assert len(names('nosync')) > 3 * len(unchecked)
    assert {'TensorBoardS', 'MetricsS+accuracy', 'CheckpointS', 'MixUpS', 'EMAS'} <= set(names('nosync'))


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
