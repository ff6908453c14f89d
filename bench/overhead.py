"""Framework overhead: a hand-written PyTorch loop vs nntrain doing the same work.

Both sides train and validate one epoch per repetition with the same model, initial weights, data order, optimizer,
batch-size-weighted loss and torcheval accuracy. nntrain runs with DeviceS, MetricsS and ProgressS attached
(progress output goes to /dev/null). Repetitions are interleaved (plain, nntrain, plain, ...) and medians reported.

    python bench/overhead.py            # both workloads
    python bench/overhead.py --reps 3   # quicker

Workloads:
- mlp: a tiny MLP on 8,192 + 2,048 random 784-feature rows, batch 64: overhead-dominated, reported in µs per batch.
- cnn: nntrain.models.simple_cnn on 4,000 + 1,000 28x28 images, batch 64: reported as an epoch-time ratio.

The plain loop feeds torcheval one `update` per batch, the usual way; nntrain's MetricsS buffers predictions on the
device and updates once per phase. A second plain loop with no metrics at all shows the floor.
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from nntrain.data import TensorLoader                 # noqa: E402
from nntrain.learner import Learner                   # noqa: E402
from nntrain.models import simple_cnn                  # noqa: E402
from nntrain.subs.device import DeviceS               # noqa: E402
from nntrain.subs.metrics import MetricsS             # noqa: E402
from nntrain.subs.progress import ProgressS           # noqa: E402


def loaders(x, y, n_train, bs, seed=0):
    "Fresh loaders with a fixed shuffle seed, so every repetition sees the same batches."
    return (TensorLoader(x[:n_train], y[:n_train], batch_size=bs, shuffle=True, seed=seed),
            TensorLoader(x[n_train:], y[n_train:], batch_size=2 * bs))


def plain_epoch(model, opt, train, valid, metrics=True):
    "The hand-written loop: train pass, then validation pass, with loss and accuracy per phase."
    results = []
    for dl, training in ((train, True), (valid, False)):
        model.train(training)
        acc = MulticlassAccuracy() if metrics else None
        total, count = torch.zeros(()), 0
        with torch.set_grad_enabled(training):
            for xb, yb in dl:
                preds = model(xb)
                loss = F.cross_entropy(preds, yb)
                if training:
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                if metrics:
                    total += loss.detach() * len(yb)
                    count += len(yb)
                    acc.update(preds.detach(), yb)
        if metrics: results.append(((total / count).item(), acc.compute().item()))
    return results


def bench(name, make_model, x, y, n_train, bs, reps, lr=1e-3):
    torch.manual_seed(0)
    init = make_model()
    plain_model = copy.deepcopy(init)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=lr)
    nn_model = copy.deepcopy(init)
    learn = Learner(nn_model, loaders(x, y, n_train, bs), F.cross_entropy, torch.optim.Adam, lr,
                    subs=[DeviceS('cpu'), MetricsS(accuracy=MulticlassAccuracy()), ProgressS()])
    n_batches = sum(len(dl) for dl in loaders(x, y, n_train, bs))
    times = {'plain': [], 'plain, no metrics': [], 'nntrain': []}
    devnull = open(os.devnull, 'w')

    def run(kind):
        train, valid = loaders(x, y, n_train, bs)
        start = time.perf_counter()
        if kind == 'nntrain':
            learn.dls.train, learn.dls.valid = train, valid
            with contextlib.redirect_stdout(devnull): learn.fit(1)
        else: plain_epoch(plain_model, plain_opt, train, valid, metrics=kind == 'plain')
        return time.perf_counter() - start

    for kind in times: run(kind)                     # warm-up: allocator, first-call costs
    for r in range(reps):
        kinds = list(times) if r % 2 == 0 else list(reversed(times))
        for kind in kinds: times[kind].append(run(kind))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # Each repetition runs the loops back to back: the ratio within a repetition cancels slow drift in machine speed.
    paired = {k: statistics.median(t / p for t, p in zip(v, times['plain'])) for k, v in times.items()}
    print(f'\n## {name}: {n_batches} batches per epoch (train + valid), {reps} interleaved repetitions')
    print('| loop | median epoch (s) | best epoch (s) | µs per batch (median) | ratio to plain (median of paired) |')
    print('|---|---|---|---|---|')
    for k in times:
        print(f'| {k} | {med[k]:.3f} | {best[k]:.3f} | {1e6 * med[k] / n_batches:.0f} | {paired[k]:.3f} |')
    print(f'nntrain vs the plain loop: {1e6 * (med["nntrain"] - med["plain"]) / n_batches:+.1f} µs per batch (medians),'
          f' {1e6 * (best["nntrain"] - best["plain"]) / n_batches:+.1f} µs (best of each)')
    return med


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--only', choices=['mlp', 'cnn'])
    args = p.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs')
    if args.only in (None, 'mlp'):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(10240, 784, generator=g), torch.randint(0, 10, (10240,), generator=g)
        bench('tiny MLP (784-50-10)', lambda: nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10)),
              x, y, 8192, 64, args.reps)
    if args.only in (None, 'cnn'):
        from nntrain.datasets import mnist_sample
        xt, yt, xv, yv = mnist_sample()
        bench('small CNN (simple_cnn, 28x28)', simple_cnn, torch.cat([xt, xv]), torch.cat([yt, yv]), 4000, 64,
              args.reps)


if __name__ == '__main__': main()
