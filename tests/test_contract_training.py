"Every subscriber of nntrain.subs.training and nntrain.subs.precision passes the shared contract (tests/contract.py)."
import pytest
import torch

from nntrain.subs.precision import ChannelsLastS, CompileS, MixedPrecisionS
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from tests.contract import check_contract

SUBSCRIBERS = {
    'GradClipS': GradClipS,
    'GradClipS-value': lambda: GradClipS(0.1, mode='value'),
    'GradAccumS': lambda: GradAccumS(2),
    'TerminateOnNaNS': TerminateOnNaNS,
    'EMAS': EMAS,
    'MixedPrecisionS': MixedPrecisionS,
    'MixedPrecisionS-auto': lambda: MixedPrecisionS('auto', verbose=False),
    'ChannelsLastS': ChannelsLastS,
    'CompileS': lambda: CompileS(backend='eager'),   # traces without code generation: fast on a CPU
}
if hasattr(torch.amp, 'GradScaler'): SUBSCRIBERS['MixedPrecisionS-fp16'] = lambda: MixedPrecisionS('fp16')

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    check_contract(SUBSCRIBERS[name])
