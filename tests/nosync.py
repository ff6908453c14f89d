"""`no_host_sync_in_batches(learn)`: inside it, reading a tensor's value on the host while a batch runs raises.

On a GPU each such read (`.item()`, `float(t)`, `if t:`, `.tolist()`, ...) makes the CPU wait for the device; the
standard subscribers must not do it per batch. The first batch of each phase of a fit is exempt: the learner's input
checks read labels there on purpose. Functions that read CPU-only tensors by design (random draws made on the CPU so
the device is never waited for) are listed in `allow`.
"""
import sys
from contextlib import contextmanager

import torch

from nntrain.core import Subscriber

# Every way to get a tensor's value onto the host as a Python object.
READS = ('item', 'tolist', 'numpy', 'cpu', '__float__', '__int__', '__bool__', '__index__', '__complex__',
         '__format__', '__repr__', '__array__')


class _Window(Subscriber):
    "Open from the first subscriber's before_batch to the last one's cleanup_batch; the first batch per phase aside."
    def __init__(self, order: int, opens: bool, state: dict):
        self.order, self.opens, self.state = order, opens, state
        self.checked = set()   # phases whose first batch (with the learner's checks) has run

    def before_batch(self, learn):
        if not self.opens: return
        first = learn.training not in self.checked
        self.checked.add(learn.training)
        self.state['on'] = not first

    def cleanup_batch(self, learn):
        if not self.opens: self.state['on'] = False

    def before_fit(self, learn):
        if self.opens: self.checked = set()


@contextmanager
def no_host_sync_in_batches(learn, allow=()):
    "Add the window subscribers to `learn` and patch every host read of `torch.Tensor`; yields the list of reads seen."
    state, reads = {'on': False}, []
    allowed = {getattr(f, '__code__', f) for f in allow}
    subs = [_Window(-10**6, True, state), _Window(10**6, False, state)]
    saved = {name: torch.Tensor.__dict__.get(name) for name in READS}
    def guarded(name, orig):
        def read(self, *args, **kwargs):
            if state['on']:
                caller, frame = sys._getframe(1).f_code, sys._getframe(1)
                while frame is not None and frame.f_code not in allowed: frame = frame.f_back
                if frame is None:
                    state['on'] = False   # let the error message itself format tensors
                    raise AssertionError(f'host sync inside a batch: Tensor.{name} called from {caller.co_name} '
                                         f'({caller.co_filename}:{sys._getframe(1).f_lineno})')
                reads.append(name)
            return orig(self, *args, **kwargs)
        return read
    learn.add_subs(*subs)
    try:
        for name in READS:
            orig = getattr(torch.Tensor, name, None)
            if orig is not None: setattr(torch.Tensor, name, guarded(name, orig))
        yield reads
    finally:
        for name, orig in saved.items():
            if orig is None:
                if name in torch.Tensor.__dict__: delattr(torch.Tensor, name)
            else: setattr(torch.Tensor, name, orig)
        learn.remove_subs(*subs)
