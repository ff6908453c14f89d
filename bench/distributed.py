"""Distributed training on CPU (gloo): DistributedS against a hand-written DDP loop, alone, and FSDP2's memory.

    python bench/distributed.py                    # speed and memory (about 5 minutes on 2 cores)
    python bench/distributed.py --only speed       # ms/step only;  --reps 9: more repetitions
    python bench/distributed.py --only memory      # the peak-memory table only

Speed. 2 ranks under torchrun (gloo) train the same model from the same initial weights on the same in-memory data,
the same number of steps, with plain SGD:
- a hand-written DDP loop: `DistributedSampler` for each epoch's order, batches sliced from the tensors with
  `index_select`, `DistributedDataParallel(model)`, `loss.backward(); opt.step(); opt.zero_grad()`;
- nntrain: a `Learner` with `DistributedS()` over a `TensorLoader` of the same tensors (sharded by DistributedS).
nntrain runs one fit; after each of its epochs a subscriber runs an epoch of the loop, so the two interleave (loop,
nntrain, loop, ...) at steady state. Each segment starts right after a barrier and ends with one; times are rank 0's.
The ratio is nntrain's epoch time over the loop's next one; the table gives its median and range over the epochs (the
first of each is a warm-up), for the wall clock and for the process's CPU time (all its threads), which the load of
other processes on the machine disturbs far less. What a fit does once (DDP wrapping, shard loaders, agreeing on the
data order) is outside these times. World size 1: torchrun with one rank, a fit of one epoch (4 times as many steps) of the Learner with DistributedS and one of the same Learner
without it, in turn (each first every other time).

Memory. An MLP of 12 blocks (Linear(2048, 2048) + ReLU; 50.4 M parameters, 192 MiB in fp32) and a head, trained
with AdamW for 3 steps at batch 8: one process; 2 ranks with DDP; 2 ranks with FSDP2 (`DistributedS(fsdp=True)`, a
unit per block). Each process reports its peak resident memory (VmHWM) while training: the high-water mark is reset
at the first batch, once the model is wrapped or sharded, and read after the last. `MALLOC_MMAP_THRESHOLD_` is set so
that freed tensors go back to the system (glibc would otherwise keep large freed blocks, and the figures would show
the allocator rather than the tensors).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout without installing


# -- workers (run under torchrun, or alone for the single-process memory figure) -------------------------------------
def mlp(sizes):
    from torch import nn
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]): layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])

def speed_worker(args) -> None:
    import copy
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler
    from nntrain.core import Subscriber
    from nntrain.data import DataLoaders, TensorLoader
    from nntrain.learner import Learner
    from nntrain.subs.distributed import DistributedS, init_distributed
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(s) for s in args.sizes.split('-')]
    torch.manual_seed(0)
    n = args.bs * world * args.steps
    x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
    base = mlp(sizes)
    # the hand-written loop
    plain = DistributedDataParallel(copy.deepcopy(base)) if world > 1 else copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=0)
    def loop(epoch):
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        plain.train()
        for i in range(0, len(idx), args.bs):
            j = idx[i:i + args.bs]
            loss = F.cross_entropy(plain(x.index_select(0, j)), y.index_select(0, j))
            loss.backward()
            opt.step()
            opt.zero_grad()
    # nntrain, with DistributedS (and, alone, the same Learner without it)
    def learner(subs):
        dls = DataLoaders(TensorLoader(x, y, batch_size=args.bs, shuffle=True, seed=0), None)
        return Learner(copy.deepcopy(base), dls, F.cross_entropy, torch.optim.SGD, lr=0.01, subs=subs)
    ours = learner([DistributedS()])
    # wall-clock and process CPU time (all threads) per step, in ms: CPU time hardly depends on other processes' load
    clock = lambda: (time.perf_counter(), time.process_time())
    def record(name, start, end):
        times[name].append((end[0] - start[0]) / args.steps * 1e3)
        times[name + '_cpu'].append((end[1] - start[1]) / args.steps * 1e3)
    if world > 1:   # one fit; after each of its epochs, an epoch of the loop: interleaved, at steady state
        times = {k: [] for k in ('loop', 'loop_cpu', 'nntrain', 'nntrain_cpu')}
        class Interleave(Subscriber):
            order = 10**6   # after everything else
            def before_fit(self, learn): self.t = None
            def after_epoch(self, learn):
                dist.barrier()
                end = clock()
                if self.t is not None: record('nntrain', self.t, end)
                loop(learn.epoch)
                dist.barrier()
                self.t = clock()
                if learn.epoch: record('loop', end, self.t)   # epoch 0 warms up
        dist.barrier()
        ours.fit(args.reps + 1, valid=False, subs=[Interleave()])
    else:   # alone under torchrun: the same Learner with and without DistributedS, one fit of an epoch each, in turn
        bare = learner([])
        times = {k: [] for k in ('without', 'without_cpu', 'nntrain', 'nntrain_cpu')}
        for rep in range(args.reps + 1):
            pair = (('without', bare), ('nntrain', ours))
            for name, learn in pair if rep % 2 else pair[::-1]:   # each goes first every other time
                start = clock()
                learn.fit(1, valid=False)
                if rep: record(name, start, clock())
    if rank == 0: print('RESULT ' + json.dumps({'sizes': args.sizes, 'world': world, 'bs': args.bs, 'times': times}),
                        flush=True)

def _status(field: str) -> float:
    "A field of /proc/self/status in MB."
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'): return int(line.split()[1]) / 1024
    return float('nan')

def memory_worker(args) -> None:
    import torch
    import torch.nn.functional as F
    from nntrain.core import Subscriber
    from nntrain.data import DataLoaders, TensorLoader
    from nntrain.learner import Learner
    from nntrain.subs.distributed import DistributedS
    base_rss = _status('VmRSS')
    from torch import nn
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()) for _ in range(12)]   # FSDP2's units
    model = nn.Sequential(*blocks, nn.Linear(2048, 10))
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(64, 2048), torch.randint(0, 10, (64,))
    subs = [] if args.mode == 'single' else [DistributedS(fsdp=args.mode == 'fsdp')]

    class HighWater(Subscriber):
        "Reset the peak-memory mark at the first batch (the model is wrapped or sharded by then); read it at the end."
        def before_batch(self, learn):
            if learn.iter == 0:
                with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        def after_fit(self, learn): self.peak, self.rss = _status('VmHWM'), _status('VmRSS')
    hw = HighWater()
    dls = DataLoaders(TensorLoader(x, y, batch_size=8, shuffle=True, seed=0), None)
    learn = Learner(model, dls, F.cross_entropy, torch.optim.AdamW, lr=1e-4, subs=subs + [hw])
    built_rss = _status('VmRSS')
    learn.fit(1, valid=False, n_batches=3)
    mine = {'mode': args.mode, 'rank': int(os.environ.get('RANK', 0)), 'params_mb': n_params * 4 / 2**20,
            'base': base_rss, 'built': built_rss, 'peak': hw.peak, 'end': hw.rss}
    rows = [mine]
    if args.mode != 'single':   # rank 0 prints every rank's figures: one line, not two printed over each other
        from nntrain.subs.distributed import all_gather_objects
        rows = all_gather_objects(mine)
    if mine['rank'] == 0:
        for row in rows: print('RESULT ' + json.dumps(row), flush=True)


# -- the launcher -----------------------------------------------------------------------------------------------------
def _run(cmd, env=None, timeout=900) -> list[dict]:
    env = {**os.environ, **(env or {})}
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0: sys.exit(f'{" ".join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return [json.loads(line[len('RESULT '):]) for line in p.stdout.splitlines() if line.startswith('RESULT ')]

def _torchrun(n: int, *args) -> list[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n), __file__, *args]

def speed(reps: int, steps: int) -> None:
    print(f'\n## speed: ms/step, median [min-max] over {reps} interleaved epochs of {steps} steps (alone: {4 * steps}; '
          'rank 0, gloo)\n')
    print('| model | batch per rank | ranks | reference | reference ms/step | nntrain + DistributedS ms/step | '
          'ratio, median [range] | CPU-time ratio, median [range] | target |')
    print('|---|---|---|---|---|---|---|---|---|')
    # alone, each repetition is a whole fit (its set-up included): 4 times as many steps, so it is not all set-up
    cases = [('784-512-512-10', 2, 1.05, steps), ('784-50-10', 2, 1.10, steps), ('784-512-512-10', 1, 1.02, 4 * steps)]
    for sizes, world, target, n_steps in cases:
        res = _run(_torchrun(world, '--worker', 'speed', '--sizes', sizes, '--bs', '64', '--steps', str(n_steps),
                             '--reps', str(reps)))[0]
        ref, what = ('loop', 'hand-written DDP loop') if world > 1 else ('without', 'the Learner without it')
        t = res['times']
        ratio = lambda a, b: [y / x for x, y in zip(t[a], t[b])]
        fmt = lambda ts, d=2: f'{statistics.median(ts):.{d}f} [{min(ts):.{d}f}-{max(ts):.{d}f}]'
        wall, cpu = ratio(ref, 'nntrain'), ratio(ref + '_cpu', 'nntrain_cpu')
        print(f'| MLP {sizes} | 64 | {world} | {what} | {fmt(t[ref])} | {fmt(t["nntrain"])} | '
              f'**{statistics.median(wall):.3f}** [{min(wall):.2f}-{max(wall):.2f}] | {fmt(cpu, 3)} | ≤ {target} |')

def memory() -> None:
    env = {'MALLOC_MMAP_THRESHOLD_': '65536'}   # freed tensors return to the system: RSS follows live tensors
    rows = _run([sys.executable, __file__, '--worker', 'memory', '--mode', 'single'], env)
    for mode in ('ddp', 'fsdp'): rows += _run(_torchrun(2, '--worker', 'memory', '--mode', mode), env)
    print(f'\n## memory: peak resident memory per process while training (MiB; a {rows[0]["params_mb"]:.0f} MiB model, '
          'AdamW)\n')
    print('| setup | processes | before the model (torch imported) | peak while training, per process | '
          'of which above the empty process |')
    print('|---|---|---|---|---|')
    names = {'single': 'one process', 'ddp': 'DDP (DistributedS())', 'fsdp': 'FSDP2 by block (DistributedS(fsdp=True))'}
    for mode in ('single', 'ddp', 'fsdp'):
        rs = [r for r in rows if r['mode'] == mode]
        peak = ' / '.join(f'{r["peak"]:.0f}' for r in rs)
        above = ' / '.join(f'{r["peak"] - r["base"]:.0f}' for r in rs)
        print(f'| {names[mode]} | {len(rs)} | {statistics.mean(r["base"] for r in rs):.0f} | {peak} | {above} |')

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--only', choices=['speed', 'memory'])
    ap.add_argument('--reps', type=int, default=15, help='timed epochs per case (after one warm-up)')
    ap.add_argument('--worker', choices=['speed', 'memory'], help=argparse.SUPPRESS)
    ap.add_argument('--sizes', default='784-512-512-10', help=argparse.SUPPRESS)
    ap.add_argument('--bs', type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument('--steps', type=int, default=100, help='optimizer steps per epoch')
    ap.add_argument('--mode', default='single', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == 'speed': return speed_worker(args) or 0
    if args.worker == 'memory': return memory_worker(args) or 0
    import torch
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs; gloo')
    if args.only in (None, 'speed'): speed(args.reps, args.steps)
    if args.only in (None, 'memory'): memory()
    return 0

if __name__ == '__main__':
    sys.exit(main())
