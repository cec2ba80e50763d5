"""``.. fastbn-exec::``: run Python at build time and put its output (and figures) in the page.

The code of every block on a page runs in one namespace, top to bottom, in a fresh namespace per
page, so a page reads like a notebook whose cells are executed by each build. Options:

``:hide-code:``
    Do not show the code (it still runs).
``:output: text | rst | none``
    ``text`` (default): stdout as a literal block; ``rst``: stdout is parsed as
    reStructuredText (computed tables and conclusions); ``none``: discard it.

The namespace has ``QUICK`` (True when ``FASTBN_DOCS_QUICK=1``: fewer epochs, fewer repeats) and
``GENERATED`` (the ``_generated`` directory of the sources) and
``show(fig, name, alt)``, which saves a Matplotlib figure as a PNG in ``_generated/`` and places it
after the block's output. Any exception is a build error (``-W`` makes every warning one too), so
a tutorial that stops working stops the build.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

_namespaces: dict[str, dict] = {}
_timings: dict[str, float] = {}


def _quick() -> bool:
    return os.environ.get("FASTBN_DOCS_QUICK", "0").strip().lower() not in ("", "0", "false",
                                                                             "no")


class ExecDirective(SphinxDirective):
    has_content = True
    option_spec = {"hide-code": directives.flag,
                   "output": lambda arg: directives.choice(arg, ("text", "rst", "none"))}

    def run(self):
        docname = self.env.docname
        gen_dir = Path(self.env.srcdir) / "_generated"
        gen_dir.mkdir(exist_ok=True)
        figures: list[tuple[str, str]] = []
        namespace = _namespaces.setdefault(docname, self._new_namespace(docname))

        def show(fig, name, alt):
            import matplotlib.pyplot as plt
            filename = f"{docname.replace('/', '-')}-{name}.png"
            fig.savefig(gen_dir / filename, dpi=110, bbox_inches="tight")
            plt.close(fig)
            figures.append((filename, alt))

        namespace["show"] = show
        code = "\n".join(self.content)
        buffer = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, f"<{docname}.rst:{self.lineno}>", "exec"), namespace)
        except Exception:  # noqa: BLE001 - reported as a build error with the traceback
            message = f"the code block failed:\n{traceback.format_exc()}"
            return [self.state.document.reporter.error(
                message, nodes.literal_block(code, code), line=self.lineno)]
        finally:
            _timings[docname] = _timings.get(docname, 0.0) + time.perf_counter() - start
        result: list[nodes.Node] = []
        if "hide-code" not in self.options:
            block = nodes.literal_block(code, code, language="python")
            block["classes"].append("fastbn-exec-code")
            result.append(block)
        output = buffer.getvalue()
        kind = self.options.get("output", "text")
        rst_lines: list[str] = []
        if output.strip() and kind == "text":
            block = nodes.literal_block(output, output.rstrip("\n"), language="none")
            block["classes"].append("fastbn-exec-output")
            result.append(block)
        elif output.strip() and kind == "rst":
            rst_lines += output.splitlines() + [""]
        for filename, alt in figures:
            rst_lines += [f".. figure:: /_generated/{filename}", f"   :alt: {alt}",
                          "   :class: fastbn-plot", "", f"   {alt}", ""]
        if rst_lines:
            container = nodes.container(classes=["fastbn-exec-result"])
            self.state.nested_parse(StringList(rst_lines, source=f"<{docname} output>"),
                                    self.content_offset, container)
            result.append(container)
        return result

    def _new_namespace(self, docname):
        lib = str(Path(self.env.srcdir) / "_lib")
        if lib not in sys.path:
            sys.path.insert(0, lib)
        import matplotlib
        matplotlib.use("Agg")
        return {"__name__": f"docs.{docname.replace('/', '.')}", "QUICK": _quick(),
                "GENERATED": Path(self.env.srcdir) / "_generated"}


def _purge(app, env, docname):
    _namespaces.pop(docname, None)
    _timings.pop(docname, None)


def _doctree_read(app, doctree):
    docname = app.env.docname
    _namespaces.pop(docname, None)          # release the memory of a finished page
    if docname in _timings:
        logger.info(f"fastbn-exec: {docname} ran in {_timings[docname]:.1f} s")


def setup(app):
    app.add_directive("fastbn-exec", ExecDirective)
    app.connect("env-purge-doc", _purge)
    app.connect("doctree-read", _doctree_read)
    app.add_config_value("fastbn_docs_quick", _quick(), "env")
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
