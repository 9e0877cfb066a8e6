"""DCLIP regions: grid geometry and the user boxes file, with its one-line errors."""

from __future__ import annotations

import json

import pytest

from clipfit.dclip.regions import Regions, grid_boxes, read_boxes_file
from clipfit.errors import DataError, UsageError
from conftest import run_cli, tiny_refine_args


def area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def test_grid_2_is_full_image_four_cells_and_the_centre_half():
    assert grid_boxes(100, 60, 2) == [
        (0, 0, 100, 60),
        (0, 0, 50, 30), (50, 0, 100, 30), (0, 30, 50, 60), (50, 30, 100, 60),
        (25, 15, 75, 45),
    ]


@pytest.mark.parametrize("width,height,grid", [(101, 37, 3), (40, 40, 4), (7, 300, 5)])
def test_grid_cells_tile_the_image_without_overlap(width, height, grid):
    boxes = grid_boxes(width, height, grid)
    cells = boxes[1:-1]
    assert len(cells) == grid * grid
    assert sum(area(b) for b in cells) == width * height
    covered = {(x, y) for x0, y0, x1, y1 in cells for x in range(x0, x1) for y in range(y0, y1)}
    assert len(covered) == width * height


def test_grid_drops_cells_too_small_to_hold_a_pixel():
    boxes = grid_boxes(1, 10, 2)
    assert boxes[0] == (0, 0, 1, 10)
    assert all(area(b) > 0 for b in boxes)
    assert len(boxes) < 2 * 2 + 2


def write_boxes(tmp_path, *lines):
    path = tmp_path / "boxes.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_boxes_file_is_read_and_boxes_become_whole_pixels(tmp_path):
    path = write_boxes(tmp_path, {"file_name": "a.png", "boxes": [[1.5, 2, 10.2, 20], [0, 0, 40, 40]]},
                       "", {"file_name": "sub/b.png", "boxes": []})
    regions = Regions("boxes", boxes_file=str(path))
    assert regions.boxes("a.png", 40, 40) == [(0, 0, 40, 40), (1, 2, 11, 20), (0, 0, 40, 40)]
    assert regions.boxes("sub/b.png", 40, 40) == [(0, 0, 40, 40)]
    assert regions.boxes("not-in-file.png", 8, 6) == [(0, 0, 8, 6)]
    assert regions.unused_names(["a.png"]) == ["sub/b.png"]


@pytest.mark.parametrize("bad_line,reason", [
    ('{"file_name": "a.png", "boxes": [[0, 0, 5, 5]]', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ({"boxes": [[0, 0, 5, 5]]}, "needs \"file_name\""),
    ({"file_name": "b.png"}, "needs \"boxes\""),
    ({"file_name": "b.png", "boxes": [[0, 0, 5]]}, "box 1: expected [x0, y0, x1, y1]"),
    ({"file_name": "b.png", "boxes": [[0, 0, 5, 5], [0, "0", 5, 5]]}, "box 2: expected"),
    ({"file_name": "b.png", "boxes": [[5, 0, 5, 5]]}, "box 1: empty box"),
    ({"file_name": "a.png", "boxes": []}, "a.png already has boxes on line 1"),
])
def test_malformed_boxes_lines_name_file_line_and_reason(tmp_path, bad_line, reason):
    path = write_boxes(tmp_path, {"file_name": "a.png", "boxes": [[0, 0, 5, 5]]}, bad_line)
    with pytest.raises(DataError) as caught:
        read_boxes_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and reason in message and "\n" not in message


def test_missing_boxes_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--dclip-boxes .*nope.jsonl: file not found"):
        read_boxes_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("box", [[-1, 0, 5, 5], [0, 0, 41, 5], [0, 0, 5, 40.5]])
def test_box_outside_the_image_names_the_line(tmp_path, box):
    path = write_boxes(tmp_path, {"file_name": "x.png", "boxes": []}, {"file_name": "a.png", "boxes": [box]})
    regions = Regions("boxes", boxes_file=str(path))
    with pytest.raises(DataError, match=rf"{path}:2: box 1 .* outside the 40x40 image"):
        regions.boxes("a.png", 40, 40)


def test_refine_stops_with_exit_3_on_a_box_outside_an_image(tmp_path, pairs_dir, tiny_config):
    path = write_boxes(tmp_path, {"file_name": "img003.png", "boxes": [[0, 0, 10, 10], [30, 30, 41, 35]]})
    result = run_cli(*tiny_refine_args(pairs_dir, tmp_path / "run", tiny_config, "--method", "dclip",
                                       "--dclip-regions", "boxes", "--dclip-boxes", path,
                                       "--cache-dir", tmp_path / "cache"))
    assert result.returncode == 3
    assert f"{path}:1: box 2" in result.stderr and "outside the 40x40 image" in result.stderr
