"ProgressS, summary and show_training_loop in a real Jupyter kernel: a notebook run by nbclient, its messages read."
import asyncio
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

REPO = Path(__file__).resolve().parents[1]

SETUP = f'''import sys, time
sys.path.insert(0, {str(REPO)!r})   # this checkout, not an installed nntrain
import nntrain
assert nntrain.__file__.startswith({str(REPO)!r}), nntrain.__file__
from torcheval.metrics import MulticlassAccuracy
from nntrain.core import Subscriber
from nntrain.subs.metrics import MetricsS
from nntrain.subs.monitor import ModelMonitorS
from nntrain.summary import summary
from nntrain.subs.progress import ProgressS
from nntrain.testing import tiny_classifier'''

FIT = '''progress = ProgressS(plot=True)
progress.update_every = 0   # refresh on every batch: still one display
learn = tiny_classifier(subs=[MetricsS(accuracy=MulticlassAccuracy()), progress])
learn.fit(3)'''

SLOW_FIT = '''class Slow(Subscriber):
    "Makes the fit long enough to interrupt, and says when it is under way."
    def after_batch(self, learn):
        if learn.training and learn.global_step == 4: print('fit under way', flush=True)
        time.sleep(0.05)

learn2 = tiny_classifier(subs=[MetricsS(), ProgressS()])
learn2.fit(100, subs=[Slow()])'''

AFTER = '''n = learn2.global_step
learn2.fit(1)
print('steps', learn2.global_step - n, 'rows', len(learn2.history))'''

SLOW_CLEANUP = '''class SlowEnd(ProgressS):
    "Its final drawing takes long enough for a second Ctrl-C to land in it."
    def _end_fit(self, learn, stopped):
        print('cleaning up', flush=True)
        time.sleep(30)
        super()._end_fit(learn, stopped)

learn3 = tiny_classifier(subs=[MetricsS(), SlowEnd()])
learn3.fit(100, subs=[Slow()])'''

CELLS = [SETUP, FIT, 'progress.figure()', 'learn.summary()', 'learn.show_training_loop()', SLOW_FIT, AFTER,
         'learn.fit(1, subs=[ModelMonitorS()])', SLOW_CLEANUP]
INTERRUPT_ON = ('fit under way', 'cleaning up')   # printed by the cells: the client presses Ctrl-C once for each


