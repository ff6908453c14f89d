"""Distributed training on CPU with gloo: `torchrun` runs tests/dist_scripts/scenarios.py.

Five launches (~10 s each just to start): every ordinary scenario on 2 ranks; a run under `--max-restarts 1` whose
rank 1 is killed and that resumes by itself; an error on one rank; a hang on one rank; one rank alone. Each rank saves
what it saw; the single-process references are computed here.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nntrain.state import read_checkpoint
from nntrain.subs.checkpoint import CheckpointS, latest_checkpoint, run_folders
from nntrain.subs.distributed import DistributedS, consolidate
from nntrain.subs.metrics import MetricsS
from nntrain.subs.training import GradAccumS
from tests.dist_scripts.scenarios import data, learner, momentum, storage_bytes, weights
from torcheval.metrics import MulticlassAccuracy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'tests' / 'dist_scripts' / 'scenarios.py'
_DIST_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK', 'MASTER_ADDR',
             'MASTER_PORT', 'TORCHELASTIC_RUN_ID')

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason='needs gloo')

def launch(group: str, out: Path, timeout: int = 120, ranks: int = 2, args=()) -> tuple[int, str, float]:
    "Run GROUP's scenarios on `ranks` ranks: (exit code, output, time it ended). A hang fails the test, never blocks."
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])   # this checkout's nntrain
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(ranks), *args,
           str(SCRIPT), group, str(out)]
    try: p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'{group}: the distributed run hung for {timeout} s:\n{e.stdout}\n{e.stderr}')
    return p.returncode, p.stdout + p.stderr, time.time()

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    # the agent checks its workers every 3 s: rank 0 outlives rank 1's kill long enough to write interrupted.pt
    restart = launch('restart', out, timeout=180, args=('--max-restarts', '1', '--monitor-interval', '3'))
    main = launch('main', out)
    fail = launch('fail', out, timeout=60)
    hang = launch('hang', out, timeout=90)
    alone = launch('alone', out, ranks=1)
    for name, run in (('main', main), ('restart', restart), ('alone', alone)): assert run[0] == 0, run[1][-5000:]
    ranks = [torch.load(out / f'main-rank{r}.pt', weights_only=False) for r in range(2)]
    return {'out': out, 'restart': restart, 'fail': fail, 'hang': hang, 'alone': alone, 'main': main, 'ranks': ranks}

def same(a: dict, b: dict) -> bool: return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
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
    assert r0['ddp_types'][0] == 'PlainKeysDDP'          # wrapped during it
    # the user's loader object is the same one, of its own class, untouched (the run iterated a shard loader)
    assert r0['loader'] == (True, 'TensorLoader', False)

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
    assert r0['dl']['sampler'] == 'RandomSampler'   # the user's DataLoader kept its sampler: the run had its own loader
    # early stopping decided the same on both ranks: 2 epochs of 3
    rows0, rows1 = r0['dl']['history'], r1['dl']['history']
    assert len(rows0) == len(rows1) == 4 and [r['loss'] for r in rows0] == [r['loss'] for r in rows1]
    alone = learner(16, [MetricsS(MulticlassAccuracy())])
    alone.model.load_state_dict(r0['dl']['weights'])
    row = alone.validate()   # the unpadded validation shards give the exact whole-set metrics
    assert rows0[-1]['loss'] == pytest.approx(row['loss'], abs=1e-6)
    assert rows0[-1]['multiclass_accuracy'] == pytest.approx(row['multiclass_accuracy'], abs=1e-6)
    assert 'sync_bn=True) needs the model on GPUs' in r0['sync_bn']

def test_rank0_first_and_the_timeout_set_on_its_group(runs):
    assert (runs['out'] / 'first.log').read_text().split('\n')[:4] == ['0 start', '0 end', '1 start', '1 end']
    from datetime import timedelta
    assert runs['ranks'][0]['timeout'] == runs['ranks'][1]['timeout'] == timedelta(seconds=42)

def test_grad_accum_one_allreduce_per_step(runs):
    alone = learner(16, [GradAccumS(2)])
    alone.fit(2)
    r0, r1 = runs['ranks']
    assert close(r0['accum'], weights(alone)) and same(r0['accum'], r1['accum'])
    # 32 items per rank in batches of 8: 4 micro-batches, 2 steps an epoch; the tiny model has one gradient bucket
    assert r0['accum_steps'] == 4 and r0['accum_calls'] == r1['accum_calls'] == 4
    assert close(r0['fsdp_accum'], weights(alone)) and same(r0['fsdp_accum'], r1['fsdp_accum'])   # under FSDP2 too

def test_stops_are_agreed_without_a_wait_per_step(runs):
    r0, r1 = runs['ranks']
    # no tensor read on the host inside any batch (the first of each phase aside, as tests/nosync.py defines it)
    assert r0['reads'] == r1['reads'] == []
    # a flag with every step: the ones read at a batch's start (2 of an epoch's 4; 2 more at its end) had arrived, so
    # the read did not wait (one late one is let pass: on a loaded machine a gloo thread can lag a batch). The phase
    # boundaries (4, and the fit's end) read the flags still in flight and agree once more, waiting
    for r in (r0, r1):
        at_batch = [done for where, done in r['waits'] if where == 'before_batch']
        assert len(at_batch) == 4 and sum(at_batch) >= 3, r['waits']
        assert {where for where, _ in r['waits']} == {'before_batch', '_agree'}
    # TerminateOnNaNS on every rank (DDP gives both rank 1's NaN gradients at batch 2): both stop at the start of batch
    # 4, after steps 0-3 (step 2 with the gradients it zeroed), with the same finite weights
    assert r0['nan'][:3] == r1['nan'][:3] == (0, 4, 4) and same(r0['nan'][3], r1['nan'][3])
    assert all(torch.isfinite(v).all() for v in r0['nan'][3].values())
    assert r0['cancel'] == r1['cancel'] == (0, 4, 4)    # CancelFitException on rank 0 after batch 1
    # paced flags (a flag every few steps on fast steps): later, at the same batch (or phase boundary) on both ranks
    assert r0['cancel_paced'] == r1['cancel_paced'] and r0['cancel_paced'][2] < 16
    assert r0['ctrl_c'][0] == r1['ctrl_c'][0] == 4 and 'Ctrl-C' in r0['ctrl_c'][1]   # SIGINT to rank 1 only
    # the Ctrl-C stop lands at a batch's start with every rank's random state: its interrupted.pt resumes exactly
    state = read_checkpoint(run_folders(runs['out'] / 'ctrl_c0')[-1] / 'interrupted.pt')
    assert state['exact'] and len(state['subs']['DistributedS']['rng']) == 2
    assert state['counters']['position'] == [0, True, 4]

def test_unequal_loaders_are_refused(runs):
    for r in runs['ranks']:
        assert r['uneven'].startswith('ValueError: the ranks have different numbers of training batches')
        assert '(by rank: [4, 3])' in r['uneven']
        assert r['list_loader'].startswith('TypeError: DistributedS cannot shard a list')

def test_fsdp2_shards_by_block_and_holds_no_full_copy(runs):
    r0, r1 = runs['ranks']
    # each block and the root are FSDP units; the head (a leaf layer) belongs to the root
    assert r0['fsdp_types'] == ['FSDPSequential', True, True, False]
    full = sum(v.numel() * v.element_size() for v in r0['fsdp'].values())   # 18.7 KB of fp32 weights
    # what each rank's learner can reach after a step: half the weights and half the momentum (+ the batch, a few
    # hundred bytes); plain SGD: half the weights. DDP, plain SGD: all the weights
    for r in (r0, r1):
        assert all(0.45 * full < b < 0.55 * full for b in r['fsdp_sgd_bytes'])
        assert all(0.95 * full < b < 1.05 * full for b in r['fsdp_bytes'])
        assert all(1.0 * full < b < 1.05 * full for b in r['ddp_blocks_bytes'])
    # the same optimization as one process of 16 (momentum carried from the first fit into the second)
    ref = learner(16, opt_func=momentum, blocks=True, valid_bs=7)
    ref.fit(2)
    assert close(r0['fsdp'], weights(ref)) and same(r0['fsdp'], r1['fsdp'])
    # uneven validation shards (3 and 2 batches): the rank short of a batch ran an unused forward; exact metrics
    alone = learner(16, [MetricsS(MulticlassAccuracy())], blocks=True, valid_bs=7)
    alone.model.load_state_dict(r0['fsdp'])
    row = alone.validate()
    assert r0['fsdp_validate']['loss'] == pytest.approx(row['loss'], abs=1e-6) == r1['fsdp_validate']['loss']
    assert r0['fsdp_history'][-1]['multiclass_accuracy'] == pytest.approx(row['multiclass_accuracy'], abs=1e-6)
    # options: a mixed-precision policy trains (weights kept in fp32); CPU offload needs a GPU
    assert r0['bf16'][1] == {torch.float32} and r0['bf16'][0] == pytest.approx(r1['bf16'][0])
    assert 'cpu_offload=True) keeps the shards in CPU memory' in r0['offload']

def test_sharded_checkpoints_resume_exactly_and_consolidate(runs):
    r0, r1 = runs['ranks']
    out = runs['out']
    # every 5 steps: a small file from rank 0, and a folder of shards, one file per rank (DCP)
    dcp = run_folders(out / 'dcp')[-1]   # the run's folder: every rank's run id is the job's
    files = sorted(p.name for p in dcp.iterdir())
    assert files == ['step-10.pt', 'step-10.pt.dcp', 'step-5.pt', 'step-5.pt.dcp']
    assert sorted(p.name for p in (dcp / 'step-5.pt.dcp').iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
    state = read_checkpoint(dcp / 'step-5.pt')
    assert state['model'] is None and state['sharded']['world_size'] == 2 and state['exact']
    # a fresh learner loads step 5 and resumes: bitwise the uninterrupted run (dropout: each rank's random state)
    assert same(r0['dcp_resumed'], r0['dcp_uninterrupted']) and same(r1['dcp_resumed'], r1['dcp_uninterrupted'])
    # one process cannot load the shards as they are (it is told how), and loads them consolidated
    alone = learner(8, [DistributedS(fsdp=True), CheckpointS(out / 'alone', monitor=None)], opt_func=momentum,
                    dropout=True, blocks=True)
    with pytest.raises(ValueError, match='consolidate'): alone.load(out / 'fsdp.pt')
    merged = consolidate(out / 'fsdp.pt')
    assert merged.name == 'fsdp-full.pt' and read_checkpoint(merged).get('sharded') is None
    with pytest.warns(RuntimeWarning, match='written by 2 ranks and this run has 1'): alone.load(merged)
    assert same(weights(alone), r0['dcp_uninterrupted']) and alone.global_step == 12
    assert len(alone.opt.state) == 6   # the momentum of every parameter, back in one process

def test_autoresume_after_sigkill_under_max_restarts_is_bitwise_equal(runs):
    rc, out, _ = runs['restart']
    assert rc == 0, out[-3000:]
    assert (runs['out'] / 'killed').read_text() == 'rank 1 at step 7'   # the first attempt's rank 1, SIGKILLed
    ckpt = run_folders(runs['out'] / 'ckpt')[-1]   # the restart goes on in the killed attempt's run folder
    for r in range(2):
        res = torch.load(runs['out'] / f'restart-rank{r}.pt', weights_only=False)
        assert res['attempt'] == 1 and same(res['resumed'], res['uninterrupted'])
    # the survivor (rank 0) wrote interrupted.pt while cleaning up, without rank 1's random state: marked inexact, so
    # the restart resumed from step-5.pt instead
    state = read_checkpoint(ckpt / 'interrupted.pt')
    assert state['exact'] is False and state['subs']['DistributedS']['rng'] is None
    assert state['counters']['global_step'] == 7
    assert latest_checkpoint(ckpt) == ckpt / 'step-10.pt'   # the resumed fit went on (step 10 of 12)

def test_error_on_one_rank_ends_the_job_within_seconds(runs):
    rc, out, ended = runs['fail']
    raised = float((runs['out'] / 'raised').read_text())
    assert rc != 0 and ended - raised < 15
    assert 'injected failure' in out and 'nntrain: raised in Fail.after_loss' in out

def test_a_hung_rank_is_named_with_its_stack_within_the_timeout(runs):
    rc, out, ended = runs['hang']
    start = float((runs['out'] / 'hang_start').read_text())
    assert rc != 0 and ended - start < 5 + 15   # DistributedS(timeout=5 s) after rank0_first made the group
    # rank 1 printed its stack, down to the hanging function; rank 0's error names it and where each one waited
    assert 'nntrain: rank 1 was in no collective at fit, epoch 0, train batch 2 of 4, in _hang' in out
    stack = out[out.index('nntrain: rank 1 was in no collective'):]
    assert 'in _hang' in stack and 'File "' in stack and 'line ' in stack
    assert ('nntrain: rank 0 timed out waiting in the backward pass (its gradient all-reduce); rank 1 did not '
            'arrive') in out

def test_alone_under_torchrun_nothing_is_wrapped_or_reduced(runs):
    res = torch.load(runs['out'] / 'alone-rank0.pt', weights_only=False)
    assert res['types'][0] == 'Sequential' and res['collectives'] == 0
    ref = learner(16, [MetricsS(MulticlassAccuracy())])
    ref.fit(2)
    assert same(res['weights'], weights(ref))

def test_the_group_is_destroyed_at_exit_and_nothing_aborts(runs):
    for name in ('main', 'restart', 'alone', 'fail', 'hang'):
        assert 'terminate called' not in runs[name][1]
    # each rank's last exit hook found the process group gone (nntrain's hook destroyed it), also after an error
    for name in ('main-exit0', 'main-exit1', 'restart-exit0', 'restart-exit1', 'alone-exit0', 'fail-exit1'):
        assert (runs['out'] / name).read_text() == 'False', name

def test_storage_bytes_counts_what_is_reachable():
    "The probe behind the sharding test: it finds parameters, gradients and optimizer state, each storage once."
    learn = learner(16, opt_func=momentum, blocks=True)
    n = sum(p.numel() * 4 for p in learn.model.parameters())
    assert abs(storage_bytes(learn.model) - n) < 64
    learn.fit(1, valid=False)
    assert 2 * n <= storage_bytes(learn) < 2 * n + 4096   # weights and momentum (gradients zeroed to None)
