"""Distributed scenarios, run by `torchrun --nproc_per_node 2` from tests/test_distributed.py (CPU, gloo).

`python -m torch.distributed.run ... scenarios.py GROUP OUT_DIR`: each rank runs GROUP's scenarios and saves what it saw
to OUT_DIR/GROUP-rank{r}.pt. The builders are imported by the tests too, which compute the single-process references.
"""
import atexit
import functools
import importlib
import os
import signal
import sys
import time
import traceback
import types
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from nntrain.core import CancelFitException, Order, Subscriber, set_seed
from nntrain.data import DataLoaders, MappedLoader, TensorLoader
from nntrain.learner import Learner
from nntrain.subs.checkpoint import CheckpointS, run_folders
from nntrain.subs.distributed import DistributedS, ShardedTensorLoader, StopFlag, full_weights, rank0_first
from nntrain.subs.metrics import MetricsS
from nntrain.subs.tracking import EarlyStoppingS
from nntrain.subs.training import GradAccumS, TerminateOnNaNS
from nntrain.testing import failing

importlib.import_module('nntrain.subs.lr_find')   # adds Learner.lr_find


def data(n_train=64, n_valid=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 4, generator=g), torch.randint(0, 3, (n_train + n_valid,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]

def learner(bs, subs=(), dropout=False, valid_bs=5, seed=0, opt_func=torch.optim.SGD, blocks=False):
    "A small classifier on fixed data; the same weights and data order wherever it is built."
    xt, yt, xv, yv = data()
    dls = DataLoaders.from_tensors(xt, yt, xv, yv, batch_size=bs, valid_batch_size=valid_bs, seed=seed)
    torch.manual_seed(seed)
    if blocks:   # two blocks FSDP2 shards on their own, and a head that stays with the root
        model = nn.Sequential(nn.Sequential(nn.Linear(4, 64), nn.ReLU()), nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
                              *([nn.Dropout(0.3)] if dropout else []), nn.Linear(64, 3))
    else:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), *([nn.Dropout(0.3)] if dropout else []), nn.Linear(8, 3))
    return Learner(model, dls, F.cross_entropy, opt_func, lr=0.1, subs=list(subs))

momentum = partial(torch.optim.SGD, momentum=0.9)

def weights(learn):
    "The full weights, gathered on every rank if they are sharded."
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in learn.model.parameters()): return full_weights(learn.model, everywhere=True)
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}

def storage_bytes(root, skip=(TensorLoader, ShardedTensorLoader, DataLoader, MappedLoader, DataLoaders)) -> int:
    "Bytes of floating-point tensor storage reachable from `root` through attributes and containers (loaders aside)."
    from torch.distributed.tensor import DTensor
    seen, kept, storages, stack = set(), [], {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, str, bytes, int, float) + skip): continue
        seen.add(id(obj))
        kept.append(obj)   # alive until the walk ends, so no later object reuses its id
        if isinstance(obj, DTensor):
            stack += [obj.to_local()] + ([obj.grad] if obj.is_leaf and obj.grad is not None else [])
            continue
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                s = obj.untyped_storage()
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            if obj.is_leaf and obj.grad is not None: stack.append(obj.grad)
            continue
        if isinstance(obj, dict): stack.extend(list(obj.keys()) + list(obj.values()))
        elif isinstance(obj, (list, tuple, set, frozenset)): stack.extend(obj)
        elif isinstance(obj, types.MethodType): stack.append(obj.__self__)
        elif isinstance(obj, functools.partial): stack.extend([obj.func, obj.args, obj.keywords])
        elif isinstance(obj, types.FunctionType): stack.extend(c.cell_contents for c in obj.__closure__ or ()
                                                               if c.cell_contents is not None)
        elif hasattr(obj, '__dict__'): stack.extend(vars(obj).values())
    return sum(storages.values())

class Seen(Subscriber):
    "The training inputs this rank saw, by epoch."
    order = Order.METRICS
    def __init__(self): self.xs = {}
    def before_batch(self, learn):
        if learn.training: self.xs.setdefault(learn.epoch, []).append(learn.xb[0].clone())
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

class Probe(Subscriber):
    "During a fit: the model's class, which of its children are FSDP units, the tensor bytes the learner reaches."
    order = Order.COLLECT
    def __init__(self): self.bytes, self.types = [], None
    def after_batch(self, learn):
        if not learn.training: return
        from torch.distributed.fsdp import FSDPModule
        self.bytes.append(storage_bytes(learn))
        self.types = [type(learn.model).__name__] + [isinstance(m, FSDPModule) for m in learn.model.children()]

def _nan_loss(learn): learn.loss = learn.loss * float('nan')
def _cancel(learn): raise CancelFitException('rank 0 stops')

class Where(Subscriber):
    "Where the last fit stopped: (epoch, batch index), read as it ends."
    def cleanup_fit(self, learn): self.seen = (learn.epoch, learn.iter)
def _ctrl_c(learn): os.kill(os.getpid(), signal.SIGINT)
def _kill(learn, out=None):
    if learn.global_step != 7: return
    if out is not None: (out / 'killed').write_text(f'rank {learn.rank} at step {learn.global_step}')
    os.kill(os.getpid(), signal.SIGKILL)

