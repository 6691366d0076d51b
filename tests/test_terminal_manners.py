"""What the command line shows: a dataset summary before training (images, repeats, captions
found and missing, buckets with counts, files skipped), defaults in ``--help``, and no
third-party chatter unless ``--verbose``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer_core import cli
from trainer_core.config import TrainingConfig
from trainer_core.data.overview import format_overview, overview

ROOT = Path(__file__).resolve().parents[1]


def _img(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(path)


def test_dataset_summary_counts_what_training_uses(tmp_path):
    data = tmp_path / "data"
    _img(data / "1_dog" / "a.png", 64, 64)
    (data / "1_dog" / "a.txt").write_text("sks dog", encoding="utf-8")
    _img(data / "3_dog" / "b.png", 64, 64)
    _img(data / "3_dog" / "c.png", 96, 64)
    (data / "3_dog" / "c.txt").write_text("sks dog running", encoding="utf-8")
    _img(data / "1_dog" / "tiny.png", 8, 8)
    (data / "1_dog" / "notes.pdf").write_bytes(b"%PDF")
    cfg = TrainingConfig.from_dict({"data": {"path": str(data), "buckets": {"resolutions": [64], "step": 16,
                                                                          "min_side": 32}}}).data
    o = overview(cfg)
    assert o["images"] == 3 and o["repeats"] == {1: 1, 3: 2} and o["samples_per_epoch"] == 7
    assert o["captions_found"] == 2 and o["missing_captions"] == ["b.png"]
    assert o["buckets"] == {"64x64": 4, "80x48": 3}  # samples (image × repeats) per bucket
    text = format_overview(o)
    assert text.splitlines()[0] == f"dataset {data}: 3 image(s) (1 × 1 repeat, 2 × 3 repeats) → 7 sample(s) per epoch"
    assert "captions: 2 found, 1 missing (trained on the trigger/class words alone): b.png" in text
    assert "buckets: 64x64 ×4, 80x48 ×3" in text
    assert "too small for a bucket: tiny.png @ 64" in text
    assert "skipped 1 file(s): notes.pdf" in text


def _help(*argv) -> None:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])


def test_help_shows_defaults(capsys):
    for argv, expected in ((["train"], ["(default: output)", "(default: auto)", "lora.rank; default 16",
                                        "--comfyui-models DIR", "--tokenizers DIR"]),
                           (["estimate"], ["(default: flux1-dev)", "(default: 8.0)", "(default: [512, 1024])"]),
                           (["demo"], ["(default: output)"])):
        _help(*argv)
        out = capsys.readouterr().out
        for text in expected:
            assert text in " ".join(out.split()), (argv, text, out)
        assert "(default: None)" not in out


PROBE = """
import sys
from trainer_core.terminal import quiet_libraries
quiet_libraries(sys.argv[1] == "verbose")
import diffusers  # imports bitsandbytes where installed (its CPU kernels note)
from transformers import CLIPTextConfig
CLIPTextConfig(vocab_size=10)  # default bos/eos ids outside the vocabulary: transformers warns
"""


QUIET_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                   "TRANSFORMERS_NO_ADVISORY_WARNINGS")


def test_no_third_party_noise_unless_verbose():
    # a clean environment: an in-process cli.main earlier in this session set the quiet variables here
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARIABLES}
    run = lambda m: subprocess.run([sys.executable, "-c", PROBE, m], cwd=ROOT, capture_output=True,  # noqa: E731
                                   text=True, timeout=300, env=env)
    loud, quiet = run("verbose"), run("quiet")
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr
    assert "bos_token_id" in loud.stdout + loud.stderr  # the probe does make noise when allowed to
    assert quiet.stdout + quiet.stderr == ""
