"""Every LoRA algorithm through ``train_lora``: exact resume with EMA and DOP, metadata, and
continuing from a saved file (``lora.init_from``) in each key form."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora_variants import UNFUSED

from trainer_core.lora import io as lora_io
from trainer_core.lora import records as lora_records
from trainer_core.lora.formats import apply_to_module
from trainer_core.session import check_adapter, seeded_inject

TARGETS = {"lora": {}, "dora": {}, "loha": {}, "lokr": {"lora.targets": "custom", "lora.target_regex": UNFUSED}}


def _stop_after(k: int):
    seen: list[int] = []
    return (lambda step, total, logs: seen.append(step)), (lambda: bool(seen) and seen[-1] >= k)


@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr"])
def test_stop_and_resume_equals_uninterrupted(tiny_training, algorithm):
    settings = {"lora.algorithm": algorithm, **TARGETS[algorithm], "train.steps": 4, "train.save_every": 2,
                "ema.enabled": True, "ema.decay": 0.9, "dop.enabled": True, "data.captions.class_word": "thing"}
    full = tiny_training.train(tiny_training.config(**settings, **{"train.output_name": "full"}))
    cfg = tiny_training.config(**settings, **{"train.output_name": "split"})
    progress, stop = _stop_after(3)
    first = tiny_training.train(cfg, progress=progress, should_stop=stop)
    assert (first.steps, first.reason) == (3, "stopped")
    first.network.remove()
    second = tiny_training.train(cfg)
    assert (second.steps, second.reason) == (4, "finished")
    a, b = full.network.state_dict(), second.network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    fa, fb = load_file(full.lora_path), load_file(second.lora_path)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    _, md = lora_io.load_lora_file(str(full.lora_path))
    assert md["flowtrain.algorithm"] == algorithm
    assert md["ss_network_module"] == "lycoris.kohya"
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == ("lora" if algorithm == "dora" else algorithm)
    assert (args.get("dora_wd") == "True") == (algorithm == "dora")


def test_lokr_on_split_layers_is_refused_before_training(tiny_training):
    cfg = tiny_training.config(**{"lora.algorithm": "lokr"})
    with pytest.raises(ValueError, match="lokr.*row slices of one fused"):
        tiny_training.train(cfg)
    assert not (tiny_training.out / "run").exists()


def _as_form(tensors: dict, form: str) -> dict:
    """Our kohya file in another key form ComfyUI reads (the same adapter)."""
    return lora_records.encode(lora_records.decode(tensors),
                               "flux1_kohya" if form == "kohya" else "flux2_diffusion_model")


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr"])
@pytest.mark.parametrize("form", ["kohya", "diffusion_model"])
def test_continuing_reproduces_the_file_at_step_0(tiny_training, algorithm, form, tmp_path):
    from tiny_run import tiny_model  # the same tiny model as tiny_parts() ("conftest" may name tests/comfyui's)

    settings = {"lora.algorithm": algorithm, **TARGETS[algorithm], "optim.lr": 1e-2}
    first = tiny_training.train(tiny_training.config(**settings))
    tensors, md = lora_io.load_lora_file(str(first.lora_path))
    path = tmp_path / f"{form}.safetensors"
    lora_io.save_lora_file(str(path), _as_form(tensors, form), md if form == "kohya" else {})
    cfg = tiny_training.config(**settings, **{"lora.init_from": str(path), "train.output_name": "next"})
    model = tiny_model()
    fresh = copy.deepcopy(model.module)
    plan = check_adapter(cfg, model)
    assert plan.ranks == {}  # fused q/k/v blocks split back to their own rank
    net = seeded_inject(cfg, model, plan)
    g = torch.Generator().manual_seed(0)
    x = {"hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 5, 64, generator=g),
         "pooled_projections": torch.randn(1, 16, generator=g), "timestep": torch.tensor([0.5]),
         "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)}
    with torch.no_grad():
        got = model.module(**x, return_dict=False)[0]
        want_base = fresh(**x, return_dict=False)[0]

        class Namer:
            module = fresh
            bfl_name = staticmethod(model.bfl_name)

        apply_to_module(fresh, Namer, load_file(str(path)), "flux1_kohya")
        want = fresh(**x, return_dict=False)[0]
    assert (want - want_base).abs().max() > 1e-4  # the file changes the model...
    assert (got - want).abs().max() <= 1e-5  # ...and the continued network starts exactly there
    net.remove()


def test_continuation_mismatch_names_both(tiny_training, tmp_path):
    first = tiny_training.train(tiny_training.config(**{"lora.algorithm": "loha"}))
    cases = [({"lora.algorithm": "lora"}, "holds a 'loha' adapter but lora.algorithm='lora'"),
             ({"lora.algorithm": "loha", "lora.rank": 8}, "rank 4 but lora.rank=8"),
             ({"lora.algorithm": "loha", "lora.alpha": 2.0}, "alpha 4 but lora.alpha=2"),
             ({"lora.algorithm": "loha", "lora.targets": "all"}, "only in the config")]
    for dotted, message in cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
            tiny_training.train(tiny_training.config(**dotted, **{"lora.init_from": str(first.lora_path),
                                                                  "train.output_name": "again"}))
    cont = tiny_training.train(tiny_training.config(**{"lora.algorithm": "loha", "lora.init_from": str(first.lora_path),
                                                       "train.output_name": "cont"}))
    _, md = lora_io.load_lora_file(str(cont.lora_path))
    assert md["ss_continued_from"] == "lora_final.safetensors"


def test_cli_flags_set_the_algorithm_and_init_from(tmp_path):
    from trainer_core.cli import build_parser, make_config

    args = build_parser().parse_args(["train", "--model", str(tmp_path), "--data", str(tmp_path),
                                      "--algorithm", "lokr", "--init-from", str(tmp_path / "old.safetensors")])
    cfg = make_config(args, {})
    assert cfg.lora.algorithm == "lokr" and cfg.lora.init_from == str(tmp_path / "old.safetensors")


def test_resuming_with_another_algorithm_is_refused(tiny_training):
    tiny_training.train(tiny_training.config(**{"lora.algorithm": "loha"}))
    with pytest.raises(ValueError, match="lora.algorithm: 'loha' -> 'dora'"):
        tiny_training.train(tiny_training.config(**{"lora.algorithm": "dora", "train.steps": 6}))