def resume_learner(folder, *extra, fsdp=False, every=5):
    "The run that is interrupted and resumed: dropout, so each rank's random state matters."
    learn = learner(8, [DistributedS(fsdp=fsdp), CheckpointS(folder, every=every, keep=5, monitor=None), *extra],
                    dropout=True, blocks=fsdp, opt_func=momentum if fsdp else torch.optim.SGD)
    set_seed(100 + int(os.environ.get('RANK', 0)))   # ranks draw different dropout masks
    return learn

class Count:
    "Count calls of some torch.distributed functions (wrapped for the duration)."
    names = ('all_reduce', 'all_gather_object', 'broadcast', 'broadcast_object_list', 'barrier', 'all_gather')
    def __enter__(self):
        self.calls, self.saved = 0, {n: getattr(dist, n) for n in self.names}
        def counted(f):
            def g(*a, **k):
                self.calls += 1
                return f(*a, **k)
            return g
        for n, f in self.saved.items(): setattr(dist, n, counted(f))
        return self
    def __exit__(self, *exc):
        for n, f in self.saved.items(): setattr(dist, n, f)

def group_restart(out: Path):
    "Under --max-restarts 1: the first attempt's rank 1 is killed at step 7; the second resumes by itself."
    attempt = int(os.environ['TORCHELASTIC_RESTART_COUNT'])
    kill = [At('after_step', 2, partial(_kill, out=out), rank=1, epoch=1)] if attempt == 0 else []
    learn = resume_learner(out / 'ckpt', *kill)
    learn.fit(3, resume='auto')
    res = {'attempt': attempt, 'resumed': weights(learn)}
    learn = resume_learner(out / 'fresh')
    learn.fit(3)
    res['uninterrupted'] = weights(learn)
    return res

def group_fail(out: Path):
    "Rank 1 raises in after_loss at batch 3."
    learn = learner(8, [DistributedS(), failing('after_loss', at=3) if int(os.environ['RANK']) == 1 else MetricsS(),
                        At('after_loss', 3, lambda l: (out / 'raised').write_text(str(time.time())), rank=1)])
    learn.fit(2)
    return {'not': 'reached'}

def _hang(learn, out):
    (out / 'hang_start').write_text(str(time.time()))
    time.sleep(600)

def group_hang(out: Path):
    "The README's order (rank0_first makes the group), then DistributedS(timeout=5 s); rank 1 hangs at batch 2."
    with rank0_first(): pass
    learn = learner(8, [DistributedS(timeout=timedelta(seconds=5)), At('after_loss', 2, partial(_hang, out=out), 1)])
    learn.fit(2)
    return {'not': 'reached'}

