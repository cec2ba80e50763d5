"""Sphinx configuration of the fastbn documentation.

Build (from the repository root)::

    python -m pip install ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

``FASTBN_DOCS_QUICK=1`` runs the tutorials and experiments with fewer epochs, seeds and repeats
(for CI); the default is the full run whose numbers are published.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE / "_lib"))

import fastbn  # noqa: E402

project = "fastbn"
author = "the fastbn developers"
copyright = "the fastbn developers"
version = release = fastbn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "fastbn_exec",
]

QUICK = os.environ.get("FASTBN_DOCS_QUICK", "0").strip().lower() not in ("", "0", "false", "no")
fastbn_docs_quick = QUICK          # a change of mode re-runs every page

exclude_patterns = ["_build", "_generated", "_lib", "_ext", "Thumbs.db", ".DS_Store"]
templates_path = []
html_static_path = ["_static"]
html_css_files = ["fastbn.css"]
html_theme = "pydata_sphinx_theme"
html_title = f"fastbn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {"index": []}
html_last_updated_fmt = None

# The theme and intersphinx reach the network only when asked to: no inventories offline.
intersphinx_mapping = {}

# numpydoc: documented parameters only, no autosummary tables of members (autodoc lists them).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "special-members": "__call__",
                           "undoc-members": False}

# ``python -m sphinx -b doctest docs docs/_build/doctest`` runs every example of the API
# reference (the docstrings' examples) and of the pages' ``>>>`` blocks.
doctest_global_setup = "import numpy as np\nimport fastbn"
doctest_test_doctest_blocks = "default"

nitpicky = False
suppress_warnings = []
