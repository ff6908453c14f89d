"GANS: alternating critic and generator batches, both optimizers in checkpoints, exact resume, mixed precision."
from functools import partial

import pytest
import torch
from torch import nn

from nntrain.core import Order, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.state import read_checkpoint
from nntrain.subs.checkpoint import CheckpointS, latest_checkpoint
from nntrain.subs.gan import GANModule, GANS, gan_splitter
from nntrain.subs.precision import MixedPrecisionS

TARGET = torch.tensor([2., -1.])


def toy_gan() -> GANModule:
    "Batch norm in the generator (buffers), dropout in the critic (random draws): both must resume exactly."
    gen = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    crit = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(16, 1))
    return GANModule(gen, crit, noise_size=2)


adam = partial(torch.optim.Adam, betas=(0.5, 0.999))   # the usual GAN setting: less momentum


def make_learner(*subs, gans=None, n=256, bs=32, lr=1e-2):
    "The same run every time it is called, as a script started twice would be."
    set_seed(0)
    x = torch.randn(n + 64, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + TARGET
    dls = DataLoaders.from_tensors(x[:n], None, x[n:], None, batch_size=bs, seed=0)   # batches (x,): no targets
    gans = GANS(adam, crit_lr=lr) if gans is None else gans
    return Learner(toy_gan(), dls, None, adam, lr, [gans, *subs], splitter=gan_splitter)


def gans_of(learn) -> GANS: return next(s for s in learn.subs if isinstance(s, GANS))


def tensors(state) -> list:
    "Every tensor in a (nested) state, in order."
    if isinstance(state, torch.Tensor): return [state]
    if isinstance(state, dict): return [t for k in sorted(state, key=str) for t in tensors(state[k])]
    if isinstance(state, (list, tuple)): return [t for v in state for t in tensors(v)]
    return []


def same(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))


class Watch(Subscriber):
    "Which network each optimizer step changed."
    def __init__(self): self.seen = []
    def before_batch(self, learn): self.before = {k: v.clone() for k, v in learn.model.named_parameters()}
    def after_step(self, learn):
        params = learn.model.named_parameters()
        self.seen.append({k.split('.')[0] for k, v in params if not torch.equal(v, self.before[k])})


class SaveAt(Subscriber):
    "Save the learner after optimizer step `at`, as a step checkpoint would, and go on."
    order = Order.CHECKPOINT
    def __init__(self, at, path): self.at, self.path = at, path
    def after_batch(self, learn):
        if learn.training and learn.global_step == self.at: learn.save(self.path)


def test_trains_alternating_one_network_per_step():
    watch = Watch()
    make_learner(watch, gans=GANS(adam, crit_lr=1e-2, n_crit=2)).fit(2)
    assert watch.seen == ([{'critic'}, {'critic'}, {'generator'}] * 6)[:16]   # 2 epochs of 8 steps
    learn = make_learner(n=512, bs=16, lr=2e-3)
    before = learn.infer(learn.model.noise(512)).mean(0)
    learn.fit(5)
    after = learn.infer(learn.model.noise(512)).mean(0)
    assert (after - TARGET).norm() < (before - TARGET).norm() / 2      # the fakes moved to the real points
    assert all(p.grad is None for p in learn.model.parameters())        # both optimizers' gradients emptied
    for row in learn.history:
        assert list(row) == ['epoch', 'phase', 'loss', 'crit_loss', 'gen_loss', 'time']
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ('loss', 'crit_loss', 'gen_loss'))
    valid = learn.history[-1]
    assert valid['loss'] == valid['crit_loss']                          # validation: the critic's loss


def test_checkpoints_hold_both_optimizers(tmp_path):
    learn = make_learner(CheckpointS(tmp_path, every=4))   # the last one: after step 16, the fit's end
    learn.fit(2)
    state = read_checkpoint(latest_checkpoint(tmp_path))               # weights_only=True
    gen, crit = learn.model.generator, learn.model.critic
    assert len(state['opt']['state']) == len(list(gen.parameters()))
    assert len(state['subs']['GANS']['crit_opt']['state']) == len(list(crit.parameters()))
    assert same(state['subs']['GANS']['crit_opt'], gans_of(learn).crit_opt.state_dict())
    assert same(state['opt'], learn.opt.state_dict())