def group_alone(out: Path):
    "One rank under torchrun: nothing wrapped, no collective during the fit."
    probe = Probe()
    learn = learner(16, [DistributedS(), MetricsS(MulticlassAccuracy()), probe])
    with Count() as count: learn.fit(2)
    return {'weights': weights(learn), 'types': probe.types, 'collectives': count.calls, 'history': learn.history}

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
    # DistributedS(timeout=...) on a group that exists (rank0_first made it): set on it
    DistributedS(timeout=timedelta(seconds=42))
    res['timeout'] = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu')).options._timeout
    DistributedS(timeout=timedelta(minutes=10))
    # 1, 2: DDP 2 x 8 == 1 x 16; identical weights; synced metrics; disjoint shards; get_preds; validate; no host read
    # of a tensor inside a batch (the stop flags are read through NumPy); the user's loaders untouched
    from tests.nosync import no_host_sync_in_batches
    seen, probe = Seen(), Probe()
    learn = learner(8, [DistributedS(flag_interval=0), MetricsS(MulticlassAccuracy()), seen, probe])   # a flag a step
    train = learn.dls.train
    waits = []
    result = StopFlag.result
    def timed(self):   # where each flag is read (before_batch, _agree), and whether its all-reduce had finished
        waits.append((sys._getframe(2).f_code.co_name, self.work.is_completed()))
        return result(self)
    StopFlag.result = timed
    try:
        with no_host_sync_in_batches(learn) as guard: learn.fit(2)
    finally: StopFlag.result = result
    assert guard.batches > 0   # the guard was on
    res['reads'], res['waits'] = guard.reads, waits
    res['ddp'], res['ddp_bytes'], res['ddp_types'] = weights(learn), probe.bytes, probe.types
    res['model_type'] = type(learn.model).__name__
    res['loader'] = (learn.dls.train is train, type(train).__name__, hasattr(train, 'rank'))
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
    # 3: gradient accumulation: one all-reduce per optimizer step (no_sync on the others)
    count = CountAllReduce()
    learn = learner(8, [DistributedS(), GradAccumS(2), count])
    learn.fit(2)
    res['accum'], res['accum_calls'], res['accum_steps'] = weights(learn), count.calls, learn.global_step
    # 4: stops (8 batches of 4 per rank and epoch), with a flag every step (flag_interval=0): TerminateOnNaNS on every
    # rank, a NaN loss on rank 1 at batch 2; a stop on rank 0 after batch 1; Ctrl-C on rank 1 after batch 1. Each is
    # sent with the next step (2) and lands at the start of batch 4 on every rank. Paced flags (the default): the same
    # stop lands at the same batch on both ranks
    where = Where()
    nan = At('after_loss', 2, _nan_loss, rank=1)
    learn = learner(4, [DistributedS(flag_interval=0), nan, where, TerminateOnNaNS()])
    learn.fit(2)
    res['nan'] = (*where.seen, learn.global_step, weights(learn))
    learn = learner(4, [DistributedS(flag_interval=0), At('after_batch', 1, _cancel, rank=0), where])
    learn.fit(2)
    res['cancel'] = (*where.seen, learn.global_step)
    learn = learner(4, [DistributedS(), At('after_batch', 1, _cancel, rank=0), where])
    learn.fit(2)
    res['cancel_paced'] = (*where.seen, learn.global_step)
    learn = learner(4, [DistributedS(flag_interval=0), At('after_batch', 1, _ctrl_c, rank=1),
                        CheckpointS(out / f'ctrl_c{rank}', monitor=None)])
    try: learn.fit(2); res['ctrl_c'] = None
    except KeyboardInterrupt as e: res['ctrl_c'] = (learn.global_step, str(e))
    # 5: unequal loader lengths; a loader that cannot be sharded
    n = 64 if rank == 0 else 48
    ds = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)))
    uneven = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds))
    learn = Learner(nn.Linear(4, 3), DataLoaders(uneven, uneven), F.cross_entropy, subs=[DistributedS()])
    res['uneven'] = _error(lambda: learn.fit(1))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    learn = Learner(nn.Linear(4, 3), DataLoaders([(x, y)], [(x, y)]), F.cross_entropy, subs=[DistributedS()])
    res['list_loader'] = _error(lambda: learn.fit(1))
    # 6: FSDP2 by blocks, in place: 2 ranks x 8 with momentum, in two fits; what the learner holds during the fit; the
    # uneven validation shards (15 and 14 items in batches of 7: 3 and 2 batches) evaluated exactly
    probe = Probe()
    learn = learner(8, [DistributedS(fsdp=True), MetricsS(MulticlassAccuracy()), probe], opt_func=momentum,
                    blocks=True, valid_bs=7)
    learn.fit(1)
    learn.fit(1)
    res['fsdp'], res['fsdp_bytes'], res['fsdp_types'] = weights(learn), probe.bytes, probe.types
    res['fsdp_history'], res['fsdp_validate'] = learn.history, learn.validate()
    probe = Probe()
    learn = learner(8, [DistributedS(), probe], blocks=True)   # the same model under DDP, plain SGD, for scale
    learn.fit(1)
    res['ddp_blocks_bytes'] = probe.bytes
    probe = Probe()
    learn = learner(8, [DistributedS(fsdp=True), probe], blocks=True)   # FSDP2, plain SGD: no optimizer state
    learn.fit(1)
    res['fsdp_sgd_bytes'] = probe.bytes
    # 7: sharded checkpoints: every 5 steps during a fit with dropout (DCP, each rank its shard), a resume from step 5
    # in a fresh learner (same process) ending bitwise equal, and learn.save of a sharded model
    learn = resume_learner(out / 'dcp', fsdp=True)
    learn.fit(3)
    res['dcp_uninterrupted'] = weights(learn)
    learn.save(out / 'fsdp.pt')
    learn = resume_learner(out / 'dcp_resumed', fsdp=True)
    learn.load(run_folders(out / 'dcp')[-1] / 'step-5.pt')   # the run's own folder
    learn.fit(3, resume=True)
    res['dcp_resumed'] = weights(learn)
    learn = learner(8, [DistributedS(fsdp=True), GradAccumS(2)])   # FSDP2's no-sync: set_requires_gradient_sync
    learn.fit(2)
    res['fsdp_accum'] = weights(learn)
    # 8: FSDP2 options: a mixed-precision policy (bf16 weights in compute, fp32 kept); CPU offload refused on a CPU
    from torch.distributed.fsdp import MixedPrecisionPolicy
    learn = learner(8, [DistributedS(fsdp=True, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))],
                    blocks=True)
    learn.fit(1)
    res['bf16'] = (learn.history[-1]['loss'], {p.dtype for p in learn.model.parameters()})
    res['offload'] = _error(lambda: learner(8, [DistributedS(fsdp=True, cpu_offload=True)]).fit(1))
    return res

if __name__ == '__main__':
    group, out = sys.argv[1], Path(sys.argv[2])
    # registered first, so it runs last at exit: after nntrain's own exit hook, which destroys the process group
    atexit.register(lambda: (out / f'{group}-exit{os.environ["RANK"]}').write_text(str(dist.is_initialized())))
    try: res = globals()[f'group_{group}'](out)
    except BaseException:
        traceback.print_exc()
        raise
    torch.save(res, out / f'{group}-rank{os.environ["RANK"]}.pt')
