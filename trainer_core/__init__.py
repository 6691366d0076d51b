"""FlowTrain's training library: FLUX-family LoRA training with no ComfyUI dependency.

Import what you need from the submodules; importing this package is cheap.
"""

FORMAT_VERSION = 1
