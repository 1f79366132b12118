"""Labelled image grids: the picture people look at instead of reading numbers."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _wrap(text: str, width_px: int, font) -> list[str]:
    """Greedy word wrap to a pixel width."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width_px:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _check_layout(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None) -> None:
    """Refuse a grid with nothing to show, or labels that do not pair one to one with rows (it would mislabel)."""
    if not any(len(row) for row in rows):
        raise ValueError("make_grid needs at least one image")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"make_grid got {len(row_labels)} row labels for {len(rows)} rows")


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: int = 128,
    title: str | None = None,
) -> Image.Image:
    """Lay ``rows`` of images out on a white sheet, upscaled to ``cell`` pixels, with wrapped labels."""
    _check_layout(rows, row_labels)
    font = ImageFont.load_default(size=11)
    line_h = 13
    n_cols = max(len(r) for r in rows)
    label_w = 150 if row_labels else 0
    col_lines = [_wrap(c, cell - 4, font) for c in col_labels] if col_labels else []
    header_h = (max(map(len, col_lines)) * line_h + 4) if col_lines else 0
    title_h = line_h + 8 if title else 0
    sheet = Image.new("RGB", (label_w + n_cols * cell, title_h + header_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for j, lines in enumerate(col_lines):
        for k, text in enumerate(lines):
            draw.text((label_w + j * cell + 2, title_h + 2 + k * line_h), text, fill="black", font=font)
    for i, row in enumerate(rows):
        y = title_h + header_h + i * cell
        if row_labels:
            for k, text in enumerate(_wrap(row_labels[i], label_w - 6, font)):
                draw.text((4, y + 4 + k * line_h), text, fill="black", font=font)
        for j, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
    return sheet
