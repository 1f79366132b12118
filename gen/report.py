"""Self-contained HTML reports: headings, tables, warnings, images and matplotlib plots in one folder.

A report is a folder a person opens in a browser: ``report.html`` beside its PNGs (sample grids,
plots), with nothing fetched from anywhere else; the numbers go into a JSON file next to it for
machines. Plots use matplotlib's object API (``Figure``, no pyplot state), so reports can be made
from any thread and without a display.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.warn { background: #fff4e0; border-left: 4px solid #f0a020; padding: .4em .8em; margin: .4em 0; }
.ok { background: #eef8ee; border-left: 4px solid #40a040; padding: .4em .8em; margin: .4em 0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
.note { color: #555; font-size: .92em; }
"""


def _name(name: str) -> str:
    """A safe file name (letters, digits, dot, dash, underscore)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "file"


def format_value(value: object, digits: int = 3) -> str:
    """Numbers to a fixed number of decimals; NaN and None as a dash; anything else as text."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


class HtmlReport:
    """Builds ``<folder>/report.html`` section by section; images and plots are written as they are added."""

    def __init__(self, folder: str | Path, title: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        self.files: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, cls: str | None = None) -> None:
        attr = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{attr}>{html.escape(text)}</p>")

    def warnings(self, messages: Sequence[str], ok: str | None = None) -> None:
        """Each message in a warning box; ``ok`` in a green box when there is none."""
        for message in messages:
            self.parts.append(f'<div class="warn">{html.escape(message)}</div>')
        if not messages and ok:
            self.parts.append(f'<div class="ok">{html.escape(ok)}</div>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], caption: str | None = None, digits: int = 3) -> None:
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for row in rows:
            cells = []
            for value in row:
                num = isinstance(value, (int, float)) and not isinstance(value, bool)
                cells.append(f'<td{" class=num" if num else ""}>{html.escape(format_value(value, digits))}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        self.parts.append("".join(out))

    def key_values(self, values: Mapping[str, object], caption: str | None = None) -> None:
        self.table(["", "value"], [[k, v] for k, v in values.items()], caption)

    def image(self, image: Image.Image, name: str, caption: str | None = None) -> str:
        """Save ``image`` as ``<name>.png`` and show it; returns the file name."""
        file = _name(name) + ".png"
        image.save(self.folder / file)
        self._figure(file, caption)
        return file

    def plot(self, figure, name: str, caption: str | None = None) -> str:
        """Save a matplotlib ``Figure`` as ``<name>.png`` and show it; returns the file name."""
        file = _name(name) + ".png"
        figure.savefig(self.folder / file, dpi=110, bbox_inches="tight")
        self._figure(file, caption)
        return file

    def _figure(self, file: str, caption: str | None) -> None:
        self.files.append(file)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img src="{html.escape(file)}" alt="{html.escape(caption or file)}">{cap}</figure>')

    def link(self, href: str, text: str) -> None:
        self.parts.append(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>')

    def write(self, name: str = "report.html") -> Path:
        path = self.folder / name
        body = "\n".join(self.parts)
        path.write_text(
            f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n",
            encoding="utf-8",
        )
        return path


def write_json(path: str | Path, data: object) -> Path:
    """JSON with NaN and infinities written as null (strict JSON readers refuse them)."""
    path = Path(path)
    path.write_text(json.dumps(_finite(data), indent=2) + "\n", encoding="utf-8")
    return path


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --- plots ----------------------------------------------------------------------------------------


def _figure(width: float = 8.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str,
    log: bool = False,
    colours: Sequence[str] | None = None,
    hlines: Mapping[str, float] | None = None,
):
    """One bar per label (labels rotated for long module names); ``hlines`` draws labelled reference levels."""
    fig, ax = _figure(max(6.0, 0.18 * len(labels) + 2.0), 4.0)
    x = range(len(values))
    ax.bar(x, [v if math.isfinite(v) else 0.0 for v in values], color=colours or "#4878cf")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    for name, level in (hlines or {}).items():
        ax.axhline(level, linestyle="--", linewidth=1, color="#c44")
        ax.text(len(values) - 0.5, level, name, ha="right", va="bottom", fontsize=7, color="#c44")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log: bool = False,
    legend: bool = True,
    markers: bool = True,
):
    """One line per named (xs, ys) series."""
    fig, ax = _figure()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, markersize=3, linewidth=1.2, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend and series:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
