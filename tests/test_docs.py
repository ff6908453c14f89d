"""The documentation site (tools/build_docs.py) builds offline and works in a real headless browser (chromium via CDP).

Set NNTRAIN_DOCS_SHOTS=<folder> to also save screenshots of the index and of the ablation tutorial there.
"""
from __future__ import annotations

import base64, functools, http.server, io, json, os, re, shutil, socketserver, subprocess, sys, tempfile, threading
import time, urllib.error, urllib.parse, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


# ---------------------------------------------------------------- a minimal Chrome DevTools Protocol client

class Browser:
    "Headless chromium driven over the DevTools Protocol (websocket-client); collects console errors per page."

    def __init__(self, exe: str = CHROMIUM, width: int = 1280, height: int = 1000):
        import websocket
        self.profile = tempfile.mkdtemp(prefix='nntrain-chromium-')
        self.proc = subprocess.Popen(
            [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-extensions',
             '--disable-dev-shm-usage', f'--user-data-dir={self.profile}', '--remote-debugging-port=0',
             'about:blank'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port, deadline = None, time.time() + 30
        while port is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None: break
            m = re.search(r'DevTools listening on ws://[^:]+:(\d+)/', line)
            if m: port = int(m.group(1))
        if port is None:
            self.close()
            raise RuntimeError('chromium did not start its DevTools endpoint')
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep its pipe drained
        req = urllib.request.Request(f'http://127.0.0.1:{port}/json/new?about:blank', method='PUT')
        target = json.loads(urllib.request.urlopen(req, timeout=10).read())
        self.ws = websocket.create_connection(target['webSocketDebuggerUrl'], timeout=30, suppress_origin=True)
        self.n, self.events = 0, []
        for m in ('Page.enable', 'Runtime.enable', 'Log.enable', 'Network.enable'): self.send(m)
        self.send('Emulation.setDeviceMetricsOverride', width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({'id': self.n, 'method': method, 'params': params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == self.n:
                if 'error' in msg: raise RuntimeError(f'{method}: {msg["error"]}')
                return msg.get('result', {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 20) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i, msg in enumerate(self.events):
                if msg.get('method') == event: return self.events.pop(i)
            self.ws.settimeout(max(0.05, deadline - time.time()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)

    def goto(self, url: str) -> list[str]:
        "Load `url`; return the console errors, uncaught exceptions and failed loads it produced."
        self.events.clear()
        self.send('Page.navigate', url=url)
        self.wait_for('Page.loadEventFired')
        self.eval('new Promise(r => setTimeout(r, 50))')  # let late script errors and image decodes arrive
        return self.errors()

    def errors(self) -> list[str]:
        out = []
        for msg in self.events:
            m, p = msg.get('method'), msg.get('params', {})
            if m == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert'):
                out.append('console: ' + ' '.join(str(a.get('value', a.get('description'))) for a in p['args']))
            elif m == 'Runtime.exceptionThrown':
                d = p['exceptionDetails']
                out.append('exception: ' + d.get('exception', {}).get('description', d.get('text', '')))
            elif m == 'Log.entryAdded' and p['entry'].get('level') == 'error':
                out.append(f'log: {p["entry"].get("text")} {p["entry"].get("url", "")}')
        return out

    def requests(self) -> list[str]:
        "URLs the current page requested since `goto` (documents, scripts, styles, images...)."
        return [m['params']['request']['url'] for m in self.events if m.get('method') == 'Network.requestWillBeSent']

    def eval(self, expr: str):
        r = self.send('Runtime.evaluate', expression=expr, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r: raise RuntimeError(f'{expr}: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def screenshot(self, path: Path, full_height: int | None = None) -> None:
        params = {'format': 'png'}
        if full_height:
            h = min(full_height, self.eval('document.documentElement.scrollHeight'))
            params.update(captureBeyondViewport=True, clip={'x': 0, 'y': 0, 'width': 1280, 'height': h, 'scale': 1})
        Path(path).write_bytes(base64.b64decode(self.send('Page.captureScreenshot', **params)['data']))

    def close(self):
        try: self.ws.close()
        except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def serve(folder: Path):
    "Serve `folder` on 127.0.0.1 from a thread; returns (server, base url)."
    handler = functools.partial(_Quiet, directory=str(folder))
    srv = socketserver.ThreadingTCPServer(('127.0.0.1', 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'


# ---------------------------------------------------------------- fixtures

def outputs_nb() -> dict:
    "A notebook storing one output of each kind the site must render (the real notebooks are stored without)."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    code = lambda src, outs: {'cell_type': 'code', 'metadata': {}, 'source': src, 'outputs': outs, 'execution_count': 1}
    disp = lambda data: {'output_type': 'display_data', 'metadata': {}, 'data': data}
    return {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': [
        {'cell_type': 'markdown', 'metadata': {},
         'source': '# Outputs\n\n> Every output kind, rendered.\n\n'
                   'See `Learner` and [the learner](03_learner.ipynb#Learner.fit).'},
        code('plt.plot([0, 1, 2])', [disp({'image/png': png, 'text/plain': '<Figure>'})]),
        code('HTML(...)', [disp({'text/html': '<b id="html-out">bold html</b>', 'text/plain': 'HTML'})]),
        code('Markdown(...)', [disp({'text/markdown': '*md* output with `Learner`', 'text/plain': 'Markdown'})]),
        code('1 + 1', [{'output_type': 'execute_result', 'metadata': {}, 'execution_count': 1,
                        'data': {'text/plain': 'PLAIN-OUTPUT-2'}}]),
        code('print("hi")', [{'output_type': 'stream', 'name': 'stdout', 'text': 'STREAM-OUTPUT\n'}]),
        code('1/0', [{'output_type': 'error', 'ename': 'ZeroDivisionError', 'evalue': 'division by zero',
                      'traceback': ['\x1b[31mZeroDivisionError\x1b[0m: division by zero']}]),
    ]}


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    from build_docs import build
    tmp = tmp_path_factory.mktemp('docs')
    nbs = tmp / 'nbs'
    shutil.copytree(ROOT / 'nbs', nbs, ignore=shutil.ignore_patterns('.*'))
    (nbs / '98_outputs.ipynb').write_text(json.dumps(outputs_nb()))
    (nbs / '_private.ipynb').write_text(json.dumps(outputs_nb()))
    info = build(tmp / 'site', nbs, verbose=False)
    srv, base = serve(info['out'])
    yield info, base
    srv.shutdown()


@pytest.fixture(scope='module')
def browser():
    if CHROMIUM is None:
        pytest.skip('chromium is not installed (apt-get install -y chromium; .ci/run installs it)')
    b = Browser()
    yield b
    b.close()


# ---------------------------------------------------------------- tests that need no browser

def test_site_files(site):
    info, _ = site
    out = info['out']
    nbs = sorted(p.stem for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    for stem in nbs + ['98_outputs']: assert (out / f'{stem}.html').exists(), stem
    assert not (out / '_private.html').exists()
    assert info['problems'] == {}, info['problems']
    text = '\n'.join(p.read_text() for p in out.glob('*.html'))
    assert not re.search(r'(src|href)="(https?:)?//', re.sub(r'<a\b[^>]*>', '', text)), 'a network resource'
    outp = (out / '98_outputs.html').read_text()
    for s in ('<b id="html-out">bold html</b>', '<em>md</em> output', 'PLAIN-OUTPUT-2', 'STREAM-OUTPUT',
              'ZeroDivisionError: division by zero', '<img src="img/'):
        assert s in outp, s
    assert '\x1b' not in outp


def test_every_public_name_has_an_entry(site):
    import importlib, pkgutil
    import nntrain, nntrain.subs
    info, _ = site
    text = '\n'.join(p.read_text() for p in info['out'].glob('*.html'))
    ids = set(re.findall(r'<div class="api" id="([^"]+)"', text))
    for pkg in (nntrain, nntrain.subs):
        for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):
            if m.name.split('.')[-1].startswith('_') or m.ispkg or m.name == 'nntrain.all': continue  # re-exports
            missing = set(importlib.import_module(m.name).__all__) - ids
            assert not missing, f'{m.name}: no API entry for {sorted(missing)}'
    learner = (info['out'] / '03_learner.html').read_text()
    assert 'id="Learner.fit"' in learner and 'n_epochs' in learner
    assert len(ids) == len(re.findall(r'<div class="api" id=', text)), 'an API id appears twice'


# modules whose parameters may lack descriptions for a while (e.g. while other work edits their notebooks): none now
UNDOCUMENTED_FOR_NOW: set[str] = set()


def test_every_parameter_has_a_description(site):
    "Each parameter of the public API has a description beside it in the source (fastcore `docments`)."
    info, _ = site
    missing = [u for u in info['undocumented'] if u.split(':')[0] not in UNDOCUMENTED_FOR_NOW]
    assert not missing, f'{len(missing)} parameters without a description: {missing[:20]}'
    progress = (info['out'] / '13_progress.html').read_text()
    assert 'no description' not in progress


def test_failing_execution_shows_on_page(tmp_path):
    "A cell that raises under --execute shows its traceback on the page; a broken notebook gets an error page."
    from build_docs import build
    nbs = tmp_path / 'nbs'; nbs.mkdir()
    cell = lambda src: {'cell_type': 'code', 'id': f'c{abs(hash(src))}', 'metadata': {}, 'source': src, 'outputs': [],
                        'execution_count': None}
    nb = {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {'kernelspec': {'name': 'python3', 'language': 'python',
                                                                           'display_name': 'Python 3'}},
          'cells': [{'cell_type': 'markdown', 'id': 'md0', 'metadata': {}, 'source': '# Boom'}, cell('print(6 * 7)'),
                    cell('raise ValueError("kaboom")'), cell('print("after")'), cell('#| notest\nprint("skipped")'),
                    cell('#| eval: false\nprint("never run")')]}
    (nbs / '00_boom.ipynb').write_text(json.dumps(nb))
    (nbs / '01_broken.ipynb').write_text('{not json')
    info = build(tmp_path / 'site', nbs, execute=[], readme=tmp_path / 'none.md', verbose=False)
    boom = (info['out'] / '00_boom.html').read_text()
    assert '42' in boom and 'ValueError' in boom and 'kaboom' in boom and 'after' in boom
    assert 'skipped</pre>' not in boom and 'never run</pre>' not in boom
    assert 'raised ValueError: kaboom' in info['problems']['00_boom.ipynb'][0]
    assert 'Could not read the notebook' in (info['out'] / '01_broken.html').read_text()


# ---------------------------------------------------------------- the browser

def test_pages_in_browser(site, browser):
    info, base = site
    pages = ['index.html', 'names.html'] + info['pages']
    ids_cache: dict[str, set] = {}

    def ids_of(path: str) -> set:
        if path not in ids_cache:
            try: body = urllib.request.urlopen(base + path, timeout=10).read().decode()
            except urllib.error.HTTPError as e: raise AssertionError(f'{path}: HTTP {e.code}')
            ids_cache[path] = set(re.findall(r'\sid="([^"]+)"', body))
        return ids_cache[path]

    n_imgs, n_links = 0, 0
    for pg in pages:
        errors = browser.goto(base + pg)
        assert not errors, f'{pg}: {errors}'
        remote = [u for u in browser.requests() if not u.startswith((base, 'data:'))]
        assert not remote, f'{pg} requested something off the local site (it must work offline): {remote}'
        imgs = browser.eval('[...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth])')
        for src, complete, width in imgs: assert complete and width > 0, f'{pg}: image {src} did not load'
        n_imgs += len(imgs)
        links = browser.eval('[...document.querySelectorAll("a[href]")].map(a => a.href)')
        for href in set(links):
            if not href.startswith(base): continue
            url = urllib.parse.urlsplit(href)
            path = url.path.lstrip('/') or 'index.html'
            ids = ids_of(path)
            assert not url.fragment or urllib.parse.unquote(url.fragment) in ids, f'{pg}: broken anchor {href}'
            n_links += 1
    assert n_imgs >= 1 and n_links > 100

    browser.goto(base + '03_learner.html')
    fit = browser.eval('(e => e && e.innerText)(document.getElementById("Learner.fit"))')
    assert fit and 'Learner.fit' in fit and 'n_epochs: int = 1' in fit, fit


def test_search_finds_learner(site, browser):
    _, base = site
    browser.goto(base + '90_ablation.html')
    browser.eval('document.getElementById("search-box").focus()')
    browser.send('Input.insertText', text='Learner')
    hits = browser.eval('[...document.querySelectorAll("#search-results a")].map(a => [a.textContent, a.href])')
    assert hits and hits[0] == ['Learner', base + '03_learner.html#Learner'], hits
    assert any(n == 'Learner.fit' for n, _ in hits)
    browser.send('Input.dispatchKeyEvent', type='keyDown', key='Enter', code='Enter', windowsVirtualKeyCode=13)
    browser.wait_for('Page.loadEventFired')
    assert browser.eval('location.pathname + location.hash') == '/03_learner.html#Learner'


def _search(browser, query: str) -> list[dict]:
    "What the search box lists for `query`: name, kind, link and the line under it."
    browser.eval('(b => { b.value = ""; b.focus(); })(document.getElementById("search-box"))')
    browser.send('Input.insertText', text=query)
    return browser.eval('[...document.querySelectorAll("#search-results li")].map(li => ({n: li.querySelector("a")'
                        '.textContent, u: li.querySelector("a").getAttribute("href"), k: li.querySelector(".kind")'
                        '.textContent, d: (li.querySelector(".desc") || {}).textContent || ""}))')


def test_search_covers_parameters_and_prose(site, browser):
    "Full text: parameter names and their descriptions, docstrings and the prose of every section."
    _, base = site
    browser.goto(base + 'index.html')
    hits = _search(browser, 'resume')
    fit = next(h for h in hits if h['n'] == 'Learner.fit')
    assert fit['u'] == '03_learner.html#Learner.fit' and fit['d'].startswith('parameter resume'), fit
    assert any(h['k'] == 'section' for h in hits), hits            # prose that explains resuming
    hits = _search(browser, 'n_batches')
    assert {'Learner.fit', 'NormalizationS'} <= {h['n'] for h in hits}, hits
    hits = _search(browser, 'MulticlassAccuracy')
    # torcheval's: prose mentions it, and MetricsS's parameter that names metrics after their class
    assert hits and all(h['k'] in ('page', 'section') or h['n'] == 'MetricsS' for h in hits), hits
    assert any(h['n'] == 'MetricsS' and 'parameter metrics' in h['d'] for h in hits), hits
    # a parameter's description, not its name: ProgressS(plot=...) is "a live plot of the ... losses"
    hits = _search(browser, 'live plot of the training')
    assert hits[0]['n'] == 'ProgressS' and 'parameter plot' in hits[0]['d'], hits
    assert _search(browser, 'zzzz no such words') == []


def test_table_of_contents(site, browser):
    "Each module page lists its sections and, under them, the API entries they define; every link lands."
    _, base = site
    browser.goto(base + '13_progress.html')
    toc = browser.eval('[...document.querySelectorAll("nav.toc a")].map(a => [a.textContent, a.getAttribute("href")])')
    names = [n for n, _ in toc]
    assert {'ProgressS', 'plot_losses', 'Bar', 'ProgressView'} <= set(names), names
    missing = browser.eval('[...document.querySelectorAll("nav.toc a")].map(a => a.getAttribute("href").slice(1))'
                           '.filter(id => !document.getElementById(id))')
    assert missing == [], missing
    browser.goto(base + '03_learner.html')
    toc = browser.eval('[...document.querySelectorAll("nav.toc > ul > li")].map(li => [li.querySelector("a")'
                       '.textContent, [...li.querySelectorAll("ul a")].map(a => a.textContent)])')
    sections = dict(toc)
    assert 'Learner' in sections.get('The Learner', []), toc          # the class, under the section defining it
    assert any('Any batch' in s for s in sections), toc
    browser.eval('document.querySelector(\'nav.toc a[href="#Learner"]\').click()')
    top = browser.eval('document.getElementById("Learner").getBoundingClientRect().top')
    assert 0 <= top < 200, top                                          # scrolled to, under the sticky header


def test_api_entries_document_their_parameters(site, browser):
    "Signature, a description per parameter (docments), the docstring, and the source on demand only."
    _, base = site
    browser.goto(base + '13_progress.html')
    rows = browser.eval('[...document.querySelectorAll("#ProgressS > table.params tbody tr")].map(tr => '
                        '[...tr.cells].map(td => td.innerText.trim()))')
    assert [r[0] for r in rows] == ['plot', 'comment_every', 'table', 'notebook'], rows
    assert rows[0][1:] == ['bool', 'False', 'a live plot of the training and validation losses'], rows[0]
    assert all(r[3] and r[3] != 'no description' for r in rows), rows
    doc = browser.eval('document.querySelector("#ProgressS > .doc").innerText')
    assert doc.startswith('Progress bars and the results table'), doc
    # the source is there, folded: not shown until asked for
    visible = browser.eval('document.querySelector("main").innerText')
    assert 'def _start_fit' not in visible and 'class ProgressS(Subscriber)' not in visible
    assert 'def _fmt_cell' not in visible and 'from fastprogress' not in visible   # private helpers, imports
    assert 'Implementation: _fmt_cell' in visible                                 # ... folded, not gone
    browser.eval('document.querySelector("#ProgressS > details.source").open = true')
    assert 'def _start_fit' in browser.eval('document.querySelector("#ProgressS > details.source").innerText')
    # a tutorial is read for its code: none of it folded
    browser.goto(base + '90_ablation.html')
    assert 'def run(name, opt_func, lr, one_cycle' in browser.eval('document.querySelector("main").innerText')
    browser.goto(base + '13_progress.html')
    # a subscriber's event methods are the learner's to call: not in its entry, nor in the index of names
    assert browser.eval('document.getElementById("ProgressS.before_fit")') is None
    browser.goto(base + 'names.html')
    listed = browser.eval('[...document.querySelectorAll(".names-index a")].map(a => a.textContent)')
    assert 'Learner.fit' in listed and 'ProgressS.figure' in listed
    assert not [n for n in listed if n.split('.')[-1].startswith(('before_', 'after_', 'cleanup_'))], listed


def test_figures_readable_and_shown_once(site, browser):
    "No figure is shrunk to less than 3/4 of its size at page width, and no page shows the same image twice."
    import hashlib
    info, base = site
    for pg in info['pages']:
        browser.goto(base + pg)
        sizes = browser.eval('[...document.querySelectorAll("main .outputs img")].map(i => [i.getAttribute("src"), '
                             'i.naturalWidth, i.getBoundingClientRect().width])')
        for src, natural, shown in sizes:
            assert shown >= 0.75 * natural, f'{pg}: {src} is {natural} px wide, shown at {shown:.0f} px'
        digests = [hashlib.sha256((info['out'] / src).read_bytes()).hexdigest() for src, _, _ in sizes]
        assert len(digests) == len(set(digests)), f'{pg} shows a figure twice'


def test_screenshots(site, browser):
    "Screenshots for a person to look at, only when NNTRAIN_DOCS_SHOTS names a folder."
    shots = os.environ.get('NNTRAIN_DOCS_SHOTS')
    if not shots: pytest.skip('set NNTRAIN_DOCS_SHOTS=<folder> to save screenshots')
    _, base = site
    Path(shots).mkdir(parents=True, exist_ok=True)
    for pg in ('index', '90_ablation', '13_progress', '03_learner', '98_outputs', '03_learner#Learner.fit'):
        assert not browser.goto(base + pg.replace('#', '.html#', 1) if '#' in pg else base + pg + '.html')
        name = pg.replace('#', '_')
        browser.screenshot(Path(shots) / f'docs_{name}.png', full_height=None if '#' in pg else 2400)
