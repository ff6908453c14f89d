"""The code of the post "nntrain (4/n)" (shared/seeds/003) runs with only its import lines changed (issue 10).

The post trains on Fashion-MNIST from the Hugging Face hub; here the same calls run on a `datasets.DatasetDict` built
from the embedded MNIST sample (a few hundred images, so it takes seconds), with the post's own code otherwise
unchanged: its hyper-parameters, its subscribers, its helpers.
"""
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torcheval.metrics as tem
from torchvision import transforms

# The import lines: the post imported from nntrain.dataloaders, nntrain.learner and nntrain.activations.
from nntrain.all import (DataLoaders, hf_ds_collate_fn, Learner, MomentumLearner, Subscriber, NormalizationS,
                         ProgressS, MetricsS, DeviceS, SchedulerS, LRFindS, ModelMonitorS, AugmentS, ResBlock,
                         cnn_layers, resnet, init_weights, set_seed, mnist_sample)

datasets = pytest.importorskip('datasets')


def embedded_hf_dd(n_train: int = 1024, n_valid: int = 256):
    "A DatasetDict shaped like the hub's fashion_mnist (PIL `image`, int `label`), from the embedded MNIST sample."
    from PIL import Image
    xt, yt, xv, yv = mnist_sample()
    def split(x, y, n):
        imgs = [Image.fromarray((x[i, 0] * 255).round().byte().numpy(), mode='L') for i in range(n)]
        return datasets.Dataset.from_dict({'image': imgs, 'label': y[:n].tolist()},
                                          features=datasets.Features({'image': datasets.Image(),
                                                                      'label': datasets.ClassLabel(num_classes=10)}))
    return datasets.DatasetDict({'train': split(xt, yt, n_train), 'test': split(xv, yv, n_valid)})


class SGD:
    "The post's own optimizer (its code, verbatim apart from comments)."
    def __init__(self, params, lr, wd=0.):
        params = list(params)
        self.params, self.lr, self.wd, self.i = params, lr, wd, 0

    def step(self):
        with torch.no_grad():
            for p in self.params:
                self.reg_step(p)
                self.opt_step(p)
        self.i += 1

    def opt_step(self, p): p -= p.grad * self.lr
    def reg_step(self, p):
        if self.wd != 0: p *= 1 - self.lr * self.wd

    def zero_grad(self):
        for p in self.params: p.grad.data.zero_()


@pytest.fixture(scope='module')
def dls():
    bs = 64
    collate = partial(hf_ds_collate_fn, flatten=False)
    return DataLoaders.from_hf_dd(embedded_hf_dd(), batch_size=bs, collate_fn=collate)


def subscribers(dls, device='cpu'):
    xb, yb = next(iter(dls.train))
    norm = NormalizationS(xb.mean(), xb.std())
    return norm, [norm, ProgressS(True), MetricsS(accuracy=tem.MulticlassAccuracy()), DeviceS(device)]


def test_momentum_learner_with_the_posts_sgd(dls):
    set_seed(1)
    model = cnn_layers().apply(init_weights)
    _, subs = subscribers(dls)
    optim_func = partial(SGD, wd=0)
    lr = 0.4
    l = MomentumLearner(model, dls, F.cross_entropy, optim_func, lr, subs)
    l.fit(2)
    assert l.history[-1]['phase'] == 'valid' and l.history[-1]['accuracy'] > 0.5


def test_one_cycle_scheduler_lr_finder_monitor_and_augmentation(dls, capsys):
    set_seed(1)
    epochs, N = 1, len(dls.train)
    norm, subs = subscribers(dls)

    model = cnn_layers().apply(init_weights)
    lr = 6e-2
    sch = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=lr, epochs=epochs, steps_per_epoch=N)
    l = Learner(model, dls, F.cross_entropy, torch.optim.Adam, lr, subs + [SchedulerS(sch)])
    l.fit(epochs)
    assert l.history[-1]["accuracy"] > 0.2   # chance is 0.1

    model = resnet().apply(init_weights)
    lrfind = LRFindS()
    start_lr = 1e-5
    l = Learner(model, dls, F.cross_entropy, torch.optim.Adam, start_lr, [norm, DeviceS('cpu'), lrfind])
    l.fit(1)
    ax = lrfind.plot()
    assert len(lrfind.lrs) == N and ax.get_xscale() == 'log'

    model = resnet().apply(init_weights)
    modules = [module for module in model.modules() if isinstance(module, (ResBlock, nn.Linear, torch.nn.BatchNorm1d))]
    monitor = ModelMonitorS(modules)
    l = Learner(model, dls, F.cross_entropy, torch.optim.Adam, lr, [monitor])
    l.fit(1)
    table = repr(monitor)
    assert 'ResBlock' in table and 'Linear' in table and 'BatchNorm1d' in table and '1,228,404' in table
    assert l.global_step == 0   # one batch measured, then the fit was cancelled

    augs = nn.Sequential(transforms.RandomHorizontalFlip(), transforms.RandomCrop(size=28, padding=1))
    model = resnet().apply(init_weights)
    sch = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2, epochs=epochs, steps_per_epoch=N)
    l = Learner(model, dls, F.cross_entropy, torch.optim.Adam, 1e-2, subs + [SchedulerS(sch), AugmentS(augs)])
    l.fit(epochs)
    assert l.global_step == N and len(l.history) == 2


def test_the_posts_own_subscribers_still_plug_in(dls):
    "The post wrote SchedulerS itself (before_fit / after_step): a user subscriber of that shape still works."
    class PostSchedulerS(Subscriber):
        def __init__(self, scheduler_class): self.scheduler_class = scheduler_class
        def before_fit(self, learn): self.scheduler = self.scheduler_class(learn.opt)
        def after_step(self, learn): self.scheduler.step()
    set_seed(1)
    sch = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=6e-2, epochs=1, steps_per_epoch=len(dls.train))
    sub = PostSchedulerS(sch)
    l = Learner(cnn_layers().apply(init_weights), dls, F.cross_entropy, torch.optim.Adam, 6e-2, [sub])
    l.fit(1)
    assert sub.scheduler.last_epoch == len(dls.train)
