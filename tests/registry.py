"""One registry of the shipped subscribers and what each is checked for: every test over all subscribers reads it.

Each entry builds one subscriber (a factory with no arguments) and the learner it runs on, and says which checks apply:

- `contract`: `check_contract`'s extra arguments, or None to leave the entry out of the contract checks (two fits, an
  error mid-fit, no trace left; validate/get_preds/lr_find between fits change nothing: tests/test_contract.py).
- `syncs`: None when it reads no tensor on the host inside a batch, which tests/test_nosync.py (the guard) and
  tests/test_debug.py (`SyncAuditS`) check; else why it does (the checks leave it out). `allow`: the functions that
  read on the host by design all the same (on the CPU, or once per epoch), which the guard lets through.
- `cuda`: the entry needs a CUDA device (skipped without one).

`tests/test_contract.py::test_every_shipped_subscriber_is_registered` fails for a shipped subscriber with no entry, so a
new subscriber gets the contract and the no-sync checks as soon as it is registered, unless its entry says why not.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import pytest
import torch
from torch import nn
from torcheval.metrics import MulticlassAccuracy

import nntrain.subs
from nntrain.core import Subscriber
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.losses import LabelSmoothingCrossEntropy
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS, _beta, rand_box
from nntrain.subs.checkpoint import CheckpointS
from nntrain.subs.debug import DebugS, SyncAuditS, TraceS
from nntrain.subs.device import DeviceS
from nntrain.subs.distributed import DistributedS
from nntrain.subs.gan import GANModule, GANS, gan_splitter
from nntrain.subs.lr_find import LRFindS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.monitor import ActivationStatsS, ModelMonitorS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.precision import ChannelsLastS, CompileS, MixedPrecisionS
from nntrain.subs.progress import ProgressS
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, one_cycle_scheds, sched_cos, sched_lin
from nntrain.subs.tensorboard import TensorBoardS
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from nntrain.testing import tiny_classifier

__all__ = ['Entry', 'REGISTRY', 'CPU_DRAWS', 'names', 'params', 'shipped_subscribers', 'images', 'with_metrics',
           'images_with_metrics']

images = partial(tiny_classifier, images=True)   # (N, 1, 4, 4) inputs: CutMix has something to cut, images to show


def images_smoothed():
    learn = images()
    learn.loss_func = LabelSmoothingCrossEntropy()
    return learn


def with_metrics():
    "For the subscribers that read the rows MetricsS writes."
    return tiny_classifier(subs=[MetricsS()])


def images_with_metrics(): return tiny_classifier(images=True, subs=[MetricsS()])


def gan_learner():
    "A tiny GAN on 2-D points, for GANS (which provides every step of its batches)."
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    gen = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    crit = nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 1))
    dls = DataLoaders.from_tensors(x[:48], None, x[48:], None, batch_size=16, valid_batch_size=8)
    return Learner(GANModule(gen, crit, noise_size=2), dls, None, torch.optim.SGD, 1e-3, splitter=gan_splitter)


@dataclass(frozen=True)
class Entry:
    "One way to build a shipped subscriber, the learner it runs on, and the checks that apply to it."
    factory: Callable                          # builds the subscriber, with no arguments
    learner: Callable = tiny_classifier        # builds the learner it runs on
    contract: dict | None = field(default_factory=dict)   # check_contract's extra arguments; None: not checked
    syncs: str | None = None                   # why it reads tensors on the host inside batches; None: it must not
    allow: tuple = ()                          # functions that may read on the host by design (the guard's `allow`)
    cuda: bool = False                         # needs a CUDA device
    lr_find: bool = True                       # its learner has an LR search (the run-scope check runs one)


CPU_DRAWS = (_beta, rand_box)   # the mixers draw lam and boxes on the CPU on purpose: no device is waited for
E = Entry
REGISTRY = {
    'DeviceS': E(DeviceS),
    'DeviceS+cuda': E(lambda: DeviceS('cuda'), cuda=True),   # where a host sync really makes the CPU wait
    'NormalizationS': E(NormalizationS),
    'MetricsS': E(MetricsS),
    'MetricsS+accuracy': E(lambda: MetricsS(accuracy=MulticlassAccuracy())),
    'ProgressS': E(ProgressS, syncs='reads the loss for its comment, at most once per comment_every (0.5 s)'),
    'ProgressS+plot': E(lambda: ProgressS(plot=True), syncs='reads the loss for its comment, throttled'),
    'ProgressS+plot,quiet': E(lambda: ProgressS(plot=True, comment_every=1e9)),   # the comment is never due
    'ProgressS+table=phase': E(lambda: ProgressS(table='phase'), syncs='reads the loss for its comment, throttled'),
    'ParamSchedulerS': E(lambda: ParamSchedulerS({'lr': sched_cos(0.1, 0.01), 'mom': sched_lin(0.9, 0.8)})),
    'ParamSchedulerS+one_cycle': E(lambda: ParamSchedulerS(one_cycle_scheds(0.1))),
    'SchedulerS+step': E(lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2))),
    'SchedulerS+epoch': E(lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9), 'epoch')),
    'LRFindS': E(lambda: LRFindS(num_it=5), syncs='reads each loss to track the smoothed curve and stop on divergence'),
    'AugmentS': E(lambda: AugmentS(lambda x: x + 0.1 * torch.randn_like(x))),
    'MixUpS': E(MixUpS, allow=CPU_DRAWS),
    'MixUpS+smoothing': E(MixUpS, images_smoothed, allow=CPU_DRAWS),
    'CutMixS': E(CutMixS, images, allow=CPU_DRAWS),
    'MixedPrecisionS': E(MixedPrecisionS),
    'MixedPrecisionS+auto': E(lambda: MixedPrecisionS('auto', verbose=False)),
    'ChannelsLastS': E(ChannelsLastS, images),
    'CompileS': E(lambda: CompileS(backend='eager')),   # traces without code generation: fast
    'GradClipS': E(GradClipS),
    'GradClipS+value': E(lambda: GradClipS(0.1, mode='value')),
    'GradAccumS': E(lambda: GradAccumS(2)),
    'TerminateOnNaNS': E(TerminateOnNaNS, syncs='a checked batch reads whether the loss and gradients are finite'),
    'TerminateOnNaNS+unchecked': E(lambda: TerminateOnNaNS(check_every=10**6)),   # only each fit's first batch
    'EMAS': E(EMAS),
    'ModelMonitorS+cancel=False': E(lambda: ModelMonitorS(show=False, cancel=False)),
    'ModelMonitorS+modules': E(lambda: ModelMonitorS(modules=['0', '2'], show=False, cancel=False)),
    # The default monitor cancels every fit after its first forward: the failure must come before that.
    'ModelMonitorS': E(lambda: ModelMonitorS(show=False), contract=dict(fail_event='before_batch', fail_at=0),
                       syncs='cancels every fit in its first batch: no batch to check'),
    'ActivationStatsS': E(ActivationStatsS),
    'ActivationStatsS+every=2': E(lambda: ActivationStatsS(every=2, modules=['1'])),
    'CheckpointS': E(lambda: CheckpointS('ckpt'), with_metrics),
    'CheckpointS+every=2': E(lambda: CheckpointS('ckpt', every=2, keep=2), with_metrics,
                             syncs='a step checkpoint copies the state to the host, every `every` steps'),
    'EarlyStoppingS': E(EarlyStoppingS, with_metrics),
    'EarlyStoppingS+restore_best': E(lambda: EarlyStoppingS(patience=1, restore_best=True), with_metrics),
    'CSVLoggerS': E(lambda: CSVLoggerS('h.csv'), with_metrics),
    'TraceS': E(TraceS, syncs='an instrument: describes each watched value, reading it'),
    'SyncAuditS': E(SyncAuditS),   # counts reads: its patches wrap the guard's, so a read still reaches the guard
    'DebugS': E(lambda: DebugS('after_loss', f=lambda learn: None)),
    'TensorBoardS': E(lambda: TensorBoardS('tb'), images_with_metrics,
                      allow=(TensorBoardS._add_images,)),   # a few validation images, once per epoch
    'DistributedS': E(DistributedS),   # alone (no torchrun): does nothing, changes nothing
    'GANS': E(lambda: GANS(torch.optim.SGD), gan_learner, lr_find=False),   # a GAN has no LR search
}
if hasattr(torch.amp, 'GradScaler'):
    REGISTRY['MixedPrecisionS+fp16'] = E(lambda: MixedPrecisionS('fp16'),
                                         syncs="the gradient scaler reads its inf check and scale at every step")
del E

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def names(check: str) -> list[str]:
    "The entries a check applies to, sorted: 'contract', 'nosync' (those that must not sync), or 'all'."
    keep = {'contract': lambda e: e.contract is not None, 'nosync': lambda e: e.syncs is None, 'all': lambda e: True}
    return sorted(n for n, e in REGISTRY.items() if keep[check](e))


def params(check: str) -> list:
    "`names(check)` as pytest parameters, those that need CUDA skipped without it."
    return [pytest.param(n, marks=[_needs_cuda] if REGISTRY[n].cuda else []) for n in names(check)]


def shipped_subscribers() -> set:
    "Every Subscriber subclass named in the `__all__` of a module of `nntrain.subs`."
    found = set()
    for info in pkgutil.iter_modules(nntrain.subs.__path__):
        mod = importlib.import_module(f'nntrain.subs.{info.name}')
        for name in getattr(mod, '__all__', ()):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, Subscriber) and obj is not Subscriber: found.add(obj)
    return found
