"""Epoch time and peak GPU memory of fp32, bf16 and fp16 training with the Learner (CUDA only).

Trains torchvision's `resnet18` (10 classes) on random 3×64×64 images held on the GPU, one warm-up epoch and then
`--epochs` timed training epochs per setting, and prints a table (and, with `--json`, writes the rows to a file).

    python bench/precision.py                       # fp32, bf16, fp16
    python bench/precision.py --channels-last       # the same with ChannelsLastS
    python bench/precision.py --compile             # the same with CompileS() (compilation happens in the warm-up)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing
from nntrain.core import set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.precision import ChannelsLastS, CompileS, MixedPrecisionS


def run(precision: str, n: int, bs: int, epochs: int, channels_last: bool, compile_model: bool) -> dict:
    "Train one fresh resnet18 in `precision`; return the mean epoch time (s), images/s and peak memory (MiB)."
    from torchvision.models import resnet18
    set_seed(0)
    x = torch.randn(n, 3, 64, 64, device='cuda')
    y = torch.randint(0, 10, (n,), device='cuda')
    model = resnet18(num_classes=10).cuda()
    dls = DataLoaders.from_tensors(x, y, x[:bs], y[:bs], batch_size=bs, drop_last=True, seed=0)
    subs = [] if precision == 'fp32' else [MixedPrecisionS(precision)]
    if channels_last: subs.append(ChannelsLastS())
    if compile_model: subs.append(CompileS())
    learn = Learner(model, dls, F.cross_entropy, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9), lr=0.01, subs=subs)
    learn.fit(1, valid=False)   # warm-up: cuDNN autotuning, allocator, compilation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    learn.fit(epochs, valid=False)
    torch.cuda.synchronize()
    secs = (time.perf_counter() - start) / epochs
    return dict(precision=precision, channels_last=channels_last, compile=compile_model, epoch_s=round(secs, 4),
                img_per_s=round(len(dls.train) * bs / secs), peak_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                final_loss=float(learn.loss.detach()) if learn.loss is not None else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=8192, help='training images')
    ap.add_argument('--bs', type=int, default=256, help='batch size')
    ap.add_argument('--epochs', type=int, default=3, help='timed epochs per setting')
    ap.add_argument('--precisions', default='fp32,bf16,fp16')
    ap.add_argument('--channels-last', action='store_true')
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--json', default=None, help='also write the rows to this file')
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print('bench/precision.py needs a CUDA GPU: mixed-precision speed and torch.cuda.max_memory_allocated '
              'are only meaningful there. Nothing was measured.', file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f'{torch.cuda.get_device_name()} · torch {torch.__version__} · resnet18, {args.n} images 3×64×64, '
          f'bs {args.bs}, {args.epochs} timed epochs · tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, '
          f'tf32 cudnn {torch.backends.cudnn.allow_tf32}')
    rows = []
    for p in args.precisions.split(','):
        if p == 'bf16' and not torch.cuda.is_bf16_supported():
            print('bf16: not supported on this GPU, skipped'); continue
        rows.append(run(p, args.n, args.bs, args.epochs, args.channels_last, args.compile))
        torch.cuda.empty_cache()
    base = next((r for r in rows if r['precision'] == 'fp32'), rows[0])
    print(f'{"precision":<10}{"epoch (s)":>10}{"img/s":>10}{"speed-up":>10}{"peak MiB":>10}{"memory":>8}')
    for r in rows:
        print(f'{r["precision"]:<10}{r["epoch_s"]:>10.3f}{r["img_per_s"]:>10}{base["epoch_s"] / r["epoch_s"]:>9.2f}x'
              f'{r["peak_mib"]:>10}{r["peak_mib"] / base["peak_mib"]:>7.2f}x')
    if args.json:
        with open(args.json, 'w') as f: json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
