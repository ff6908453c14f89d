"The optimization area's subscribers pass the shared contract (see tests/contract.py)."
import pytest
import torch

from nntrain.subs.lr_find import LRFindS
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, one_cycle_scheds, sched_cos, sched_lin
from tests.contract import check_contract

SUBSCRIBERS = {
    'LRFindS': lambda: LRFindS(num_it=5),
    'ParamSchedulerS': lambda: ParamSchedulerS({'lr': sched_cos(0.1, 0.01), 'mom': sched_lin(0.9, 0.8)}),
    'ParamSchedulerS_one_cycle': lambda: ParamSchedulerS(one_cycle_scheds(0.1)),
    'SchedulerS_step': lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2)),
    'SchedulerS_epoch': lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9), 'epoch'),
}

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    check_contract(SUBSCRIBERS[name])
