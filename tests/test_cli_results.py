"`nntrain-out/results.png` (`nntrain.cli.results_figure`): the console's table, legible, right under the loss plot."
import io

import matplotlib
import numpy as np
import pytest
from torcheval.metrics import MulticlassAccuracy

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from nntrain.cli import results_figure, save_results  # noqa: E402
from nntrain.subs.metrics import MetricsS  # noqa: E402
from nntrain.subs.progress import ProgressS  # noqa: E402
from nntrain.testing import tiny_classifier  # noqa: E402

DPI = 100


@pytest.fixture(scope='module')
def fitted():
    progress = ProgressS(plot=True, notebook=False)
    learn = tiny_classifier(subs=[MetricsS(accuracy=MulticlassAccuracy()), progress])
    out = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(out): learn.fit(4)
    header = next(l for l in out.getvalue().replace('\r', '\n').splitlines() if l.startswith('epoch'))
    fig = results_figure(learn, progress)
    fig.canvas.draw()
    yield learn, progress, fig, header.split()
    plt.close(fig)


def _table(fig):
    (table,) = [t for ax in fig.axes for t in ax.tables]
    return table


def test_columns_in_the_consoles_order(fitted):
    _, _, fig, console = fitted
    cells = _table(fig).get_celld()
    header = [cells[0, c].get_text().get_text() for c in range(len(console))]
    assert header == console == ['epoch', 'train_loss', 'valid_loss', 'train_accuracy', 'valid_accuracy', 'time']
    assert [cells[r, 0].get_text().get_text() for r in range(1, 5)] == ['0', '1', '2', '3']


def test_no_text_touches_its_cell_border(fitted):
    _, _, fig, _ = fitted
    renderer = fig.canvas.get_renderer()
    for (r, c), cell in _table(fig).get_celld().items():
        box, text = cell.get_window_extent(renderer), cell.get_text().get_window_extent(renderer)
        margin = min(text.x0 - box.x0, box.x1 - text.x1, text.y0 - box.y0, box.y1 - text.y1)
        assert margin >= 3, (r, c, cell.get_text().get_text(), margin)   # pixels at the figure's dpi


def test_table_sits_under_the_plot_without_empty_space(fitted):
    _, _, fig, _ = fitted
    fig.set_dpi(DPI); fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    drawn = (img < 250).any(axis=2)                # pixels where something is drawn
    rows = np.flatnonzero(drawn.any(axis=1))
    box = _table(fig).get_window_extent(fig.canvas.get_renderer())
    # within the table's columns, from the figure's first drawn row to its last: the longest run of empty rows
    band = drawn[rows[0]:rows[-1] + 1, int(box.x0):int(box.x1)].any(axis=1)
    longest, run = 0, 0
    for d in band: run = 0 if d else run + 1; longest = max(longest, run)
    assert longest < 0.3 * DPI, longest            # the earlier layout left about 0.6 inch above and below the table


def test_save_results_writes_the_images(fitted, tmp_path):
    learn, progress, _, _ = fitted
    paths = save_results(learn, tmp_path, progress)
    assert [p.name for p in paths] == ['history.json', 'loss.png', 'results.png']
    assert all(p.stat().st_size > 1000 for p in paths[1:])
    assert not np.isnan(plt.imread(paths[2])).any()
