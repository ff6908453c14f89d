"""GPU acceptance checks in one command: every check that needs a GPU, in under 8 minutes, printed as one table.

    python bench/gpu_check.py          # on a machine with CUDA; exit status 1 if a check failed
    python bench/gpu_check.py          # without CUDA: prints "no GPU: skipped" and exits 0

The checks (each in a process of its own, with a time limit; the whole run stops starting checks after 7 minutes):
1. sync: each standard subscriber trains a small CNN on the GPU, data already there, with
   `torch.cuda.set_sync_debug_mode('error')` inside every batch (the first batch of each phase aside: the learner's
   input checks read labels there on purpose). A host-device synchronisation inside a batch raises, and fails it.
   `MixedPrecisionS('fp16')` (its GradScaler reads its inf check) and a checked `TerminateOnNaNS` batch sync by design
   and are left out, as in tests/test_nosync.py.
2. precision: `bench/precision.py` (fp32, bf16, fp16 on torchvision's resnet18, a reduced size), its rows.
3. channels-last and compile: `bench/precision.py --channels-last` and `--compile`, bf16.
4. nccl: `torchrun` with one rank per GPU (at most 2): `DeviceS`, `DistributedS`, `MixedPrecisionS('bf16')` train a
   small CNN with the same sync check inside batches (on 2 GPUs, DDP: the stop flags travel on a gloo group, so
   agreeing on stops must not synchronise the GPU), then `DistributedS(fsdp=True)` trains it too.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout without installing
BUDGET = 7 * 60   # seconds: no check starts after this, so the whole run stays under 8 minutes


# -- workers ----------------------------------------------------------------------------------------------------------
def _learner(subs, device='cuda', n=512):
    "A small CNN on random 3x16x16 images held on `device`."
    import torch
    import torch.nn.functional as F
    from torch import nn
    from nntrain.core import set_seed
    from nntrain.data import DataLoaders
    from nntrain.learner import Learner
    set_seed(0)
    x, y = torch.randn(n, 3, 16, 16, device=device), torch.randint(0, 10, (n,), device=device)
    dls = DataLoaders.from_tensors(x[:n - 128], y[:n - 128], x[n - 128:], y[n - 128:], batch_size=64, device=device)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    return Learner(model, dls, F.cross_entropy, torch.optim.SGD, lr=0.05, subs=list(subs))

def _sync_window():
    "Two subscribers: `set_sync_debug_mode('error')` from the first subscriber's before_batch to the last's cleanup."
    import torch
    from nntrain.core import Subscriber

    class Window(Subscriber):
        def __init__(self, order, opens): self.order, self.opens, self.checked = order, opens, set()
        def before_fit(self, learn): self.checked = set()
        def before_batch(self, learn):
            if not self.opens: return
            first = learn.training not in self.checked   # the learner's first-batch checks read labels on purpose
            self.checked.add(learn.training)
            if not first: torch.cuda.set_sync_debug_mode('error')
        def cleanup_batch(self, learn):
            if not self.opens: torch.cuda.set_sync_debug_mode(0)
    return [Window(-10**6, True), Window(10**6, False)]

def _standard():
    from torcheval.metrics import MulticlassAccuracy
    from nntrain.subs.augment import AugmentS, CutMixS, MixUpS
    from nntrain.subs.checkpoint import CheckpointS
    from nntrain.subs.device import DeviceS
    from nntrain.subs.metrics import MetricsS
    from nntrain.subs.monitor import ActivationStatsS
    from nntrain.subs.normalize import NormalizationS
    from nntrain.subs.precision import ChannelsLastS, MixedPrecisionS
    from nntrain.subs.progress import ProgressS
    from nntrain.subs.schedule import ParamSchedulerS, one_cycle_scheds
    from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
    from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
    return {
        'DeviceS': lambda: DeviceS('cuda'), 'NormalizationS': NormalizationS,
        'MetricsS': lambda: MetricsS(acc=MulticlassAccuracy()),
        'ProgressS': lambda: ProgressS(plot=True, comment_every=1e9),   # its comment is throttled, and syncs when shown
        'AugmentS': lambda: AugmentS(lambda x: x.flip(-1)), 'MixUpS': MixUpS, 'CutMixS': CutMixS,
        'MixedPrecisionS-bf16': lambda: MixedPrecisionS('bf16'),   # fp16's GradScaler reads its inf check: by design
        'ChannelsLastS': ChannelsLastS, 'GradClipS': GradClipS, 'GradAccumS': lambda: GradAccumS(2),
        'TerminateOnNaNS-unchecked': lambda: TerminateOnNaNS(check_every=10**6),   # a checked batch syncs by design
        'EMAS': EMAS, 'ParamSchedulerS': lambda: ParamSchedulerS(one_cycle_scheds(0.1)),
        'ActivationStatsS': ActivationStatsS, 'CheckpointS-epoch': lambda: CheckpointS('ck'),
        'EarlyStoppingS': EarlyStoppingS, 'CSVLoggerS': lambda: CSVLoggerS('log.csv')}

def sync_worker() -> dict:
    from nntrain.subs.metrics import MetricsS
    os.chdir(tempfile.mkdtemp())   # checkpoints and logs go to a scratch folder
    failed = {}
    for name, make in _standard().items():
        learn = _learner([MetricsS()] + _sync_window())
        try: learn.fit(2, subs=[make()])
        except Exception as e: failed[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
    return {'ok': not failed, 'detail': f'{len(_standard()) - len(failed)}/{len(_standard())} subscribers without a '
                                        'sync in batches' + ''.join(f'; {k}: {v}' for k, v in failed.items())}

def nccl_worker() -> dict:
    import torch.distributed as dist
    from nntrain.subs.device import DeviceS
    from nntrain.subs.distributed import DistributedS
    from nntrain.subs.metrics import MetricsS
    from nntrain.subs.precision import MixedPrecisionS
    ds = DistributedS()
    learn = _learner([DeviceS(), ds, MixedPrecisionS('bf16'), MetricsS()] + _sync_window())
    learn.fit(2)
    ddp = (dist.get_backend(), learn.world_size, learn.history[-1]['loss'])
    learn = _learner([DeviceS(), DistributedS(fsdp=True), MixedPrecisionS('bf16'), MetricsS()])
    learn.fit(2)
    fsdp = learn.history[-1]['loss']
    ok = ddp[0] == 'nccl' and math.isfinite(ddp[2]) and math.isfinite(fsdp)
    return {'ok': ok, 'detail': f'{ddp[0]}, {ddp[1]} rank(s), bf16: DDP valid loss {ddp[2]:.3f} (no sync in batches), '
                                f'FSDP2 valid loss {fsdp:.3f}'}


# -- the checks -------------------------------------------------------------------------------------------------------
def _run(cmd, timeout) -> tuple[int, str]:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    try: p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired: return -1, f'did not finish within {timeout:.0f} s'
    return p.returncode, p.stdout + p.stderr

def _worker_check(name, timeout, launcher=()) -> dict:
    rc, out = _run([*(launcher or [sys.executable]), __file__, '--worker', name], timeout)
    lines = [line for line in out.splitlines() if line.startswith('RESULT ')]
    if rc != 0 or not lines: return {'ok': False, 'detail': f'exit {rc}: ' + ' | '.join(out.strip().splitlines()[-3:])}
    return json.loads(lines[-1][len('RESULT '):])

def _precision_check(timeout, *extra) -> dict:
    with tempfile.TemporaryDirectory() as d:
        rc, out = _run([sys.executable, str(ROOT / 'bench' / 'precision.py'), '--n', '4096', '--bs', '256',
                        '--epochs', '1', '--json', f'{d}/rows.json', *extra], timeout)
        if rc != 0: return {'ok': False, 'detail': f'exit {rc}: ' + ' | '.join(out.strip().splitlines()[-3:])}
        rows = json.load(open(f'{d}/rows.json'))
    ok = bool(rows) and all(r['final_loss'] is not None and r['final_loss'] == r['final_loss'] for r in rows)
    return {'ok': ok, 'detail': '; '.join(f'{r["precision"]}: {r["epoch_s"]:.2f} s/epoch, {r["img_per_s"]} img/s, '
                                          f'{r["peak_mib"]} MiB' for r in rows)}

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--worker', choices=['sync', 'nccl'], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    if args.worker:
        res = sync_worker() if args.worker == 'sync' else nccl_worker()
        if int(os.environ.get('RANK', 0)) == 0: print('RESULT ' + json.dumps(res))
        return 0
    if not torch.cuda.is_available():
        print('no GPU: skipped (bench/gpu_check.py needs CUDA)')
        return 0
    n_gpus = min(2, torch.cuda.device_count())
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n_gpus)]
    checks = [('sync-free batches (set_sync_debug_mode error)', lambda t: _worker_check('sync', t), 150),
              ('precision fp32/bf16/fp16, resnet18', lambda t: _precision_check(t), 120),
              ('channels-last, bf16', lambda t: _precision_check(t, '--channels-last', '--precisions', 'bf16'), 60),
              ('torch.compile, bf16', lambda t: _precision_check(t, '--compile', '--precisions', 'bf16'), 180),
              (f'nccl, {n_gpus} rank(s), DistributedS bf16', lambda t: _worker_check('nccl', t, torchrun), 90)]
    print(f'{torch.cuda.get_device_name()} x{torch.cuda.device_count()} · torch {torch.__version__}', flush=True)
    start, rows = time.monotonic(), []
    for name, check, limit in checks:
        left = BUDGET - (time.monotonic() - start)
        if left < 20:
            rows.append((name, 'SKIP', 0., 'the 8-minute budget is spent'))
            continue
        t0 = time.monotonic()
        res = check(min(limit, left))
        rows.append((name, 'PASS' if res['ok'] else 'FAIL', time.monotonic() - t0, res['detail']))
        print(f'{name}: {rows[-1][1]} ({rows[-1][2]:.0f} s)', flush=True)
    width = max(len(r[0]) for r in rows)
    print(f'\n{"check":<{width}}  result  seconds  detail')
    for name, result, secs, detail in rows: print(f'{name:<{width}}  {result:<6}  {secs:7.0f}  {detail}')
    print(f'total {time.monotonic() - start:.0f} s')
    return int(any(r[1] == 'FAIL' for r in rows))

if __name__ == '__main__':
    sys.exit(main())
