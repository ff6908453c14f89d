"Every shipped subscriber passes the same contract (see tests/contract.py). Add one line per new subscriber."
import pytest
from torcheval.metrics import MulticlassAccuracy

from nntrain.subs.device import DeviceS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.progress import ProgressS
from tests.contract import check_contract

SUBSCRIBERS = {
    'DeviceS': DeviceS,
    'NormalizationS': NormalizationS,
    'MetricsS': MetricsS,
    'MetricsS+accuracy': lambda: MetricsS(accuracy=MulticlassAccuracy()),
    'ProgressS': ProgressS,
    'ProgressS+plot': lambda: ProgressS(plot=True),
}

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    check_contract(SUBSCRIBERS[name])
