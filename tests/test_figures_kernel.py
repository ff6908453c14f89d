"""Every nntrain function that draws a figure shows it exactly once in a real Jupyter kernel (nbclient + ipykernel, the
inline backend): as the cell's last expression, not last, in a loop, assigned to a variable, or shown with display()."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

REPO = Path(__file__).resolve().parents[1]

SETUP = f'''import sys
sys.path.insert(0, {str(REPO)!r})   # this checkout, not an installed nntrain
import nntrain
assert nntrain.__file__.startswith({str(REPO)!r}), nntrain.__file__
import matplotlib.pyplot as plt
import torch
from IPython.display import display
from nntrain.data import DataLoaders
from nntrain.show import show_images, show_batch
from nntrain.subs.lr_find import LRFindS
from nntrain.subs.monitor import ActivationStatsS
from nntrain.subs.progress import ProgressS, plot_losses
from nntrain.subs.schedule import ParamSchedulerS, sched_lin
from nntrain.testing import tiny_classifier
x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
dls = DataLoaders.from_tensors(x, y, x, y, batch_size=4)
learn = tiny_classifier()
acts, sched, progress = ActivationStatsS(), ParamSchedulerS({{'lr': sched_lin(0.1, 0.01)}}), ProgressS(plot=True)
learn.fit(2, subs=[acts, sched, progress])
res = learn.lr_find(num_it=10, show_plot=False)
plt.close('all')'''

# (cell, how many images it must show)
CASES = [
    ('show_images(x, y)', 1),                                       # the last expression
    ('fig = show_images(x, y)', 1),                                 # assigned
    ('show_images(x, y)\nprint("after")', 1),                       # not last
    ('for i in range(3): show_images(x[:2], y[:2], title=str(i))', 3),   # in a loop
    ('fig = show_images(x, y)\ndisplay(fig)', 1),                   # display() shows it; the cell's end does not again
    ('fig', 1),                                                     # an earlier figure, asked for again
    ('f = show_images(x, y)\nf.suptitle("a title added after the call");', 1),
    ('fig.suptitle("changed after the call")\nfig', 1),             # changed, and asked for again
    ('show_batch(dls)', 1),
    ('acts.plot_stats()', 1),
    ('for _ in range(2): acts.plot_stats()', 2),
    ('acts.color_dim()\nacts.dead_chart(per_unit=True)', 2),
    ('sched.plot_sched()', 1),
    ('res.plot()', 1),
    ('plot_losses(progress.train_steps, progress.train_losses, progress.valid_steps, progress.valid_losses)', 1),
    ('progress.figure()', 1),
    ('learn.lr_find(num_it=10)', 1),                                # a notebook shows the LR finder's curve itself
    ('fig, ax = plt.subplots()\nres.plot(ax)\nplot_losses([0, 1], [1., 0.5], [], [], ax=ax)\nprint("mine")', 1),
    ('print("no figure")', 0),
]


def _images(cell) -> list[str]:
    "The output types of the cell's outputs that carry an image."
    return [o.output_type for o in cell.outputs if 'image/png' in o.get('data', {})]


@pytest.fixture(scope='module')
def executed():
    cells = [SETUP] + [src for src, _ in CASES]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in cells])
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name='python3', allow_errors=True,
                                     resources={'metadata': {'path': str(REPO)}})
    # the inline backend, as in Jupyter, also where the environment says MPLBACKEND=Agg (as .ci/run does)
    client.execute(env={**os.environ, 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'})
    return nb


def test_setup_ran(executed):
    errors = [o for o in executed.cells[0].outputs if o.output_type == 'error']
    assert not errors, errors


IDS = [f'{i}:{s.splitlines()[0][:40]}' for i, (s, _) in enumerate(CASES)]


@pytest.mark.parametrize('i', range(len(CASES)), ids=IDS)
def test_each_figure_is_shown_once(executed, i):
    src, n = CASES[i]
    cell = executed.cells[i + 1]
    errors = [f'{o.ename}: {o.evalue}' for o in cell.outputs if o.output_type == 'error']
    assert not errors, errors
    assert len(_images(cell)) == n, (src, _images(cell))
    # nothing but the figure (and what the cell prints): no `<Axes: ...>` or array of axes as the cell's value
    texts = [o.data['text/plain'] for o in cell.outputs if o.output_type == 'execute_result'
             and 'image/png' not in o.data]
    assert not any('Axes' in t for t in texts), texts


def test_last_expression_is_the_cells_value(executed):
    "As the last expression the figure is the cell's value (Out[n]); not last, it shows when the cell ends."
    assert _images(executed.cells[1]) == ['execute_result']
    assert _images(executed.cells[3]) == ['display_data']
    assert _images(executed.cells[4]) == ['display_data'] * 3


def test_a_figure_changed_after_the_call_shows_the_change(executed):
    "Shown when the cell ends, not when it is made: a title added to the returned figure is in the picture."
    def png(src):
        cell = executed.cells[1 + [c for c, _ in CASES].index(src)]
        return next(o.data['image/png'] for o in cell.outputs if 'image/png' in o.get('data', {}))
    plain = png('fig = show_images(x, y)')
    titled = png('f = show_images(x, y)\nf.suptitle("a title added after the call");')
    assert titled != plain
