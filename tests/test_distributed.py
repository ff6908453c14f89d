"""Distributed training on CPU with gloo: `torchrun --nproc_per_node 2` runs tests/dist_scripts/scenarios.py.

Three launches (~10 s each just to start): one killed mid-fit (for the resume), one running every other scenario, one
failing on a rank. Each rank saves what it saw; the single-process references are computed here.
"""
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nntrain.core import Subscriber
from nntrain.state import read_checkpoint
from nntrain.subs.checkpoint import CheckpointS, run_folders
from nntrain.subs.distributed import DistributedS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.training import GradAccumS
from nntrain.testing import same_state
from tests.dist_scripts.scenarios import data, learner, momentum, resume_learner, weights
from torcheval.metrics import MulticlassAccuracy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'tests' / 'dist_scripts' / 'scenarios.py'
_DIST_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK', 'MASTER_ADDR',
             'MASTER_PORT', 'TORCHELASTIC_RUN_ID')

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason='needs gloo')

def launch(group: str, out: Path, timeout: int = 120) -> tuple[int, str, float]:
    "Run GROUP's scenarios on 2 ranks; (exit code, output, time it ended). A hang fails the test, never blocks it."
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])   # this checkout's nntrain
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(SCRIPT),
           group, str(out)]
    try: p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'{group}: the distributed run hung for {timeout} s:\n{e.stdout}\n{e.stderr}')
    return p.returncode, p.stdout + p.stderr, time.time()

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    kill = launch('kill', out)           # scenario 4, first part: writes checkpoints, then SIGKILL
    main = launch('main', out)           # every other scenario; resumes from the killed run's checkpoint
    fail = launch('fail', out, timeout=60)
    assert main[0] == 0, main[1][-5000:]
    ranks = [torch.load(out / f'main-rank{r}.pt', weights_only=False) for r in range(2)]
    return {'out': out, 'kill': kill, 'fail': fail, 'ranks': ranks}

same = same_state   # keys, dtypes, shapes and bits (nntrain.testing)
def close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)

def test_two_ranks_of_8_equal_one_process_of_16(runs):
    alone = learner(16)
    alone.fit(2)
    r0, r1 = runs['ranks']
    assert close(r0['ddp'], weights(alone)) and close(r1['ddp'], weights(alone))
    assert not close(r0['ddp'], weights(learner(16)))   # it trained: the check can fail
    assert r0['model_type'] == 'Sequential'              # unwrapped after the fit; plain keys (no `module.`)
    assert list(r0['ddp']) == list(alone.model.state_dict())

def test_ranks_agree_metrics_are_exact_shards_are_disjoint(runs):
    r0, r1 = runs['ranks']
    assert same(r0['ddp'], r1['ddp'])
    assert r0['history'] == [{**row, 'time': r0['history'][i]['time']} for i, row in enumerate(r1['history'])]
    # the synced validation row is a single-process evaluation of the same model on the whole validation set
    alone = learner(16, [MetricsS(MulticlassAccuracy())])
    alone.model.load_state_dict(r0['ddp'])
    row = alone.validate()
    final = r0['history'][-1]
    assert final['phase'] == 'valid' and final['loss'] == pytest.approx(row['loss'], abs=1e-6)
    assert final['multiclass_accuracy'] == pytest.approx(row['multiclass_accuracy'], abs=1e-6)
    assert r0['validate']['loss'] == pytest.approx(row['loss'], abs=1e-6)   # validate(): the same, on every rank
    # training shards: disjoint, and together the whole set (64 items, 32 per rank)
    x = data()[0]
    idx = [[int((x == row).all(1).nonzero()) for row in r['seen']] for r in (r0, r1)]
    assert len(idx[0]) == len(idx[1]) == 32 and not set(idx[0]) & set(idx[1])
    assert sorted(idx[0] + idx[1]) == list(range(64))
    # get_preds: the whole validation set in dataset order, on every rank
    preds, targets = alone.get_preds()
    for r in (r0, r1):
        assert torch.allclose(r['preds'][0], preds, atol=1e-6) and torch.equal(r['preds'][1], targets)
    plain = learner(16).validate()['loss']
    assert r0['validate_alone']['loss'] == pytest.approx(plain, abs=1e-6) == r1['validate_alone']['loss']
    assert r0['infer'].shape == (3, 3)   # infer(x) runs locally, no collective
    assert 'lr_find runs in one process' in r0['lr_find'] and 'lr_find runs in one process' in r1['lr_find']

def test_dataloaders_get_a_distributed_sampler(runs):
    r0, r1 = runs['ranks']
    x = data()[0]
    for epoch in (0, 1):   # disjoint shards covering the set, in a new order each epoch (set_epoch)
        idx = [[int((x == row).all(1).nonzero()) for row in r['dl']['seen'][epoch]] for r in (r0, r1)]
        assert not set(idx[0]) & set(idx[1]) and sorted(idx[0] + idx[1]) == list(range(64))
    assert not torch.equal(r0['dl']['seen'][0], r0['dl']['seen'][1])
    assert r0['dl']['sampler'] == 'RandomSampler'   # put back after the fit
    # early stopping decided the same on both ranks: 2 epochs of 3
    rows0, rows1 = r0['dl']['history'], r1['dl']['history']
    assert len(rows0) == len(rows1) == 4 and [r['loss'] for r in rows0] == [r['loss'] for r in rows1]
    alone = learner(16, [MetricsS(MulticlassAccuracy())])
    alone.model.load_state_dict(r0['dl']['weights'])
    row = alone.validate()   # the unpadded validation shards give the exact whole-set metrics
    assert rows0[-1]['loss'] == pytest.approx(row['loss'], abs=1e-6)
    assert rows0[-1]['multiclass_accuracy'] == pytest.approx(row['multiclass_accuracy'], abs=1e-6)
    assert 'sync_bn=True) needs the model on GPUs' in r0['sync_bn']

