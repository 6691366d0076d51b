"""Continue training from an existing LoRA file (``lora.init_from``).

The file may be ours or any key form ``records.decode`` reads (kohya ``lora_unet_*``,
diffusers/peft ``transformer.*``, ComfyUI ``diffusion_model.*``), with any algorithm
ComfyUI loads. Its algorithm, rank, alpha and trained layers are read from the file and
must match the config; a mismatch is refused naming both. The network is then injected
with the file's per-layer ranks (a split file fused into ComfyUI's qkv has a larger rank
there) and set to the file's weights, so step 0 predicts exactly what the file does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from trainer_core.lora import records as lora_records
from trainer_core.lora.algorithms import ALGORITHMS
from trainer_core.lora.patch_rules import Record, record_algorithm
from trainer_core.lora.io import load_lora_file
from trainer_core.lora.network import matching_linears

log = logging.getLogger(__name__)


@dataclass
class InitPlan:
    path: str
    records: dict[str, Record]  # model module name → record
    ranks: dict[str, int] = field(default_factory=dict)  # modules whose rank differs from lora.rank
    key_form: str = ""


def plan(config: Any, model: Any, target_regex: str) -> InitPlan:
    """Read ``config.lora.init_from`` for ``model`` and check it against ``config.lora``."""
    lora = config.lora
    path = os.path.expanduser(lora.init_from)
    tensors, metadata = load_lora_file(path)
    name = os.path.basename(path)
    try:
        form = lora_records.key_form(tensors)
        per_bfl = lora_records.decode(tensors)
        per_module = lora_records.module_records(model.module, model.bfl_name, per_bfl)
    except ValueError as e:
        raise ValueError(f"lora.init_from={name!r}: {e}") from None
    algos = {record_algorithm(r) for r in per_module.values()}
    if len(algos) != 1:
        raise ValueError(f"lora.init_from={name!r} mixes adapter algorithms {sorted(algos)}; FlowTrain continues one")
    algo = algos.pop()
    if algo != lora.algorithm:
        raise ValueError(f"lora.init_from={name!r} holds a {algo!r} adapter but lora.algorithm={lora.algorithm!r}; "
                         f"set lora.algorithm={algo!r} to continue it")
    wanted = matching_linears(model.module, target_regex)
    if set(wanted) != set(per_module):
        only_file = sorted(set(per_module) - set(wanted))
        only_cfg = sorted(set(wanted) - set(per_module))
        raise ValueError(f"lora.init_from={name!r} trains other layers than lora.targets={lora.targets!r}: only in the "
                         f"file {only_file[:6]}, only in the config {only_cfg[:6]}; choose targets (or a custom "
                         "target_regex) that select exactly the file's layers")
    info = {n: ALGORITHMS.get(algo).shape_info(r) for n, r in per_module.items()}
    ranks = {n: i["rank"] for n, i in info.items() if i.get("rank") is not None}
    file_rank = int(metadata["ss_network_dim"]) if metadata.get("ss_network_dim", "").isdigit() else (
        min(ranks.values()) if ranks else lora.rank)
    if file_rank != lora.rank:
        raise ValueError(f"lora.init_from={name!r} has rank {file_rank} but lora.rank={lora.rank}; set lora.rank={file_rank}")
    alphas = [i["alpha"] * lora.rank / i["rank"] for i in info.values() if i.get("alpha") is not None and i.get("rank")]
    if metadata.get("ss_network_alpha"):
        alphas = [float(metadata["ss_network_alpha"])]
    if alphas and abs(alphas[0] - lora.alpha) > 1e-6 * max(1.0, lora.alpha):
        raise ValueError(f"lora.init_from={name!r} has alpha {alphas[0]:g} but lora.alpha={lora.alpha:g}; "
                         f"set lora.alpha={alphas[0]:g}")
    odd = {n: r for n, r in ranks.items() if r != lora.rank}
    log.info("continuing from %s (%s, %s keys, %d layers)", name, algo, form, len(per_module))
    return InitPlan(path=path, records=per_module, ranks=odd, key_form=form)
