"""Reference (control) latents of edit models: where their tokens sit in the position grid.

FLUX.1 Kontext and FLUX.2 (dev, Klein) edit an image by attending to the tokens of one or
more clean reference latents appended after the target's tokens; the model's output is cut
back to the target tokens, so a loss on the output covers the target only. Each reference
gets the position ids ``[index, row + h_offset, col + w_offset]`` (FLUX.2 adds a fourth
axis, 0), with ``(index, h_offset, w_offset)`` chosen by a *method*, as in ComfyUI's
``comfy/ldm/flux/model.py`` ``_forward`` (``ref_latents_method``, set by the
``FluxKontextMultiReferenceLatentMethod`` node; default "offset" for FLUX.1, "index" for
FLUX.2):

* ``offset``: index 1 for every reference; the first at (0, 0), each next one to the right
  of or below the extent of those before (right when its height plus the running height
  exceeds its width plus the running width, else below);
* ``index``: the index grows by the model's ``ref_index_scale`` per reference (FLUX.1: 1,
  FLUX.2: 10), no spatial offset;
* ``uxo``: index 0, each reference offset diagonally past the target and the previous
  references.

Offsets are in latent pixels; the module rounds them to tokens. The ComfyUI BFL module
does this itself (``BflFlux`` hands it ``ref_latents``); ``reference_placements`` is for
adapters that build ids themselves (``DiffusersFlux1``) and for tests.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

REFERENCE_METHODS = ("offset", "index", "uxo")


def check_method(method: Optional[str]) -> Optional[str]:
    if method is not None and method not in REFERENCE_METHODS:
        raise ValueError(f"reference method {method!r}; expected one of {list(REFERENCE_METHODS)} (or None for the "
                         "model's own default)")
    return method


def reference_placements(target_hw: tuple[int, int], reference_hws: Sequence[tuple[int, int]], method: str,
                         index_scale: float = 1.0, patch: int = 1) -> list[tuple[float, int, int]]:
    """``(index, h_offset, w_offset)`` per reference (offsets in latent pixels) for ``method``."""
    check_method(method)
    h_len, w_len = (target_hw[0] + patch // 2) // patch, (target_hw[1] + patch // 2) // patch
    out: list[tuple[float, int, int]] = []
    h = w = 0
    index = 0.0
    for rh, rw in reference_hws:
        if method == "index":
            index += index_scale
            out.append((index, 0, 0))
        elif method == "uxo":
            out.append((0.0, h_len * patch + h, w_len * patch + w))
            h, w = h + rh, w + rw
        else:
            h_off = w_off = 0
            if rh + h > rw + w:
                w_off = w
            else:
                h_off = h
            h, w = max(h, rh + h_off), max(w, rw + w_off)
            out.append((1.0, h_off, w_off))
    return out


def check_references(references: Optional[Sequence[torch.Tensor]], batch: int, channels: int,
                     multiple: int) -> list[torch.Tensor]:
    """The references as a list, each checked to be ``[batch, channels, h, w]`` with h and w
    multiples of ``multiple`` (the patch size); raises ValueError naming the reference."""
    refs = list(references or ())
    for i, r in enumerate(refs):
        if r.dim() != 4 or r.shape[0] != batch or r.shape[1] != channels:
            raise ValueError(f"reference {i} has shape {tuple(r.shape)}; expected [{batch}, {channels}, h, w] "
                             "(one clean latent per sample of the batch)")
        if r.shape[2] % multiple or r.shape[3] % multiple:
            raise ValueError(f"reference {i} latent {r.shape[2]}×{r.shape[3]} is not a multiple of the patch size "
                             f"{multiple}")
    return refs
