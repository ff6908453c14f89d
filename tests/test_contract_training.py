"Every subscriber of nntrain.subs.training and nntrain.subs.precision passes the shared contract (tests/contract.py)."
import pytest

from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from tests.contract import check_contract

SUBSCRIBERS = {
    'GradClipS': GradClipS,
    'GradClipS-value': lambda: GradClipS(0.1, mode='value'),
    'GradAccumS': lambda: GradAccumS(2),
    'TerminateOnNaNS': TerminateOnNaNS,
    'EMAS': EMAS,
}

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    check_contract(SUBSCRIBERS[name])