class RecordingClient(nbclient.NotebookClient):
    "Keeps every message of every cell, and interrupts the kernel once per cell for each marker a cell prints."
    def __init__(self, nb, **kw):
        super().__init__(nb, **kw)
        self.msgs, self.interrupted = {}, set()

    def process_message(self, msg, cell, cell_index):
        self.msgs.setdefault(cell_index, []).append(msg)
        text = msg['content'].get('text', '') if msg['msg_type'] == 'stream' else ''
        for marker in INTERRUPT_ON:
            if marker in text and (cell_index, marker) not in self.interrupted:
                self.interrupted.add((cell_index, marker))
                asyncio.ensure_future(self.km.interrupt_kernel())   # a real SIGINT, as the stop button sends
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope='module')
def run():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in CELLS])
    client = RecordingClient(nb, timeout=120, kernel_name='python3', allow_errors=True,
                             resources={'metadata': {'path': str(REPO)}})
    # plots inline, as in Jupyter, also where the environment says MPLBACKEND=Agg (as .ci/run does)
    client.execute(env={**os.environ, 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'})
    return nb, client.msgs


def _displays(msgs, mime):
    "(display_data messages, update_display_data messages) carrying `mime`."
    pick = lambda t: [m for m in msgs if m['msg_type'] == t and mime in m['content'].get('data', {})]
    return pick('display_data'), pick('update_display_data')


def _ids(msgs): return {m['content']['transient']['display_id'] for m in msgs}


def _errors(nb, i): return [o for o in nb.cells[i].outputs if o.output_type == 'error']


def test_setup_ran_cleanly(run):
    nb, _ = run
    assert not _errors(nb, 0), _errors(nb, 0)


def test_bars_and_table_are_one_display_updated_in_place(run):
    nb, msgs = run
    assert not _errors(nb, 1)
    shown, updates = _displays(msgs[1], 'text/html')
    bars = [m for m in shown if '<progress' in m['content']['data']['text/html']]
    assert len(bars) == 1                                  # one display for bars and table ...
    bar_id = _ids(bars).pop()
    bar_updates = [m for m in updates if m['content']['transient']['display_id'] == bar_id]
    assert len(bar_updates) >= 3 * 5                       # ... refreshed on each of the 15 batches, not re-displayed
    final = bar_updates[-1]['content']['data']
    html, text, md = final['text/html'], final['text/plain'], final['text/markdown']
    assert html.count('<tr>') == 1 + 3 and 'progress-bar-interrupted"' not in html   # header + one row per epoch
    lines = text.splitlines()
    assert lines[0].startswith('epoch 100.00% [3/3') and '<' not in ''.join(lines[1:])
    assert lines[1].split() == ['epoch', 'train_loss', 'valid_loss', 'train_accuracy', 'valid_accuracy', 'time']
    assert [l.split()[0] for l in lines[2:]] == ['0', '1', '2']
    assert '| epoch | train_loss |' in md and '<progress' not in md
    # the notebook keeps that one output, in its final state
    outs = [o for o in nb.cells[1].outputs if 'text/html' in o.get('data', {})]
    assert len(outs) == 1 and outs[0].data['text/plain'] == text


def test_live_plot_is_one_image_updated_per_phase(run):
    nb, msgs = run
    shown, updates = _displays(msgs[1], 'image/png')
    assert len(shown) == 1 and _ids(updates) == _ids(shown)
    assert len(updates) == 2 * 3 - 1                       # drawn after each of the 6 phases: shown once, updated 5x
    assert [o.output_type for o in nb.cells[1].outputs if 'image/png' in o.get('data', {})] == ['display_data']


def test_figure_as_last_expression_is_shown_once(run):
    nb, _ = run
    images = [o for o in nb.cells[2].outputs if 'image/png' in o.get('data', {})]
    assert [o.output_type for o in images] == ['execute_result']


def test_summary_and_training_loop_render_as_tables(run):
    nb, _ = run
    (summary,) = nb.cells[3].outputs
    assert summary.output_type == 'execute_result'
    assert summary.data['text/markdown'].startswith('| module | type | input | output |')
    (loop,) = nb.cells[4].outputs
    assert '| `after_epoch` | MetricsS, ProgressS |' in loop.data['text/markdown']
    assert '<table>' in loop.data['text/html']
    assert 'after_epoch     MetricsS, ProgressS' in loop.data['text/plain'].splitlines()
    shown = [o for o in nb.cells[7].outputs if o.output_type == 'display_data' and 'text/markdown' in o.data
             and o.data['text/markdown'].startswith('| module |')]
    assert len(shown) == 1 and not _errors(nb, 7)          # ModelMonitorS shows its table, not printed text


def test_interrupt_leaves_the_bar_marked_and_the_learner_usable(run):
    nb, msgs = run
    (err,) = _errors(nb, 5)
    assert err.ename == 'KeyboardInterrupt' and 'stopped by Ctrl-C' in err.evalue
    stderr = ''.join(m['content']['text'] for m in msgs[5] if m['msg_type'] == 'stream'
                     and m['content']['name'] == 'stderr')
    assert 'nntrain: Ctrl-C' in stderr                     # the kernel's SIGINT reached the deferred handler
    outs = [o for o in nb.cells[5].outputs if 'text/html' in o.get('data', {})]
    assert len(outs) == 1
    html, text = outs[0].data['text/html'], outs[0].data['text/plain']
    assert html.count('<progress') == 2 and html.count('progress-bar-interrupted"') == 2   # not an empty div
    epoch_bar, batch_bar = text.splitlines()[:2]
    assert epoch_bar.startswith('epoch ') and epoch_bar.endswith('interrupted') and '/100 ' in epoch_bar
    assert batch_bar.endswith('interrupted')
    # the next cell fits normally: 3 training steps, and the history grows by one epoch (train + valid)
    assert not _errors(nb, 6)
    out = ''.join(o.get('text', '') for o in nb.cells[6].outputs if o.output_type == 'stream')
    steps, n_rows = out.split()[1], int(out.split()[3])
    assert steps == '3' and n_rows % 2 == 0 and n_rows < 2 * 100


def test_second_ctrl_c_during_cleanup_still_marks_the_bars(run):
    "The first Ctrl-C stops the fit after its batch; a second one, while ProgressS draws its last state, stops that."
    nb, msgs = run
    (err,) = _errors(nb, 8)
    assert err.ename == 'KeyboardInterrupt'
    stdout = ''.join(m['content']['text'] for m in msgs[8] if m['msg_type'] == 'stream')
    assert 'cleaning up' in stdout
    outs = [o for o in nb.cells[8].outputs if 'text/html' in o.get('data', {})]
    assert len(outs) == 1                                  # the bars' one display, in its final state: marked
    html, text = outs[0].data['text/html'], outs[0].data['text/plain']
    assert html.count('<progress') == 2 and html.count('progress-bar-interrupted"') == 2
    assert all(line.endswith('interrupted') for line in text.splitlines()[:2])
