"""The documentation: docstring examples run, and the site builds and renders in a browser.

The site test builds ``docs/`` once in quick mode (``FASTBN_DOCS_QUICK=1``, warnings as errors;
every tutorial and experiment runs during the build) — or reuses a build given by
``FASTBN_DOCS_HTML=<dir>`` — then loads every page in headless Chromium and checks its title and,
where the page has plots, that each ``<img>`` is there and its PNG exists and is not trivial.
Skipped when Sphinx (the ``docs`` extra) or Chromium (Debian's ``chromium``) is missing.
"""
from __future__ import annotations

import doctest
import html
import importlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fastbn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# page -> (words its <title> must contain, number of plots it must show at least)
PAGES = {
    "index.html": ("fastbn", 0),
    "getting_started.html": ("Getting started", 0),
    "tutorials/inference.html": ("CPU inference pipeline", 1),
    "tutorials/training.html": ("training a network", 1),
    "best_practices/index.html": ("Best practices", 0),
    "best_practices/a_learning_rate.html": ("higher learning rates", 1),
    "best_practices/b_placement.html": ("Before or after the activation", 1),
    "best_practices/c_batch_size.html": ("Mini-batch size", 1),
    "best_practices/d_momentum.html": ("Momentum and the running statistics", 1),
    "best_practices/e_train_eval.html": ("Train mode vs eval mode", 1),
    "best_practices/f_initialization.html": ("Sensitivity to initialization", 1),
    "best_practices/g_population_stats.html": ("Exact population statistics", 1),
    "performance.html": ("Performance guide", 2),
    "conventions.html": ("Conventions and conversions", 0),
    "api.html": ("API reference", 0),
    "building_docs.html": ("Building these pages", 0),
}
CONCLUSION_PAGES = [p for p in PAGES if p.startswith("best_practices/") and "index" not in p]


# ----------------------------------------------------------------------------- docstrings

def _public_objects():
    for name in fastbn.__all__:
        obj = getattr(fastbn, name)
        yield name, obj
        if isinstance(obj, type):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (callable(member) or isinstance(
                        member, (property, classmethod, staticmethod))):
                    yield f"{name}.{attr}", member


@pytest.mark.parametrize("module", sorted({getattr(fastbn, n).__module__ for n in fastbn.__all__}))
def test_docstring_examples_pass(module):
    """Every example in the public docstrings runs and prints what it says (as the API page)."""
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module}"


def test_every_public_name_has_an_example():
    missing = []
    for name, obj in _public_objects():
        target = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
        doc = target.__doc__ or ""
        if name.count(".") and isinstance(obj, property):
            continue                      # properties: a one-line description suffices
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"public names without a docstring example: {missing}"


# ----------------------------------------------------------------------------- the site

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install '.[docs]')")
    pytest.importorskip("pydata_sphinx_theme")
    pytest.importorskip("numpydoc")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    if _chromium() is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    reuse = os.environ.get("FASTBN_DOCS_HTML")
    if reuse:
        return Path(reuse)
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, FASTBN_DOCS_QUICK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out / "html"


def _dump_dom(path: Path) -> str:
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--virtual-time-budget=3000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed on {path}: {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def rendered(site) -> dict[str, str]:
    """Each page as Chromium rendered it (its DOM after loading), loaded in parallel."""
    pages = {p: site / p for p in PAGES}
    missing = [p for p, path in pages.items() if not path.is_file()]
    assert not missing, f"pages not built: {missing}"
    with ThreadPoolExecutor(max_workers=4) as pool:
        doms = dict(zip(pages, pool.map(_dump_dom, pages.values())))
    return doms


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders_with_title_and_plots(page, rendered, site):
    dom = rendered[page]
    words, plots = PAGES[page]
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title, f"{page}: no <title> in the rendered DOM"
    assert words.lower() in html.unescape(title.group(1)).lower(), \
        f"{page}: title {title.group(1)!r} lacks {words!r}"
    h1 = re.search(r"<h1[^>]*>(.*?)</h1>", dom, re.S)
    assert h1 and words.lower() in html.unescape(re.sub("<[^>]+>", "", h1.group(1))).lower()
    assert 'class="system-message"' not in dom, f"{page}: shows a build error"
    images = [src for src in re.findall(r'<img[^>]*\bsrc="([^"]+\.png)"', dom)]
    assert len(images) >= plots, f"{page}: expected {plots} plot(s), found {images}"
    for src in images:
        png = (site / page).parent / html.unescape(src)
        assert png.is_file(), f"{page}: {src} does not exist"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, \
            f"{page}: {src} is not a real plot ({len(data)} bytes)"


@pytest.mark.parametrize("page", CONCLUSION_PAGES)
def test_experiment_pages_state_a_conclusion(page, rendered):
    dom = rendered[page]
    match = re.search(r'class="[^"]*fastbn-conclusion[^"]*"[^>]*>(.*?)</div>', dom, re.S)
    assert match, f"{page}: no computed conclusion"
    text = html.unescape(re.sub(r"<[^>]+>", "", match.group(1)))
    assert re.search(r"\d", text), f"{page}: the conclusion quotes no number: {text!r}"


def test_training_tutorial_states_its_accuracy(rendered):
    dom = html.unescape(re.sub(r"<[^>]+>", "", rendered["tutorials/training.html"]))
    match = re.search(r"classifies\s+(\d+\.\d)%\s+of the", dom)
    assert match, "the training tutorial does not state the accuracy it reached"
    assert float(match.group(1)) > 80.0
