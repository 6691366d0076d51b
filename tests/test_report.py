"""Run-folder reports are real files: a parseable SVG and JSON."""
import json
import math
import xml.etree.ElementTree as ET

from trainer_core.report import learning_curve_svg, moving_average, write_learning_curve, write_state


def test_moving_average_matches_window_mean():
    values = [float(i) for i in range(10)]
    ma = moving_average(values, window=3)
    assert ma[0] == 0 and ma[1] == 0.5 and ma[2] == 1 and ma[9] == 8


def test_learning_curve_is_valid_svg_with_one_polyline_per_series(tmp_path):
    history = [{"step": i + 1, "loss": 1 / (i + 1)} for i in range(50)]
    path = tmp_path / "learning_curve.svg"
    write_learning_curve(path, history, {"validation": [(10, 0.3), (20, 0.2)]})
    root = ET.parse(path).getroot()
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3
    assert len(lines[0].get("points").split()) == 50
    assert "validation" in path.read_text()


def test_svg_skips_non_finite_points():
    svg = learning_curve_svg({"loss": [(1, 1.0), (2, math.nan), (3, 0.5)]})
    assert "nan" not in svg.split("points=")[1].split('"')[1]


def test_state_json_round_trips(tmp_path):
    write_state(tmp_path / "s.json", {"step": 3, "path": tmp_path, "loss": [0.1]})
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["step"] == 3 and data["path"] == str(tmp_path)
    assert not list(tmp_path.glob(".*tmp"))