@pytest.mark.parametrize('at', [3, 6, 8, 13])   # after a critic step, after a generator step, an epoch's end, later
def test_resume_is_exact(tmp_path, at):
    reference = make_learner()
    reference.fit(3)
    make_learner().fit(3, subs=[SaveAt(at, tmp_path / 'mid.pt')])
    resumed = make_learner().load(tmp_path / 'mid.pt')
    assert resumed.global_step == at
    resumed.fit(3, resume=True)
    assert resumed.global_step == reference.global_step
    assert same(resumed.model.state_dict(), reference.model.state_dict())
    assert same(resumed.opt.state_dict(), reference.opt.state_dict())
    assert same(gans_of(resumed).crit_opt.state_dict(), gans_of(reference).crit_opt.state_dict())
    for r, s in zip(resumed.history, reference.history, strict=True):
        assert list(r) == list(s)
        assert [r[k] for k in ('crit_loss', 'gen_loss')] == pytest.approx([s[k] for k in ('crit_loss', 'gen_loss')])


def test_resume_from_checkpoint_files_after_a_stop(tmp_path):
    reference = make_learner()
    reference.fit(3)

    class Stop(Subscriber):
        def after_batch(self, learn):
            if learn.global_step == 11: raise KeyboardInterrupt('stop')
    with pytest.raises(KeyboardInterrupt):
        make_learner(CheckpointS(tmp_path, every=1)).fit(3, subs=[Stop()])
    resumed = make_learner(CheckpointS(tmp_path, every=1))
    resumed.fit(3, resume='auto')
    assert same(resumed.model.state_dict(), reference.model.state_dict())
    assert same(gans_of(resumed).crit_opt.state_dict(), gans_of(reference).crit_opt.state_dict())


def test_bf16_autocast_wraps_the_gan_steps():
    class Dtype(Subscriber):
        def after_predict(self, learn): self.dtype = learn.out['fake_scores'].dtype
    dtype = Dtype()
    learn = make_learner(MixedPrecisionS('bf16'), dtype)
    learn.fit(1)
    assert dtype.dtype == torch.bfloat16
    assert torch.isfinite(torch.tensor(learn.history[-2]['gen_loss']))
    loop = dict(learn.show_training_loop().rows)
    assert loop['predict()'] == 'GANS (around it: MixedPrecisionS)'
    assert loop['step()'].startswith('GANS')


def test_fp16_is_refused_before_anything_changes():
    learn = make_learner(MixedPrecisionS('fp16'))
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='GANS cannot train in fp16.*bf16'):
        learn.fit(1)
    assert learn.opt is None and gans_of(learn).crit_opt is None and learn.global_step == 0 and not learn.history
    assert same(learn.model.state_dict(), weights)


def test_refusals():
    set_seed(0)
    x = torch.randn(64, 2)
    dls = DataLoaders.from_tensors(x, None, x, None, batch_size=16)
    with pytest.raises(ValueError, match='splitter=gan_splitter'):
        Learner(toy_gan(), dls, None, torch.optim.Adam, 1e-2, [GANS()]).fit(1)
    with pytest.raises(TypeError, match='GANS trains a GANModule'):
        Learner(nn.Linear(2, 2), dls, None, torch.optim.Adam, 1e-2, [GANS()]).fit(1)
    with pytest.raises(TypeError, match='crit_opt_func'): GANS(torch.optim.Adam(nn.Linear(1, 1).parameters()))
    with pytest.raises(ValueError, match='crit_lr'): GANS(crit_lr=0)
    with pytest.raises((TypeError, ValueError), match='n_crit'): GANS(n_crit=0)


def test_validate_infer_and_a_fresh_critic_optimizer_with_reset_opt():
    learn = make_learner()
    row = learn.validate()                                            # before any fit: no optimizer needed
    assert {'crit_loss', 'gen_loss'} <= set(row) and gans_of(learn).crit_opt is None
    learn.fit(1)
    gans = gans_of(learn)
    crit_opt = gans.crit_opt
    learn.fit(1)
    assert gans.crit_opt is crit_opt                                  # kept across fits, as learn.opt is
    learn.fit(1, reset_opt=True)
    assert gans.crit_opt is not crit_opt and gans.crit_opt.param_groups[0]['lr'] == 1e-2
    z = learn.model.noise(8)
    learn.model.eval()
    with torch.no_grad(): expected = learn.model.generator(z)
    assert torch.equal(learn.infer(z), expected)                      # predictions run the generator
