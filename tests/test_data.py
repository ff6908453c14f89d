"Data: IDX files, the dataset cache and downloads (no network), folder and Hugging Face loaders."
import gzip
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
    for name, n in zip(NAMES, (n_train, n_train, n_valid, n_valid)):
        a = rng.integers(0, 256, (n, 28, 28)) if 'images' in name else rng.integers(0, 10, n)
        arrays[name] = a.astype(np.uint8)
        write_idx(folder / (name if gz else name[:-3]), arrays[name], compress=gz)
    return arrays


# --- IDX --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', ['u1', 'i1', '>i2', '>i4', '>f4', '>f8'])
@pytest.mark.parametrize('gz', [True, False])
def test_idx_round_trip_every_type(tmp_path, dtype, gz):
    a = (np.arange(60) - 7).reshape(3, 4, 5).astype(dtype) if dtype != 'u1' else np.arange(60, dtype='u1').reshape(3, 4, 5)
    b = read_idx(write_idx(tmp_path / 'x.idx', a, compress=gz))
    assert b.shape == (3, 4, 5) and b.dtype == a.dtype.newbyteorder('=') and (b == a).all()


def test_idx_header_bytes_are_the_official_layout(tmp_path):
    # MNIST labels: magic 0x00000801, then the count, big-endian.
    p = write_idx(tmp_path / 'l.idx', np.array([3, 1, 4], dtype=np.uint8), compress=False)
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])
    # A file written by hand, not by write_idx, reads the same: int32, 2-d, big-endian.
    raw = bytes([0, 0, 0x0C, 2, 0, 0, 0, 1, 0, 0, 0, 2]) + (258).to_bytes(4, 'big') + (-1).to_bytes(4, 'big', signed=True)
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
