"The monitor subscribers pass the shared contract (see tests/contract.py)."
import pytest
import torch

from nntrain.core import Subscriber
from nntrain.subs.monitor import ActivationStatsS, ModelMonitorS
from tests.contract import check_contract, n_hooks, snapshot, tiny_classifier

SUBSCRIBERS = {
    'ModelMonitorS(cancel=False)': lambda: ModelMonitorS(show=False, cancel=False),
    'ModelMonitorS(modules)': lambda: ModelMonitorS(modules=['0', '2'], show=False, cancel=False),
    'ActivationStatsS': ActivationStatsS,
    'ActivationStatsS(every=2)': lambda: ActivationStatsS(every=2, modules=['1']),
}

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    check_contract(SUBSCRIBERS[name])


class FailInForward(Subscriber):
    "Raise inside the first training batch's forward pass, before the monitor can cancel."
    def before_fit(self, learn): self.handle = learn.model[0].register_forward_hook(self.boom)
    def boom(self, *args): raise RuntimeError('injected failure')
    def cleanup_fit(self, learn): self.handle.remove()


def test_contract_model_monitor_cancelling():
    """The default `ModelMonitorS` cancels every fit on its first batch, so the shared check's failure at batch 1
    never comes: the same checks, with the failure injected inside the first forward pass."""
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


def test_shared_contract_model_monitor_cancelling():
    "The shared contract, with its failure injected before the first batch's forward (the monitor cancels after it)."
    check_contract(lambda: ModelMonitorS(show=False), fail_event='before_batch', fail_at=0)