def test_rank0_first(runs):
    assert (runs['out'] / 'first.log').read_text().split('\n')[:4] == ['0 start', '0 end', '1 start', '1 end']

def test_grad_accum_one_allreduce_per_step(runs):
    alone = learner(16, [GradAccumS(2)])
    alone.fit(2)
    r0, r1 = runs['ranks']
    assert close(r0['accum'], weights(alone)) and same(r0['accum'], r1['accum'])
    # 32 items per rank in batches of 8: 4 micro-batches, 2 steps an epoch; the tiny model has one gradient bucket
    assert r0['accum_steps'] == 4 and r0['accum_calls'] == r1['accum_calls'] == 4
    assert close(r0['fsdp_accum'], weights(alone)) and same(r0['fsdp_accum'], r1['fsdp_accum'])   # under FSDP2 too

def test_resume_after_sigkill_is_bitwise_equal(runs):
    rc, out, _ = runs['kill']
    assert rc != 0 and 'SIGKILL' in out
    ckpt = run_folders(runs['out'] / 'ckpt')[-1]   # the killed run's own folder (every rank's run id: the job's)
    assert sorted(p.name for p in ckpt.iterdir()) == ['step-5.pt']   # written once (main rank), before the kill
    r0, r1 = runs['ranks']
    assert same(r0['resumed'], r0['uninterrupted']) and same(r1['resumed'], r1['uninterrupted'])
    state = read_checkpoint(ckpt / 'step-5.pt')
    rngs = state['subs']['DistributedS']['rng']
    assert len(rngs) == 2 and not torch.equal(rngs[0]['torch'], rngs[1]['torch'])   # every rank's own state
    assert state['counters']['position'] == [1, True, 1]                            # mid-epoch
    # one process loads it: weights and optimizer, and a warning that the data order differs
    alone = resume_learner(runs['out'] / 'alone')
    with pytest.warns(RuntimeWarning, match='written by 2 ranks and this run has 1'): alone.load(ckpt / 'step-5.pt')
    assert same(weights(alone), state['model']) and alone.opt is not None and alone.global_step == 5

def test_error_on_one_rank_ends_the_job_within_seconds(runs):
    rc, out, ended = runs['fail']
    raised = float((runs['out'] / 'raised').read_text())
    assert rc != 0 and ended - raised < 15
    assert 'injected failure' in out and 'nntrain: raised in Fail.after_loss' in out

def test_stops_are_agreed(runs):
    r0, r1 = runs['ranks']
    # TerminateOnNaNS on rank 1 only: both ranks stop at batch 2, before its step, with the same weights
    assert r0['nan'][:3] == r1['nan'][:3] == (0, 2, 2) and same(r0['nan'][3], r1['nan'][3])
    assert all(torch.isfinite(v).all() for v in r0['nan'][3].values())
    assert r0['cancel'] == r1['cancel'] == (0, 2, 2)    # CancelFitException on rank 0 after batch 1
    assert r0['ctrl_c'][0] == r1['ctrl_c'][0] == 2 and 'Ctrl-C' in r0['ctrl_c'][1]   # SIGINT to rank 1 only

def test_unequal_loaders_are_refused(runs):
    for r in runs['ranks']:
        assert r['uneven'].startswith('ValueError: the ranks have different numbers of training batches')
        assert '(by rank: [4, 3])' in r['uneven']
        assert r['list_loader'].startswith('TypeError: DistributedS cannot shard a list')

def test_fsdp2_fits_and_saves_a_full_state_dict(runs):
    r0, r1 = runs['ranks']
    assert r0['fsdp_type'] == 'Sequential' and same(r0['fsdp'], r1['fsdp'])
    ref = learner(16, opt_func=momentum)
    ref.fit(2)
    assert close(r0['fsdp'], weights(ref))   # the same optimization as one process (momentum carried between fits)
    alone = learner(16, [DistributedS(), CheckpointS(runs['out'] / 'alone_ckpt')], opt_func=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        alone.load(runs['out'] / 'fsdp.pt')
    assert same(weights(alone), r0['fsdp'])
    buffers = [alone.opt.state[p]['momentum_buffer'] for p in alone.model.parameters()]
    assert all(torch.allclose(b, ref.opt.state[p]['momentum_buffer'], atol=1e-6)
               for b, p in zip(buffers, ref.model.parameters(), strict=True))
    # a checkpoint written mid-fit (step 6 of 8) holds the full weights and optimizer state, with plain keys
    snap = Snapshot(6)
    learner(16, [snap], opt_func=momentum).fit(2)
    fsdp_ckpt = run_folders(runs['out'] / 'fsdp_ckpt')[-1] / 'step-6.pt'
    state = read_checkpoint(fsdp_ckpt)
    assert close(state['model'], snap.weights)
    alone = learner(16, [DistributedS(), CheckpointS(runs['out'] / 'alone_ckpt')], opt_func=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        alone.load(fsdp_ckpt)
    assert same(weights(alone), state['model']) and alone.global_step == 6 and len(alone.opt.state) == 4

class Snapshot(Subscriber):
    "The weights after optimizer step `n`."
    def __init__(self, n): self.n, self.weights = n, None
    def after_step(self, learn):
        if learn.global_step == self.n: self.weights = weights(learn)
