"""The README's demo through its real entry point (``trainer_core.cli.main``).

The fast test checks the run folder's files after a few steps; the slow one runs the full
demo config (~1 min on 2 CPU cores) and checks, on the saved ``samples.png`` itself, that
the concept got stronger: the share of red/yellow object pixels
(``demo.dataset.concept_fraction``) in the trigger-prompt samples before vs after training.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.cli import main
from trainer_core.demo.dataset import concept_fraction
from trainer_core.demo.dataset import sample_prompts
from trainer_core.demo.grid import LABEL_WIDTH, PAD
from trainer_core.demo.run import DEMO_SIZE, GRID_SCALE

RUN_FILES = ("lora_final.safetensors", "learning_curve.svg", "training_state.json", "samples.png")


@pytest.fixture
def keep_threads():
    """The demo sets torch to one thread; restore the count afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tmp_path, *extra: str):
    assert main(["demo", "--output-dir", str(tmp_path), *extra]) == 0
    return tmp_path / "demo"


def _grid_rows(path) -> list[torch.Tensor]:
    """samples.png → rows [training images, before, after], each [N, 3, S, S] in [-1, 1]."""
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
    cell, n = DEMO_SIZE * GRID_SCALE, len(sample_prompts()[0])
    rows = []
    for r in range(3):
        y = PAD + r * (cell + PAD)
        xs = [LABEL_WIDTH + PAD + c * (cell + PAD) for c in range(n)]
        rows.append(torch.stack([torch.from_numpy(grid[y:y + cell, x:x + cell]).permute(2, 0, 1) for x in xs]))
    return rows


def test_demo_writes_the_run_folder(tmp_path, keep_threads, capsys):
    run = _run(tmp_path, "--steps", "3")
    err = capsys.readouterr().err  # the caching before step 1 is on the terminal, with counts
    for phase in ("encoding images", "encoding captions"):
        counts = re.findall(rf"{phase} (\d+)/(\d+)", err)
        assert counts and counts[0][0] == "0" and counts[-1][0] == counts[-1][1] != "0", (phase, err)
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    state = json.loads((run / "training_state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert (run / "learning_curve.svg").read_text().lstrip().startswith("<")
    reference, before, after = _grid_rows(run / "samples.png")
    assert concept_fraction(reference).min() > 0.12  # the grid's layout is what _grid_rows reads


@pytest.mark.slow
def test_full_demo_makes_the_concept_visibly_stronger(tmp_path, keep_threads):
    run = _run(tmp_path)
    losses = json.loads((run / "training_state.json").read_text())["losses"]
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    assert last < 0.25 * first, (first, last)  # measured: 4.9 -> 0.3

    reference, before, after = (concept_fraction(r) for r in _grid_rows(run / "samples.png"))
    # measured: training images 0.26, before 0.04 (colour noise), after 0.19 (every sample > 0.1)
    assert before.mean() < 0.08, before
    assert after.min() > 0.08 and after.mean() > 3 * before.mean(), (before, after)
    assert after.mean() > 0.4 * reference.mean(), (reference, after)
