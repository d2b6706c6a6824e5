"""Writing outputs: whole files only, and HTML that opens offline.

Every file is rendered into memory first and then put in place with ``os.replace``
(``trainer.files.atomic_write_bytes``), so a failure leaves nothing half-written and a viewer refreshing during ``--watch`` never reads a
partial image.

plotly.js (about 4.8 MB) is needed by every HTML page. ``PLOTLYJS_MODES``:
- ``directory`` (default): written once as ``plotly.min.js`` beside the HTML and shared by every
  page in that folder; the page stays small (a 1M-step run dashboard is ~100 kB) and opens offline.
  Keep the two files together when copying.
- ``inline``: one self-contained file (plotly.js inside, about 4.8 MB more).
No mode loads anything from the network.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Iterable

from trainer.files import atomic_write_bytes

PLOTLYJS_MODES = ("directory", "inline")
PLOTLYJS_FILE = "plotly.min.js"


def emit(out: str | os.PathLike | IO[bytes], payload: bytes) -> None:
    """``payload`` to a path (atomically) or to a binary file object."""
    if isinstance(out, (str, os.PathLike)):
        atomic_write_bytes(out, payload)
    else:
        out.write(payload)


def plotlyjs_tag(mode: str) -> str:
    """The <script> element that loads plotly.js for ``mode``."""
    check_mode(mode)
    if mode == "inline":
        from plotly.offline import get_plotlyjs

        return f'<script type="text/javascript">{get_plotlyjs()}</script>'
    return f'<script src="{PLOTLYJS_FILE}" charset="utf-8"></script>'


def check_mode(mode: str) -> None:
    if mode not in PLOTLYJS_MODES:
        raise ValueError(f"plotlyjs={mode!r}: use one of {', '.join(PLOTLYJS_MODES)}")


def ensure_plotlyjs(folder: str | os.PathLike, mode: str) -> Path | None:
    """In ``directory`` mode, put plotly.min.js into ``folder`` unless the same one is there."""
    if mode != "directory":
        return None
    from plotly.offline import get_plotlyjs

    target = Path(folder) / PLOTLYJS_FILE
    js = get_plotlyjs().encode("utf-8")
    if not (target.is_file() and target.stat().st_size == len(js)):
        atomic_write_bytes(target, js)
    return target


def html_page(title: str, body_parts: Iterable[str], mode: str, head: str = "") -> bytes:
    """A complete HTML document: plotly.js loaded once, then the body parts in order."""
    import html

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n{plotlyjs_tag(mode)}\n{head}</head>\n<body>\n"
            + "\n".join(body_parts) + "\n</body>\n</html>\n").encode("utf-8")


def write_html(out: str | os.PathLike | IO[bytes], page: bytes, mode: str) -> None:
    """Write a page from ``html_page``; in directory mode plotly.min.js goes beside it."""
    if isinstance(out, (str, os.PathLike)):
        ensure_plotlyjs(Path(out).parent, mode)
    emit(out, page)
