"""A LoRA file's tensors → a MODEL carrying them, the way core LoraLoaderModelOnly does."""
from __future__ import annotations

import logging

import comfy.sd


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def model_with_lora(model_patcher, lora_tensors: dict, strength: float = 1.0):
    """A clone of ``model_patcher`` with ``lora_tensors`` added as weight patches (what core
    LoraModelLoader does). Raises ValueError if ComfyUI reports any key it did not load."""
    root = logging.getLogger()
    handler, level = _Collect(), root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    try:
        patched = comfy.sd.load_lora_for_models(model_patcher, None, lora_tensors, strength, 0)[0]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    bad = [m for m in handler.messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
    if bad:
        raise ValueError(f"ComfyUI did not load {len(bad)} LoRA key(s), e.g. {bad[:3]}; the file does not fit this model")
    return patched
