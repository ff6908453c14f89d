"Every shipped subscriber passes the same contract (see tests/contract.py). Add one line per new subscriber."
import pytest

from tests.contract import check_contract

SUBSCRIBERS = {
}

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    check_contract(SUBSCRIBERS[name])
