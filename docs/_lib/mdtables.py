"""Turn the Markdown of ``bench/RESULTS.md`` (headings, tables, images, text) into
reStructuredText for the performance guide."""
from __future__ import annotations

import re
import shutil
from pathlib import Path


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append("``" + part[1:-1] + "``")
        else:
            part = part.replace("\\", "\\\\").replace("*", r"\*").replace("_", r"\_")
            part = part.replace("|", r"\|")
            out.append(part)
    return "".join(out).strip() or r"\ "


def markdown_to_rst(text: str, source_dir: Path, image_dir: Path, prefix: str) -> str:
    """Headings become rubrics, pipe tables list-tables, images figures (copied to image_dir)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells if c):
                    rows.append(cells)
                i += 1
            width = max(len(r) for r in rows)
            out += [".. list-table::", "   :header-rows: 1", "   :class: fastbn-bench-table", ""]
            for row in rows:
                row = row + [""] * (width - len(row))
                out.append("   * - " + _inline(row[0]))
                out += ["     - " + _inline(c) for c in row[1:]]
            out.append("")
            continue
        image = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if image:
            src = (source_dir / image.group(2)).resolve()
            if src.is_file():
                target = image_dir / f"{prefix}-{src.name}"
                shutil.copyfile(src, target)
                out += [f".. figure:: /_generated/{target.name}", f"   :alt: {image.group(1)}",
                        "   :class: fastbn-plot", "", f"   {_inline(image.group(1))}", ""]
            i += 1
            continue
        heading = re.match(r"(#+)\s+(.*)", line)
        if heading:
            if len(heading.group(1)) > 1:          # the document's own title is dropped
                out += [f".. rubric:: {_inline(heading.group(2))}", ""]
            i += 1
            continue
        if line.strip().startswith("```"):
            i += 1
            block = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            i += 1
            out += ["::", ""] + ["   " + b for b in block] + [""]
            continue
        out.append(_inline(line) if line.strip() else "")
        i += 1
    return "\n".join(out) + "\n"
