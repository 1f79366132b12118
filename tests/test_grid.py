"""Labelled image grids: a wrong call is a clear error, not an empty sheet or an IndexError."""

import pytest
from PIL import Image

from gen.grid import make_grid

RED = Image.new("RGB", (64, 64), "red")


def test_a_grid_lays_out_rows_labels_and_titles():
    sheet = make_grid([[RED, RED], [RED]], row_labels=["a", "b"], col_labels=["x", "y"], cell=32, title="t")
    assert sheet.width == 150 + 2 * 32 and sheet.height > 2 * 32


@pytest.mark.parametrize("rows", [[], [[]], [[], []]])
def test_a_grid_with_no_images_is_refused(rows):
    with pytest.raises(ValueError, match="at least one image"):
        make_grid(rows)


@pytest.mark.parametrize("labels", [["a"], ["a", "b", "c"]])
def test_row_labels_must_pair_with_rows(labels):
    with pytest.raises(ValueError, match=f"{len(labels)} row labels for 2 rows"):
        make_grid([[RED], [RED]], row_labels=labels)
