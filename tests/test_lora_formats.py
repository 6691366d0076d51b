"""LoRA files: BFL names, fused kohya/diffusion_model layouts, merge-on-load, atomic IO."""

import copy
import json
import os

import pytest
import torch
from lora_tiny import run, tiny_flux, tiny_inputs

from trainer_core.config import LoRAConfig
from trainer_core.lora import io as lora_io
from trainer_core.lora.bfl_names import (
    bfl_target_presets,
    diffusers_flux1_namer,
    diffusers_flux1_to_bfl,
    flux_target_presets,
)
from trainer_core.lora.formats import (
    LORA_FORMATS,
    apply_to_module,
    bfl_from_kohya_stem,
    kohya_stem,
    to_bfl,
)
from trainer_core.lora.network import LoraNetwork
from trainer_core.types import BflSlot

D, MLP = 32, 128  # tiny model: 2 heads × 16, MLP ratio 4


class TinyFlux:
    """The FlowModel parts the LoRA formats use, over the diffusers module."""

    arch = "flux1"
    lora_format = "flux1_kohya"

    def __init__(self, module):
        self.module = module
        self.default_targets = flux_target_presets()
        self._namer = diffusers_flux1_namer(module)

    def bfl_name(self, name):
        return self._namer(name)


@pytest.fixture(scope="module")
def base():
    return tiny_flux()


def trained(base, regex, rank=4, alpha=6.0, seed=1):
    m = copy.deepcopy(base)
    net = LoraNetwork.inject(m, LoRAConfig(rank=rank, alpha=alpha), regex)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m, net


# ---------------------------------------------------------------------- names
def test_bfl_slots_cover_every_linear_with_matching_sizes(base):
    namer = diffusers_flux1_namer(base)
    for name, mod in base.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        slot = namer(name)
        if name == "norm_out.linear":
            assert slot is None  # BFL stores (shift, scale), diffusers (scale, shift)
            continue
        assert slot is not None, name
        if slot.fused:
            assert slot.sizes[slot.part] == mod.out_features, name
    assert diffusers_flux1_to_bfl("transformer_blocks.3.attn.add_k_proj", D, MLP) == BflSlot(
        "double_blocks.3.txt_attn.qkv", 1, (D, D, D)
    )
    assert diffusers_flux1_to_bfl("single_transformer_blocks.7.proj_mlp", D, MLP) == BflSlot(
        "single_blocks.7.linear1", 3, (D, D, D, MLP)
    )
    assert diffusers_flux1_to_bfl("single_transformer_blocks.7.proj_out", D, MLP) == BflSlot("single_blocks.7.linear2")
    assert diffusers_flux1_to_bfl("proj_out", D, MLP) == BflSlot("final_layer.linear")
    assert diffusers_flux1_to_bfl("time_text_embed.guidance_embedder.linear_2", D, MLP) == BflSlot(
        "guidance_in.out_layer"
    )
    assert diffusers_flux1_to_bfl("transformer_blocks.0.attn.norm_q", D, MLP) is None


def test_bfl_presets_select_comfyui_block_names():
    p = bfl_target_presets()
    names = [
        "double_blocks.2.img_attn.qkv",
        "double_blocks.2.txt_attn.proj",
        "single_blocks.10.linear1",
        "single_blocks.0.linear2",
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.txt_mlp.2",
        "double_blocks.0.img_mod.lin",
        "single_blocks.0.modulation.lin",
        "img_in",
        "final_layer.linear",
    ]
    import re

    att = [n for n in names if re.fullmatch(p["attention"], n)]
    al = [n for n in names if re.fullmatch(p["all"], n)]
    assert att == names[:4]
    assert al == names[:6]


