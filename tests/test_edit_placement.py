"""Where reference tokens sit (``models/references.py``, ComfyUI's ``ref_latents_method``), the
ids the diffusers adapter builds from it, and the memory planner counting reference tokens."""
from __future__ import annotations

import pytest
import torch

from trainer_core import memory
from trainer_core.models.diffusers_flux import image_ids
from trainer_core.models.references import reference_placements


def test_placements_per_method():
    refs = [(8, 8), (6, 10)]
    assert reference_placements((8, 8), refs, "offset", patch=2) == [(1.0, 0, 0), (1.0, 8, 0)]
    assert reference_placements((8, 8), [(8, 8), (10, 6)], "offset", patch=2) == [(1.0, 0, 0), (1.0, 0, 8)]
    assert reference_placements((8, 8), refs, "index", index_scale=10.0, patch=1) == [(10.0, 0, 0), (20.0, 0, 0)]
    assert reference_placements((8, 8), refs, "uxo", patch=2) == [(0.0, 8, 8), (0.0, 16, 16)]
    with pytest.raises(ValueError, match="reference method 'diagonal'"):
        reference_placements((8, 8), refs, "diagonal")


def test_reference_ids_are_offset_in_tokens():
    ids = image_ids(4, 6, index=1.0, h_offset=8, w_offset=2).reshape(2, 3, 3)
    assert torch.equal(ids[..., 0], torch.ones(2, 3))
    assert ids[:, 0, 1].tolist() == [4.0, 5.0] and ids[0, :, 2].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(image_ids(4, 4)[:, 0], torch.zeros(4))  # the target stays at index 0


def test_memory_counts_reference_tokens():
    shape = memory.known_shape(next(iter(memory.KNOWN_SHAPES)))
    plain = memory.RunShape(resolution=512)
    edit = plain.replace(references=1)
    assert memory.estimate(shape, edit).total > memory.estimate(shape, plain).total
    run = plain.replace(batch=1)
    assert (memory.activation_terms(shape, run.replace(references=1), "off")[1]
            > memory.activation_terms(shape, run, "off")[1])
