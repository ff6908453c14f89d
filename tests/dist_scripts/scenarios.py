"""Distributed scenarios, run by `torchrun --nproc_per_node 2` from tests/test_distributed.py (CPU, gloo).

`python -m torch.distributed.run ... scenarios.py GROUP OUT_DIR`: each rank runs GROUP's scenarios and saves what it saw
to OUT_DIR/GROUP-rank{r}.pt. The builders are imported by the tests too, which compute the single-process references.
"""
import importlib
import os
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from nntrain.core import CancelFitException, Order, Subscriber, set_seed
from nntrain.data import DataLoaders, MappedLoader
from nntrain.learner import Learner
from nntrain.subs.checkpoint import CheckpointS, checkpoints
from nntrain.subs.distributed import DistributedS, rank0_first
from nntrain.subs.metrics import MetricsS
from nntrain.subs.tracking import EarlyStoppingS
from nntrain.subs.training import GradAccumS, TerminateOnNaNS
from nntrain.testing import failing

importlib.import_module('nntrain.subs.lr_find')   # adds Learner.lr_find


def data(n_train=64, n_valid=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 4, generator=g), torch.randint(0, 3, (n_train + n_valid,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]

def learner(bs, subs=(), dropout=False, valid_bs=5, seed=0, opt_func=torch.optim.SGD):
    "A small classifier on fixed data; the same weights and data order wherever it is built."
    xt, yt, xv, yv = data()
    dls = DataLoaders.from_tensors(xt, yt, xv, yv, batch_size=bs, valid_batch_size=valid_bs, seed=seed)
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8), nn.ReLU()] + ([nn.Dropout(0.3)] if dropout else []) + [nn.Linear(8, 3)]
    return Learner(nn.Sequential(*layers), dls, F.cross_entropy, opt_func, lr=0.1, subs=list(subs))

momentum = partial(torch.optim.SGD, momentum=0.9)

def weights(learn): return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}

class Seen(Subscriber):
    "The training inputs this rank saw, by epoch."
    order = Order.METRICS
    def __init__(self): self.xs = {}
    def before_batch(self, learn):
        if learn.training: self.xs.setdefault(learn.epoch, []).append(learn.batch[0].clone())
    def seen(self): return {e: torch.cat(xs) for e, xs in self.xs.items()}

class CountAllReduce(Subscriber):
    "Register a DDP comm hook (once DistributedS has wrapped the model) that counts gradient all-reduces."
    order = Order.AUGMENT
    def __init__(self): self.calls = 0
    def before_fit(self, learn):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        def hook(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)
        learn.model.register_comm_hook(None, hook)

class At(Subscriber):
    "Call `fn(learn)` at `event` of training batch `at` (epoch `epoch`), on rank `rank` only."
    order = Order.COLLECT
    def __init__(self, event, at, fn, rank, epoch=0):
        self.at, self.fn, self.rank, self.epoch = at, fn, rank, epoch
        setattr(self, event, self._maybe)
    def _maybe(self, learn):
        if learn.training and learn.rank == self.rank and learn.iter == self.at and learn.epoch == self.epoch:
            self.fn(learn)

def _nan_loss(learn): learn.loss = learn.loss * float('nan')
def _cancel(learn): raise CancelFitException('rank 0 stops')

class Where(Subscriber):
    "Where the last fit stopped: (epoch, batch index), read as it ends."
    def cleanup_fit(self, learn): self.seen = (learn.epoch, learn.iter)
def _ctrl_c(learn): os.kill(os.getpid(), signal.SIGINT)
def _kill(learn):
    if learn.global_step == 7: os.kill(os.getpid(), signal.SIGKILL)

def resume_learner(folder, *extra):
    "The run that scenario 4 interrupts and resumes: dropout, so each rank's random state matters."
    learn = learner(8, [DistributedS(), CheckpointS(folder, every=5, keep=5, monitor=None), *extra], dropout=True)
    set_seed(100 + int(os.environ.get('RANK', 0)))   # ranks draw different dropout masks
    return learn

def group_kill(out: Path):
    "Scenario 4, first part: checkpoints every 5 steps, then SIGKILL at step 7 (mid-epoch 1 of 3)."
    learn = resume_learner(out / 'ckpt', At('after_step', 2, _kill, rank=0, epoch=1))
    learn.fit(3)
    return {'not': 'reached'}

def group_fail(out: Path):
    "Scenario 5: rank 1 raises in after_loss at batch 3."
    learn = learner(8, [DistributedS(), failing('after_loss', at=3) if int(os.environ['RANK']) == 1 else MetricsS(),
                        At('after_loss', 3, lambda l: (out / 'raised').write_text(str(time.time())), rank=1)])
    learn.fit(2)
    return {'not': 'reached'}

def _error(f):
    try: f()
    except Exception as e: return f'{type(e).__name__}: {e}'
    return None

