"ProgressS in a real terminal: a script run under a pseudo-terminal, as a user (or torchrun) runs it."
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = f'''import sys
sys.path.insert(0, {str(REPO)!r})
import nntrain
assert nntrain.__file__.startswith({str(REPO)!r}), nntrain.__file__
from nntrain.core import Subscriber
from nntrain.subs.metrics import MetricsS
from nntrain.subs.progress import ProgressS
from nntrain.testing import tiny_classifier
print('TTY' if sys.stdout.isatty() else 'PIPE', flush=True)
learn = tiny_classifier(subs=[MetricsS(), ProgressS()])
learn.fit(3)
print('FIRST FIT DONE')
class Stop(Subscriber):
    def after_batch(self, learn):
        if learn.epoch == 1 and learn.iter == 1: raise KeyboardInterrupt('stopped here')
try: learn.fit(4, subs=[Stop()])
except KeyboardInterrupt: print('STOPPED')
'''


def run_in_terminal(script: str, timeout: float = 120) -> str:
    "Run `script` with a pseudo-terminal as its stdout and stderr; return everything it wrote."
    main, child = pty.openpty()
    env = {**os.environ, 'COLUMNS': '120', 'TERM': 'xterm'}
    proc = subprocess.Popen([sys.executable, '-c', script], stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            env=env, cwd=REPO)
    os.close(child)
    out = b''
    try:
        while True:
            ready, _, _ = select.select([main], [], [], timeout)
            if not ready: raise TimeoutError(out.decode(errors='replace')[-2000:])
            try: data = os.read(main, 4096)
            except OSError: break   # the child closed the terminal (EIO)
            if not data: break
            out += data
    finally:
        os.close(main)
        proc.wait(30)
    assert proc.returncode == 0, out.decode(errors='replace')[-3000:]
    return out.decode(errors='replace')


@pytest.fixture(scope='module')
def terminal_output():
    out = run_in_terminal(SCRIPT)
    assert out.lstrip().startswith('TTY'), out[:200]
    return out


def _labels(text: str) -> list[tuple[int, int, str]]:
    return [(int(e), int(n), p) for e, n, p in re.findall(r'Epoch (\d+)/(\d+) (train|valid)', text)]


def test_label_advances_with_the_epoch(terminal_output):
    labels = _labels(terminal_output.split('FIRST FIT DONE')[0])
    # each epoch's bars carry its own number: 1/3, then 2/3, then 3/3, for a train bar and a valid bar each
    assert sorted(set(labels)) == [(e, 3, p) for e in (1, 2, 3) for p in ('train', 'valid')], set(labels)
    assert [e for e, _, _ in labels] == sorted(e for e, _, _ in labels)


def test_rows_printed_once_per_epoch(terminal_output):
    lines = terminal_output.split('FIRST FIT DONE')[0].replace('\r', '\n').splitlines()
    rows = [l.split()[0] for l in lines if re.match(r'\s*\d+\s+\d\.\d{4}\s', l)]
    assert rows == ['0', '1', '2']


def test_a_stopped_fit_counts_to_where_it_stopped(terminal_output):
    labels = set(_labels(terminal_output.split('FIRST FIT DONE')[1].split('STOPPED')[0]))
    assert labels == {(1, 4, 'train'), (1, 4, 'valid'), (2, 4, 'train')}, labels


def test_a_pipe_gets_the_rows_and_no_bars():
    "Under a pipe (a log file, CI, a launcher that captures output) bars would be one line per refresh: none."
    done = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith('PIPE') and '\r' not in out and 'Epoch' not in out and '█' not in out, out[:500]
    first = out.split('FIRST FIT DONE')[0].splitlines()
    assert first[1].split() == ['epoch', 'train_loss', 'valid_loss', 'time']
    assert [l.split()[0] for l in first[2:]] == ['0', '1', '2']
