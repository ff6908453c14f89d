"""Data loading throughput: images per second, in memory and from an image folder.

In memory (28x28 float images, one epoch per measurement, shuffled):
  (a) torch DataLoader over a TensorDataset: one __getitem__ per item, then default_collate stacks them
  (b) nntrain's TensorLoader(shuffle=True)
  (c) a bare loop: randperm once, then gather each batch with it (the same work, no framework at all)
  (c0) contiguous views x[i:i+bs] with no shuffle and no copy: the ceiling of any loader
plus TensorLoader's candidate strategies (per-batch advanced indexing, per-batch index_select, one index_select per
epoch then views), to pick the fastest.
Image folder: N generated 160-px JPEGs in class folders, DataLoaders.from_folder with 0 and 2 workers.

Repetitions are interleaved (a, b, c, b, c, a, ...: rotated) so drifting machine load hits every method alike;
medians are reported. Run:  python bench/data.py  [--n 60000 --bs 256 --reps 9 --images 2000 --device cpu]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing
from nntrain.data import DataLoaders, TensorLoader  # noqa: E402


def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


def epoch_rate(batches, n_items, device):
    "Images per second for one pass over `batches`: (by wall clock, by this process's CPU time)."
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    seen = 0
    for xb, yb in batches: seen += len(yb)
    sync(device)
    assert seen == n_items, (seen, n_items)
    return n_items / (time.perf_counter() - t0), n_items / (time.process_time() - c0)


# --- strategies for a shuffled epoch over in-memory tensors ---------------------------------------------------------

def bare_gather(x, y, bs, g):
    idx = torch.randperm(len(x), generator=g).to(x.device)
    for i in range(0, len(x), bs):
        j = idx[i:i + bs]
        yield x[j], y[j]

def bare_index_select(x, y, bs, g):
    idx = torch.randperm(len(x), generator=g).to(x.device)
    for i in range(0, len(x), bs):
        j = idx[i:i + bs]
        yield x.index_select(0, j), y.index_select(0, j)

def bare_permute_once(x, y, bs, g):
    idx = torch.randperm(len(x), generator=g).to(x.device)
    xp, yp = x.index_select(0, idx), y.index_select(0, idx)
    for i in range(0, len(x), bs): yield xp[i:i + bs], yp[i:i + bs]

def bare_views(x, y, bs, g):
    for i in range(0, len(x), bs): yield x[i:i + bs], y[i:i + bs]


def bench_memory(n, bs, reps, device, n_slow):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    xs, ys = x[:n_slow].cpu(), y[:n_slow].cpu()     # the per-item path is slow: a subset gives the same rate
    tl = TensorLoader(x, y, batch_size=bs, shuffle=True, seed=0)
    tl8 = TensorLoader((x * 255).to(torch.uint8), y, batch_size=bs, shuffle=True, seed=0)
    gen = torch.Generator().manual_seed(0)
    torch_dl = DataLoader(TensorDataset(xs, ys), batch_size=bs, shuffle=True, generator=gen)
    methods = {
        '(a) torch DataLoader, per-item collate': (lambda: torch_dl, n_slow),
        '(b) nntrain TensorLoader': (lambda: tl, n),
        '(c) bare loop: randperm + index_select': (lambda: bare_index_select(x, y, bs, g), n),
        '    bare loop: randperm + gather x[j]': (lambda: bare_gather(x, y, bs, g), n),
        '    bare loop: permute once + views': (lambda: bare_permute_once(x, y, bs, g), n),
        '(c0) contiguous views, no shuffle': (lambda: bare_views(x, y, bs, g), n),
        '    TensorLoader, images stored as uint8': (lambda: tl8, n),
    }
    for make, m in methods.values(): epoch_rate(make(), m, device)          # warm-up
    rates, names = {k: [] for k in methods}, list(methods)
    for rep in range(reps):   # rotate the order too, so no method always runs right after the same other one
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            make, m = methods[k]
            rates[k].append(epoch_rate(make(), m, device))
    return {k: tuple(statistics.median(r[i] for r in v) for i in (0, 1)) for k, v in rates.items()}


# --- image folder -------------------------------------------------------------------------------------------------

def make_jpegs(root: Path, n: int, n_classes: int = 10, seed: int = 0):
    "n photo-like JPEGs, 160 px on the short side (like imagenette2-160), in train/ and val/ class folders."
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:160, 0:213].astype(np.float32)
    bases = [np.stack([np.sin(xx * a + yy * b), np.cos(yy * c), np.sin((xx + yy) * (a + c))], -1) * 100 + 128
             for a, b, c in rng.random((8, 3)) * 0.05]
    noise = rng.normal(0, 12, (320, 426, 3)).astype(np.float32)     # random crops of one field: cheap variety
    for i in range(n):
        split = 'val' if (i // n_classes) % 5 == 0 else 'train'
        d = root / split / f'class{i % n_classes}'
        d.mkdir(parents=True, exist_ok=True)
        r, c = rng.integers(0, 160), rng.integers(0, 213)
        img = np.clip(bases[i % 8] + noise[r:r + 160, c:c + 213], 0, 255).astype(np.uint8)
        if i % 2: img = img.transpose(1, 0, 2)       # portrait and landscape, as in the real archives
        Image.fromarray(img).save(d / f'{i}.JPEG', quality=90)


def bench_folder(n_images, bs, reps, workers=(0, 2)):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_jpegs(Path(tmp), n_images)
        print(f'  generated {n_images} JPEGs in {time.perf_counter() - t0:.1f}s')
        loaders = {w: DataLoaders.from_folder(tmp, size=160, batch_size=bs, num_workers=w, pin_memory=False).train
                   for w in workers}
        n_train = len(loaders[workers[0]].dataset)
        for dl in loaders.values(): epoch_rate(dl, n_train, 'cpu')           # warm-up (starts persistent workers)
        rates = {w: [] for w in workers}
        for _ in range(reps):
            for w, dl in loaders.items(): rates[w].append(epoch_rate(dl, n_train, 'cpu')[0])   # wall: workers count
        return {w: statistics.median(v) for w, v in rates.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=60000, help='in-memory images (28x28)')
    p.add_argument('--n-slow', type=int, default=10000, help='images per epoch for the per-item DataLoader')
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--reps', type=int, default=9)
    p.add_argument('--images', type=int, default=2000, help='JPEGs in the generated image folder (0: skip)')
    p.add_argument('--folder-reps', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: the loop under test is serial)')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, batch size {a.bs}')
    print(f'in memory: {a.n} images 1x28x28 float32, {a.reps} interleaved reps, median images/s '
          f'by wall clock and by process CPU time (steadier on a shared machine)')
    r = bench_memory(a.n, a.bs, a.reps, a.device, min(a.n_slow, a.n))
    print(f'  {"":42s} {"wall":>14s} {"cpu":>14s}')
    for k, (w, c) in r.items(): print(f'  {k:42s} {w:14,.0f} {c:14,.0f}')
    ra, rb, rc = (r[k] for k in list(r)[:3])
    for i, clock in enumerate(('wall', 'cpu')):
        print(f'  {clock:4s}: (b)/(a) = {rb[i] / ra[i]:.1f}x faster (target >= 50x);  (c)/(b) = {rc[i] / rb[i]:.2f} '
              f'(target <= 1.3)')
    if a.images:
        print(f'image folder: {a.images} generated 160-px JPEGs, Resize(160) + CenterCrop(160), '
              f'{a.folder_reps} interleaved reps, median images/s')
        for w, v in bench_folder(a.images, a.bs // 4, a.folder_reps).items(): print(f'  {w} workers {v:10,.0f}')


if __name__ == '__main__':
    main()