def test_kohya_stems_invert_for_every_bfl_name():
    names = [
        "double_blocks.0.img_attn.qkv",
        "double_blocks.18.txt_mod.lin",
        "double_blocks.1.img_mlp.2",
        "single_blocks.37.linear1",
        "single_blocks.0.modulation.lin",
        "img_in",
        "txt_in",
        "time_in.in_layer",
        "vector_in.out_layer",
        "guidance_in.in_layer",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
        "double_stream_modulation_img.lin",
        "single_stream_modulation.lin",
    ]
    for n in names:
        assert bfl_from_kohya_stem(kohya_stem(n)) == n
    assert kohya_stem("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    with pytest.raises(ValueError, match="no FLUX BFL module"):
        bfl_from_kohya_stem("lora_unet_down_blocks_0_attentions_0_proj_in")


# ---------------------------------------------------------------------- formats
def _stems(tensors):
    return {k.split(".")[0] for k in tensors}


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("attention", set()),
        (
            "all",
            {
                "double_blocks_0_img_mlp_0",
                "double_blocks_0_img_mlp_2",
                "double_blocks_0_txt_mlp_0",
                "double_blocks_0_txt_mlp_2",
            },
        ),
    ],
)
def test_kohya_key_set_and_shapes(base, preset, extra):
    m, net = trained(base, flux_target_presets()[preset])
    t = LORA_FORMATS.get("flux1_kohya").to_tensors(net, TinyFlux(m))
    expected = {
        "double_blocks_0_img_attn_qkv",
        "double_blocks_0_img_attn_proj",
        "double_blocks_0_txt_attn_qkv",
        "double_blocks_0_txt_attn_proj",
        "single_blocks_0_linear1",
        "single_blocks_0_linear2",
    } | extra
    assert _stems(t) == {f"lora_unet_{s}" for s in expected}
    for s in _stems(t):
        assert {f"{s}.lora_down.weight", f"{s}.lora_up.weight", f"{s}.alpha"} <= set(t)
    assert set(t) == {f"{s}.{x}" for s in _stems(t) for x in ("lora_down.weight", "lora_up.weight", "alpha")}
    # ΔW = up @ down has the shape of the BFL weight; fused rank = sum of part ranks
    bfl_shapes = {
        "img_attn_qkv": (3 * D, D),
        "linear1": (3 * D + MLP, D),
        "linear2": (D, D + MLP),
        "img_attn_proj": (D, D),
    }
    for suffix, shape in bfl_shapes.items():
        stem = next(s for s in _stems(t) if s.endswith(suffix))
        up, down = t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"]
        assert (up.shape[0], down.shape[1]) == shape
    assert t["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 6.0  # unfused: cfg alpha
    assert t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12
    assert t["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == pytest.approx(6.0 / 4 * 12)
    assert t["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == (16 if preset == "all" else 12)


@pytest.mark.parametrize("fmt", ["flux1_kohya", "flux2_diffusion_model"])
@pytest.mark.parametrize("preset", ["attention", "all"])
def test_saved_file_merged_into_fresh_model_reproduces_predictions(base, tmp_path, fmt, preset):
    m, net = trained(base, flux_target_presets()[preset])
    x = tiny_inputs()
    want = run(m, x)
    assert (want - run(base, x)).abs().max() > 1e-3
    path = str(tmp_path / "lora.safetensors")
    lora_io.save_lora_file(path, LORA_FORMATS.get(fmt).to_tensors(net, TinyFlux(m)), {"k": "v"})
    tensors, _ = lora_io.load_lora_file(path)
    fresh = copy.deepcopy(base)
    changed = apply_to_module(fresh, TinyFlux(fresh), tensors, fmt)
    assert set(net.modules_trained()) <= set(changed)
    assert (run(fresh, x) - want).abs().max() <= 1e-5


def test_fused_parts_are_exact_when_only_some_are_trained(base):
    regex = r"transformer_blocks\.0\.attn\.(?:to_q|to_v)|single_transformer_blocks\.0\.(?:attn\.to_k|proj_mlp)"
    m, net = trained(base, regex, rank=3, alpha=5.0)
    w = net.weights()
    t = LORA_FORMATS.get("flux1_kohya").to_tensors(net, TinyFlux(m))
    assert _stems(t) == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
    }
    deltas = LORA_FORMATS.get("flux1_kohya").from_tensors(t)
    down, up, scale = deltas["double_blocks.0.img_attn.qkv"]
    assert down.shape == (6, D) and up.shape == (3 * D, 6)
    assert scale * 6 == pytest.approx(t["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item())
    dw = scale * up @ down
    for part, name in [
        (0, "transformer_blocks.0.attn.to_q"),
        (2, "transformer_blocks.0.attn.to_v"),
    ]:
        a, b, s = w[name]
        torch.testing.assert_close(dw[part * D : (part + 1) * D], s * b @ a, atol=1e-6, rtol=1e-6)
    assert torch.equal(dw[D : 2 * D], torch.zeros(D, D))  # to_k untrained
    down, up, scale = deltas["single_blocks.0.linear1"]
    dw = scale * up @ down
    a, b, s = w["single_transformer_blocks.0.proj_mlp"]
    torch.testing.assert_close(dw[3 * D :], s * b @ a, atol=1e-6, rtol=1e-6)
    assert torch.equal(dw[:D], torch.zeros(D, D)) and torch.equal(dw[2 * D : 3 * D], torch.zeros(D, D))
    fresh = copy.deepcopy(base)
    apply_to_module(fresh, TinyFlux(fresh), t, "flux1_kohya")
    assert (run(fresh, tiny_inputs()) - run(m, tiny_inputs())).abs().max() <= 1e-5


def test_flux2_round_trip_returns_the_same_deltas(base):
    m, net = trained(base, flux_target_presets()["all"], alpha=3.0)
    fmt = LORA_FORMATS.get("flux2_diffusion_model")
    t = fmt.to_tensors(net, TinyFlux(m))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in t
    assert not any("alpha" in k for k in t)
    want = to_bfl(net.weights(), TinyFlux(m).bfl_name)
    got = fmt.from_tensors(t)
    assert set(got) == set(want)
    for k, (down, up, s) in want.items():
        d2, u2, s2 = got[k]
        assert s2 == 1.0
        torch.testing.assert_close(s2 * u2 @ d2, s * up @ down, atol=1e-6, rtol=1e-6)
    kohya = LORA_FORMATS.get("flux1_kohya")
    back = kohya.from_tensors(kohya.to_tensors(net, TinyFlux(m)))
    for k, (down, up, s) in want.items():
        torch.testing.assert_close(back[k][2] * back[k][1] @ back[k][0], s * up @ down, atol=1e-6, rtol=1e-6)


def test_unmappable_module_and_wrong_model_are_refused(base, tmp_path):
    m, net = trained(base, r"norm_out\.linear")
    with pytest.raises(ValueError, match="no BFL"):
        LORA_FORMATS.get("flux1_kohya").to_tensors(net, TinyFlux(m))
    t = {
        "lora_unet_double_blocks_5_img_attn_proj.lora_down.weight": torch.zeros(2, D),
        "lora_unet_double_blocks_5_img_attn_proj.lora_up.weight": torch.zeros(D, 2),
    }
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="no counterpart"):
        apply_to_module(fresh, TinyFlux(fresh), t, "flux1_kohya")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        LORA_FORMATS.get("nope")


# ---------------------------------------------------------------------- real ComfyUI
COMFY_DIR = os.environ.get("COMFYUI_PATH", "")

_COMFY_SCRIPT = r"""
import json, sys
comfy_dir, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
sys.path.insert(0, os.path.dirname(comfy_dir))
try:
    import comfyui_tv_shim  # lets a CUDA torchvision wheel import next to CPU torch, where present
    comfyui_tv_shim.install()
except ImportError:
    pass
import torch
try:
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_patcher, comfy.sd, comfy.supported_models, comfy.utils
except Exception as e:  # ComfyUI (or one of its dependencies) is not importable here
    print("NOCOMFY " + repr(e))
    sys.exit(0)
from safetensors.torch import load_file
cfg = json.load(open(f"{work}/cases.json"))
unet_config = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "patch_size": 2,
    "out_channels": 16, "vec_in_dim": 16, "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0,
    "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000,
    "qkv_bias": True, "txt_ids_dims": []}
mc = comfy.supported_models.Flux(unet_config)
mc.set_inference_dtype(torch.float32, None)
model = mc.get_model({})
# diffusers weights -> ComfyUI's BFL layout with ComfyUI's own key map
dsd = load_file(f"{work}/base.safetensors")
bsd = {k: torch.zeros_like(v) for k, v in model.diffusion_model.state_dict().items()}
for k, v in dsd.items():
    to = comfy.utils.flux_to_diffusers(unet_config, output_prefix="")[k]
    if isinstance(to, str):
        bsd[to] = v
    elif to[1] is None:
        bsd[to[0]] = to[2](v)  # swap_scale_shift is its own inverse
    else:
        name, (dim, off, size) = to
        bsd[name][off:off + size] = v
model.diffusion_model.load_state_dict(bsd, strict=True)
x = load_file(f"{work}/inputs.safetensors")
def run(dm):
    with torch.no_grad():
        b = x["img"].shape[0]
        return dm.forward_orig(x["img"], x["img_ids"][None].expand(b, -1, -1), x["txt"],
                               x["txt_ids"][None].expand(b, -1, -1), x["t"], x["y"], x["guidance"])
out = {"base": (run(model.diffusion_model) - x["want_base"]).abs().max().item()}
for case in cfg:
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(f"{work}/{case}.safetensors"), 1.0, 0)
    patched.patch_model()
    out[case] = (run(patched.model.diffusion_model) - load_file(f"{work}/{case}.want.safetensors")["y"]).abs().max().item()
    patched.unpatch_model()
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(COMFY_DIR, "comfy", "lora.py")),
    reason="set COMFYUI_PATH to a ComfyUI checkout to run this",
)
def test_files_load_in_real_comfyui_and_match_our_predictions(base, tmp_path):
    """ComfyUI (in a subprocess, so this process never imports comfy) loads our files with
    its own LoraLoader key mapping into its own BFL-layout FLUX model; its patched outputs
    must equal our LoRA-injected diffusers model's."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    x = tiny_inputs()
    save_file(
        {k: v.contiguous() for k, v in base.state_dict().items()},
        str(tmp_path / "base.safetensors"),
    )
    save_file(
        {
            "img": x["hidden_states"],
            "img_ids": x["img_ids"],
            "txt": x["encoder_hidden_states"],
            "txt_ids": x["txt_ids"],
            "t": x["timestep"],
            "y": x["pooled_projections"],
            "guidance": x["guidance"],
            "want_base": run(base, x),
        },
        str(tmp_path / "inputs.safetensors"),
    )
    partial = (
        r"transformer_blocks\.0\.attn\.(?:to_q|to_v|add_k_proj)|single_transformer_blocks\.0\.(?:attn\.to_k|proj_mlp)"
    )
    cases = {}
    for fmt in ("flux1_kohya", "flux2_diffusion_model"):
        for label, regex in (
            ("all", flux_target_presets()["all"]),
            ("partial", partial),
        ):
            m, net = trained(base, regex)
            name = f"{fmt}-{label}"
            tensors = LORA_FORMATS.get(fmt).to_tensors(net, TinyFlux(m))
            lora_io.save_lora_file(str(tmp_path / f"{name}.safetensors"), tensors, {})
            save_file({"y": run(m, x)}, str(tmp_path / f"{name}.want.safetensors"))
            cases[name] = (run(m, x) - run(base, x)).abs().max().item()
    (tmp_path / "cases.json").write_text(json.dumps(list(cases)))
    proc = subprocess.run(
        [sys.executable, "-c", "import os\n" + _COMFY_SCRIPT, COMFY_DIR, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = proc.stdout.splitlines()
    if any(ln.startswith("NOCOMFY") for ln in lines):
        pytest.skip(f"ComfyUI is not importable here: {proc.stdout[-500:]}")
    line = next((ln for ln in lines if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    diffs = json.loads(line[len("RESULT") :])
    assert diffs["base"] <= 1e-5  # the weight conversion itself is exact
    for name, lora_effect in cases.items():
        assert lora_effect > 1e-3, name  # the LoRA changes the output...
        assert diffs[name] <= 1e-5, (name, diffs[name])  # ...and ComfyUI reproduces it