def group_main(out: Path):
    res = {}
    rank = int(os.environ['RANK'])
    with rank0_first():   # rank 0 first, then the others
        with open(out / 'first.log', 'a') as f: f.write(f'{rank} start\n')
        time.sleep(0.3)
        with open(out / 'first.log', 'a') as f: f.write(f'{rank} end\n')
    # 1, 2: DDP 2 x 8 == 1 x 16; identical weights; synced metrics; disjoint shards; get_preds; validate
    seen = Seen()
    learn = learner(8, [DistributedS(), MetricsS(MulticlassAccuracy()), seen])
    learn.fit(2)
    res['ddp'] = weights(learn)
    res['model_type'] = type(learn.model).__name__
    res['history'] = learn.history
    res['seen'] = seen.seen()[0]
    res['preds'] = learn.get_preds()
    res['validate'] = learn.validate()
    res['infer'] = learn.infer(data()[2][:3])
    res['validate_alone'] = learner(8, [DistributedS()]).validate()   # no MetricsS: validate's own loss, synced
    res['lr_find'] = _error(lambda: learn.lr_find())
    # 2b: torch DataLoaders in MappedLoaders: a DistributedSampler (set_epoch) for training, unpadded validation; early
    # stopping (the accuracy never improves by 1) after epoch 1 on both ranks
    xt, yt, xv, yv = data()
    seen = Seen()
    train = MappedLoader(DataLoader(TensorDataset(xt, yt), batch_size=8, shuffle=True,
                                    generator=torch.Generator().manual_seed(0)))
    valid = MappedLoader(DataLoader(TensorDataset(xv, yv), batch_size=5))
    learn = learner(8, [DistributedS(), MetricsS(MulticlassAccuracy()), seen,
                        EarlyStoppingS('multiclass_accuracy', mode='max', min_delta=1., patience=1)])
    learn.dls = DataLoaders(train, valid)
    learn.fit(3)
    res['dl'] = {'weights': weights(learn), 'history': learn.history, 'seen': seen.seen(),
                 'sampler': type(train.dl.sampler).__name__}
    res['sync_bn'] = _error(lambda: learner(8, [DistributedS(sync_bn=True)]).fit(1))
    # 3: gradient accumulation: one all-reduce per optimizer step
    count = CountAllReduce()
    learn = learner(8, [DistributedS(), GradAccumS(2), count])
    learn.fit(2)
    res['accum'], res['accum_calls'], res['accum_steps'] = weights(learn), count.calls, learn.global_step
    # 4: resume from the checkpoint of the killed run, and the uninterrupted run
    learn = resume_learner(out / 'unused')
    learn.fit(3)
    res['uninterrupted'] = weights(learn)
    learn = resume_learner(out / 'unused2')
    learn.load(checkpoints(out / 'ckpt')[-1])   # step-5.pt, in the killed run's folder
    learn.fit(3, resume=True)
    res['resumed'] = weights(learn)
    # 5: TerminateOnNaNS on rank 1 only (its loss is made NaN at batch 2); a stop on rank 0; Ctrl-C on rank 1
    where = Where()
    learn = learner(8, [DistributedS(), At('after_loss', 2, _nan_loss, rank=1), where] +
                    ([TerminateOnNaNS()] if rank else []))
    learn.fit(2)
    res['nan'] = (*where.seen, learn.global_step, weights(learn))
    learn = learner(8, [DistributedS(), At('after_batch', 1, _cancel, rank=0), where])
    learn.fit(2)
    res['cancel'] = (*where.seen, learn.global_step)
    learn = learner(8, [DistributedS(), At('after_batch', 1, _ctrl_c, rank=1)])
    try: learn.fit(2); res['ctrl_c'] = None
    except KeyboardInterrupt as e: res['ctrl_c'] = (learn.global_step, str(e))
    # 6: unequal loader lengths; a loader that cannot be sharded
    n = 64 if rank == 0 else 48
    ds = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)))
    uneven = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds))
    learn = Learner(nn.Linear(4, 3), DataLoaders(uneven, uneven), F.cross_entropy, subs=[DistributedS()])
    res['uneven'] = _error(lambda: learn.fit(1))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    learn = Learner(nn.Linear(4, 3), DataLoaders([(x, y)], [(x, y)]), F.cross_entropy, subs=[DistributedS()])
    res['list_loader'] = _error(lambda: learn.fit(1))
    # 7: FSDP2: 2 ranks x 8 with momentum, in two fits (the second shards the first's optimizer state); a full state
    # dict saved by the main rank
    learn = learner(8, [DistributedS(fsdp=True), CheckpointS(out / 'fsdp_ckpt', every=3, keep=1, monitor=None)],
                    opt_func=momentum)
    learn.fit(1)
    learn.fit(1)
    res['fsdp'], res['fsdp_type'] = weights(learn), type(learn.model).__name__
    learn.save(out / 'fsdp.pt')
    learn = learner(8, [DistributedS(fsdp=True), GradAccumS(2)])   # FSDP2's no-sync: set_requires_gradient_sync
    learn.fit(2)
    res['fsdp_accum'] = weights(learn)
    return res

if __name__ == '__main__':
    group, out = sys.argv[1], Path(sys.argv[2])
    try: res = globals()[f'group_{group}'](out)
    except BaseException:
        traceback.print_exc()
        raise
    torch.save(res, out / f'{group}-rank{os.environ["RANK"]}.pt')
