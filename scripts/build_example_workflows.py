"""Writes the example workflows in both formats from one description, so they stay in step:
``example_workflows/<title>.json`` (UI/LiteGraph format: what ComfyUI's template browser
lists, titled by the file name, with ``<title>.jpg`` as its thumbnail) and
``example_workflows/api/<id>.json`` (API format: what the tests submit).

Run: ``python scripts/build_example_workflows.py``. ``tests/test_node_specs.py`` checks
the files against each other and against the nodes' widget lists.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUTPUT_TYPES = {
    "UNETLoader": ["MODEL"], "DualCLIPLoader": ["CLIP"], "CLIPLoader": ["CLIP"], "VAELoader": ["VAE"],
    "CLIPTextEncode": ["CONDITIONING"], "FluxGuidance": ["CONDITIONING"], "EmptySD3LatentImage": ["LATENT"],
    "EmptyFlux2LatentImage": ["LATENT"], "KSampler": ["LATENT"], "VAEDecode": ["IMAGE"], "SaveImage": [],
    "PreviewImage": [], "LoadImage": ["IMAGE", "MASK"], "VAEEncode": ["LATENT"], "ReferenceLatent": ["CONDITIONING"],
    "FlowTrainDataset": ["FLOWTRAIN_DATASET"], "FlowTrainBucketer": ["FLOWTRAIN_DATASET"],
    "FlowTrainCaptions": ["FLOWTRAIN_DATASET"], "FlowTrainLoraConfig": ["FLOWTRAIN_LORA_CONFIG"],
    "FlowTrainPreviewSettings": ["FLOWTRAIN_PREVIEW"], "FlowTrainDopSettings": ["FLOWTRAIN_DOP"],
    "FlowTrainTrainer": ["MODEL", "LORA_MODEL", "STRING", "IMAGE"], "FlowTrainSaveLora": ["STRING"],
    "FlowTrainSamplerPreview": ["IMAGE"], "FlowTrainLossSettings": ["FLOWTRAIN_SETTINGS"],
    "FlowTrainOptimizerSettings": ["FLOWTRAIN_SETTINGS"], "FlowTrainEmaSettings": ["FLOWTRAIN_SETTINGS"],
    "FlowTrainAugmentSettings": ["FLOWTRAIN_SETTINGS"], "FlowTrainMemorySettings": ["FLOWTRAIN_SETTINGS"],
    "FlowTrainRunSettings": ["FLOWTRAIN_SETTINGS"],
}
# input sockets a node shows, linked or not (others: its links)
SOCKETS = {"FlowTrainTrainer": 9, "FlowTrainSamplerPreview": 3, "FlowTrainDopSettings": 1, "KSampler": 4}
MULTILINE = {"prompts", "text"}  # widgets drawn as a text box
WIDTH, GAP, COLUMN = 340, 40, 400


def node_size(n: "N") -> list[int]:
    """A size no smaller than the frontend draws the node: title, slot rows, widget rows, and
    a taller row for each multiline text box."""
    if n.type == "MarkdownNote":
        return [WIDTH, 380]
    outputs = len(OUTPUT_TYPES.get(n.type, []))
    slots = max(SOCKETS.get(n.type, len(n.links)), outputs)
    rows = len(n.widgets) + len(n.ui_extra)
    tall = sum(1 for name in n.widgets if name in MULTILINE)
    return [WIDTH, 40 + 22 * slots + 26 * rows + 90 * tall]


def layout(nodes: list["N"]) -> None:
    """Positions from sizes: ``pos`` gives a node's column (x // COLUMN) and its order in the
    column (y); nodes of a column are stacked with a gap, so none overlap."""
    columns: dict[int, list] = {}
    for n in nodes:
        columns.setdefault(round(n.pos[0] / COLUMN), []).append(n)
    for col, members in columns.items():
        y = 0
        for n in sorted(members, key=lambda m: m.pos[1]):
            n.pos = (col * COLUMN, y)
            y += node_size(n)[1] + GAP
OUTPUT_NAMES = {"FlowTrainTrainer": ["MODEL", "LORA", "lora_path", "loss_curve"]}
UI_ONLY = {"MarkdownNote"}


@dataclass
class N:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)       # name -> value, in schema order
    links: dict = field(default_factory=dict)         # input name -> (source id, slot, type)
    pos: tuple = (0, 0)
    title: str = ""
    ui_extra: list = field(default_factory=list)      # extra UI-only widget values after a name: (after, value)


def api_format(nodes: list[N]) -> dict:
    out = {}
    for n in nodes:
        if n.type in UI_ONLY:
            continue
        inputs = dict(n.widgets)
        inputs.update({k: [str(src), slot] for k, (src, slot, _) in n.links.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def ui_format(nodes: list[N]) -> dict:
    links, by_id = [], {n.id: n for n in nodes}
    out_links: dict = {}
    for n in nodes:
        for slot_in, (name, (src, slot, typ)) in enumerate(n.links.items()):
            lid = len(links) + 1
            links.append([lid, src, slot, n.id, slot_in, typ])
            out_links.setdefault((src, slot), []).append(lid)
    ui_nodes = []
    for order, n in enumerate(nodes):
        values = []
        for name, value in n.widgets.items():
            values.append(value)
            values.extend(v for after, v in n.ui_extra if after == name)
        inputs = [{"name": name, "type": typ, "link": links_for}
                  for name, (src, slot, typ), links_for in
                  [(k, v, next(l[0] for l in links if l[3] == n.id and l[1] == v[0] and l[2] == v[1]
                                and n.links[k] is v)) for k, v in n.links.items()]]
        names = OUTPUT_NAMES.get(n.type, OUTPUT_TYPES.get(n.type, []))
        outputs = [{"name": names[i], "type": t, "links": out_links.get((n.id, i), []), "slot_index": i}
                   for i, t in enumerate(OUTPUT_TYPES.get(n.type, []))]
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": node_size(n),
                "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type}, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    digest = hashlib.sha256(json.dumps([n.type for n in nodes]).encode()).hexdigest()
    return {"id": f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}",
            "revision": 0, "last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}},
            "version": 0.4}


def common_training(first: int, *, clip: tuple, vae: int, model: int, trigger: str, class_word: str, name: str,
                    prompt: str, guidance_train: float, preview_guidance: float, res: str, x0: int = 420,
                    validation_every: int = 0, folder: str = "flowtrain_dataset", edit: bool = False) -> list[N]:
    d, b, c, l, p, t, s, sp, si = range(first, first + 9)
    return [
        N(d, "FlowTrainDataset", {"folder": folder, "caption_extension": ".txt", "strict": False,
                                  "control_images": edit}, pos=(x0, 0)),
        N(b, "FlowTrainBucketer", {"resolutions": res, "step": 64, "min_side": 256, "max_side": 2048,
                                   "allow_upscale": False}, {"dataset": (d, 0, "FLOWTRAIN_DATASET")}, pos=(x0, 180)),
        N(c, "FlowTrainCaptions", {"trigger_word": trigger, "class_word": class_word, "keep_tokens": 1, "separator": ",",
                                   "shuffle": False, "caption_dropout": 0.05},
          {"dataset": (b, 0, "FLOWTRAIN_DATASET")}, pos=(x0, 420)),
        N(l, "FlowTrainLoraConfig", {"rank": 16, "alpha": 16.0, "dropout": 0.0, "targets": "attention",
                                     "target_regex": "", "dtype": "fp32", "algorithm": "lora", "lokr_factor": -1,
                                     "lokr_decompose_both": False, "lokr_full_matrix": False}, pos=(x0, 680)),
        N(p, "FlowTrainPreviewSettings", {"every_n_steps": 250, "prompts": prompt, "seed": 0, "steps": 20,
                                          "width": 512, "height": 512, "guidance": preview_guidance,
                                          "validation_every": validation_every, "validation_images": 2},
                         pos=(x0, 900)),
        N(t, "FlowTrainTrainer", {"preset": "auto", "steps": 1000, "learning_rate": 1e-4, "optimizer": "adamw",
                                  "batch_size": 1, "memory_budget": "auto", "seed": 42, "save_every": 250,
                                  "output_name": name, "existing_lora": ""},
          {"model": (model, 0, "MODEL"), "vae": (vae, 0, "VAE"), "dataset": (c, 0, "FLOWTRAIN_DATASET"),
           "lora_config": (l, 0, "FLOWTRAIN_LORA_CONFIG"), "clip": clip + ("CLIP",),
           "preview": (p, 0, "FLOWTRAIN_PREVIEW")}, pos=(x0 + 380, 0)),
        N(s, "FlowTrainSaveLora", {"name": name}, {"lora": (t, 1, "LORA_MODEL")}, pos=(x0 + 760, 0)),
        N(sp, "FlowTrainSamplerPreview", {"prompts": prompt, "trigger_word": trigger, "seed": 0, "steps": 20,
                                          "guidance": preview_guidance, "sampler_name": "euler", "scheduler": "simple",
                                          "width": 512, "height": 512, "mode": "images", "strengths": "0, 0.5, 1.0"},
          {"model": (t, 0, "MODEL"), "vae": (vae, 0, "VAE"), "clip": clip + ("CLIP",)}, pos=(x0 + 760, 160)),
        N(si, "SaveImage", {"filename_prefix": f"flowtrain/{name}_preview"}, {"images": (sp, 0, "IMAGE")},
          pos=(x0 + 1140, 160)),
    ]


def loaders(unet: str, vae: str, note: str, *, qwen: str = "") -> list[N]:
    """Nodes 1-4: the diffusion model, the text encoder(s) (FLUX.1's CLIP-L + T5, or Qwen3-4B
    through CLIPLoader of type ``qwen``), the VAE and the read-me note."""
    clip = N(2, "CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": qwen, "device": "default"}, pos=(0, 160)) \
        if qwen else N(2, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                             "type": "flux", "device": "default"}, pos=(0, 160))
    return [N(1, "UNETLoader", {"unet_name": unet, "weight_dtype": "default"}, pos=(0, 0)), clip,
            N(3, "VAELoader", {"vae_name": vae}, pos=(0, 360)),
            N(4, "MarkdownNote", {"text": note}, pos=(0, 500), title="Read me")]


def cfg_prompts(prompt: str, latent_type: str) -> list[N]:
    """Prompt (20), an empty negative (22) and a 512² empty latent (23) for a CFG-sampled model."""
    return [
        N(20, "CLIPTextEncode", {"text": prompt}, {"clip": (2, 0, "CLIP")}, pos=(1180, 480), title="Prompt"),
        N(22, "CLIPTextEncode", {"text": ""}, {"clip": (2, 0, "CLIP")}, pos=(1180, 820), title="Negative"),
        N(23, latent_type, {"width": 512, "height": 512, "batch_size": 1}, pos=(1180, 960)),
    ]


def sample_chain(name: str, *, positive: int, latent: int, cfg: float, steps: int = 20, model: int = 10,
                 negative: int = 22, vae: int = 3) -> list[N]:
    """KSampler (24) → VAEDecode (25) → SaveImage (26) on the trained MODEL: the usual sampling
    graph beside the Trainer, saved as ``flowtrain/<name>_ksampler``."""
    return [
        N(24, "KSampler", {"seed": 0, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
                           "denoise": 1.0},
          {"model": (model, 0, "MODEL"), "positive": (positive, 0, "CONDITIONING"),
           "negative": (negative, 0, "CONDITIONING"), "latent_image": (latent, 0, "LATENT")},
          pos=(1560, 480), ui_extra=[("seed", "fixed")]),
        N(25, "VAEDecode", {}, {"samples": (24, 0, "LATENT"), "vae": (vae, 0, "VAE")}, pos=(1940, 480)),
        N(26, "SaveImage", {"filename_prefix": f"flowtrain/{name}_ksampler"}, {"images": (25, 0, "IMAGE")},
          pos=(2200, 480)),
    ]


NOTE_FLUX1 = """## FlowTrain: FLUX.1-dev subject LoRA

Put the model files here:
- `models/diffusion_models/flux1-dev.safetensors` (FLUX.1-dev transformer; fp8 works too)
- `models/text_encoders/clip_l.safetensors` and `models/text_encoders/t5xxl_fp16.safetensors` (or t5xxl_fp8_e4m3fn)
- `models/vae/ae.safetensors` (FLUX.1 VAE)

Put 10-30 photos of your subject in `input/flowtrain_dataset/` with same-name `.txt` captions
(e.g. `sks person, smiling, outdoors`). Press Queue: the Trainer shows the loss chart, saves
`output/flowtrain/flux1_subject/lora_final.safetensors`, Save LoRA copies it to `models/loras/`,
and the nodes on the right sample with the new LoRA in the same run."""

NOTE_KLEIN = """## FlowTrain: FLUX.2 Klein style LoRA

Put the model files here:
- `models/diffusion_models/flux-2-klein-base-4b.safetensors` (train on the base model)
- `models/text_encoders/qwen_3_4b.safetensors` (loaded by CLIPLoader with type `flux2`)
- `models/vae/flux2-vae.safetensors`

Put 20-50 images in the style in `input/flowtrain_dataset/` with captions describing the content
(the trigger word `xyzstyle` is added). Klein base samples with CFG (guidance = CFG scale here)."""


def flux1_dev_subject() -> list[N]:
    nodes = loaders("flux1-dev.safetensors", "ae.safetensors", NOTE_FLUX1)
    nodes += common_training(5, clip=(2, 0), vae=3, model=1, trigger="sks", class_word="person",
                             name="flux1_subject", prompt="a photo of sks person at the beach",
                             guidance_train=1.0, preview_guidance=3.5, res="512")
    nodes += [
        N(20, "CLIPTextEncode", {"text": "a portrait photo of sks person in a cafe, soft light"},
          {"clip": (2, 0, "CLIP")}, pos=(1180, 480), title="Prompt"),
        N(21, "FluxGuidance", {"guidance": 3.5}, {"conditioning": (20, 0, "CONDITIONING")}, pos=(1180, 700)),
        N(22, "CLIPTextEncode", {"text": ""}, {"clip": (2, 0, "CLIP")}, pos=(1180, 820), title="Negative (unused at cfg 1)"),
        N(23, "EmptySD3LatentImage", {"width": 512, "height": 512, "batch_size": 1}, pos=(1180, 960)),
    ]
    nodes += sample_chain("flux1_subject", positive=21, latent=23, cfg=1.0)
    return nodes


def flux2_klein_style() -> list[N]:
    nodes = loaders("flux-2-klein-base-4b.safetensors", "flux2-vae.safetensors", NOTE_KLEIN, qwen="flux2")
    nodes += common_training(5, clip=(2, 0), vae=3, model=1, trigger="xyzstyle", class_word="style",
                             name="flux2_klein_style", prompt="a lighthouse on a cliff, xyzstyle",
                             guidance_train=1.0, preview_guidance=4.0, res="512")
    nodes += cfg_prompts("a city street at night, xyzstyle", "EmptyFlux2LatentImage")
    nodes += sample_chain("flux2_klein_style", positive=20, latent=23, cfg=4.0)
    return nodes


NOTE_KLEIN_DOP = """## FlowTrain: FLUX.2 Klein subject LoRA with DOP

Put the model files here:
- `models/diffusion_models/flux-2-klein-base-4b.safetensors` (train on the base model, not the distilled one)
- `models/text_encoders/qwen_3_4b.safetensors` (Klein's Qwen3 text encoder; CLIPLoader type `flux2`)
- `models/vae/flux2-vae.safetensors`

Put 10-30 photos of your subject in `input/flowtrain_dataset/` with captions such as
`sks person, smiling, outdoors`. **DOP** (Differential Output Preservation) trains the trigger
`sks` while keeping what the base model draws for the class word `person`, so other people do not
drift toward your subject; it costs about 2x per DOP step (raise `every_n_steps` to amortise).
Previews (every 250 steps; each prompt with and without the trigger) land in
`output/flowtrain/flux2_klein_subject_dop/previews/` (`baseline/`, `step_*/`, `final/`) and show under the
loss chart; the validation loss is drawn in `learning_curve.svg` there. The Sampler Preview on the right
renders the trained model with and without the trigger."""


def flux2_klein_subject_dop() -> list[N]:
    nodes = loaders("flux-2-klein-base-4b.safetensors", "flux2-vae.safetensors", NOTE_KLEIN_DOP, qwen="flux2")
    nodes += common_training(5, clip=(2, 0), vae=3, model=1, trigger="sks", class_word="person",
                             name="flux2_klein_subject_dop",
                             prompt="a photo of sks person at the beach\na portrait of sks person in a forest",
                             guidance_train=1.0, preview_guidance=4.0, res="512", validation_every=50)
    trainer = next(n for n in nodes if n.type == "FlowTrainTrainer")
    dop = N(20, "FlowTrainDopSettings", {"enabled": True, "class_word": "person", "multiplier": 1.0, "every_n_steps": 1,
                                         "gradient_surgery": False}, pos=(420, 1160), title="DOP")
    trainer.links["dop"] = (dop.id, 0, "FLOWTRAIN_DOP")
    nodes.insert(nodes.index(trainer), dop)  # before the Trainer: the order ComfyUI runs them in
    return nodes


NOTE_ZIMAGE = """## FlowTrain: Z-Image style LoRA

Put the model files here:
- `models/diffusion_models/z_image_bf16.safetensors` (Z-Image base; train on the base model, not Turbo)
- `models/text_encoders/qwen_3_4b.safetensors` (Qwen3-4B; CLIPLoader with type `lumina2`)
- `models/vae/ae.safetensors` (the FLUX.1 VAE)

Put 20-50 images in the style in `input/flowtrain_dataset/` with captions describing the content
(the trigger word `xyzstyle` is added). Z-Image base samples with CFG (guidance = CFG scale, 3-5).
The LoRA is saved on ComfyUI's own Z-Image layer names (`diffusion_model.layers.N.attention.qkv`, ...)."""


def zimage_style() -> list[N]:
    nodes = loaders("z_image_bf16.safetensors", "ae.safetensors", NOTE_ZIMAGE, qwen="lumina2")
    nodes += common_training(5, clip=(2, 0), vae=3, model=1, trigger="xyzstyle", class_word="style",
                             name="zimage_style", prompt="a lighthouse on a cliff, xyzstyle",
                             guidance_train=1.0, preview_guidance=4.0, res="512")
    nodes += cfg_prompts("a city street at night, xyzstyle", "EmptySD3LatentImage")
    nodes += sample_chain("zimage_style", positive=20, latent=23, cfg=4.0, steps=25)
    return nodes


NOTE_KONTEXT = """## FlowTrain: FLUX.1 Kontext edit LoRA (paired images)

Put the model files here:
- `models/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors` (FLUX.1 Kontext dev; ComfyUI loads it as FLUX.1)
- `models/text_encoders/clip_l.safetensors` and `models/text_encoders/t5xxl_fp16.safetensors`
- `models/vae/ae.safetensors`

Dataset (`input/flowtrain_edit/`, the Dataset node's `control_images` is on): each edited image
(the *target*) with a caption that states the edit, and the original under the same name in a
`control/` folder beside it:

    flowtrain_edit/a.png, a.txt ("make it a watercolor painting"), control/a.png

(several references: `control_1/`, `control_2/`; in kohya `N_name` folders the `control/` goes
inside each). Training shows the model the reference the way ReferenceLatent does at inference.
Previews edit a held reference image with and without the LoRA (`previews/*/p0_edit_lora.png`,
`p0_edit_base.png`). Put an image to edit as `input/flowtrain_edit_input.png`: the Sampler Preview
renders its edit at LoRA strengths 0 and 1, and the KSampler chain below is the usual Kontext graph
(Load Image → VAE Encode → ReferenceLatent) on the trained MODEL. See docs/edit-loras.md."""


def flux1_kontext_edit() -> list[N]:
    nodes = loaders("flux1-dev-kontext_fp8_scaled.safetensors", "ae.safetensors", NOTE_KONTEXT)
    nodes += common_training(5, clip=(2, 0), vae=3, model=1, trigger="", class_word="", name="flux1_kontext_edit",
                             prompt="make it a watercolor painting", guidance_train=2.5, preview_guidance=2.5,
                             res="512", folder="flowtrain_edit", edit=True)
    t = 10
    sampler = next(n for n in nodes if n.type == "FlowTrainSamplerPreview")
    sampler.widgets.update(mode="grid", strengths="0, 1.0")
    sampler.links = {"model": (1, 0, "MODEL"), "vae": (3, 0, "VAE"), "clip": (2, 0, "CLIP"),
                     "lora": (t, 1, "LORA_MODEL"), "reference_image": (30, 0, "IMAGE")}
    nodes += [
        N(30, "LoadImage", {"image": "flowtrain_edit_input.png"}, pos=(1180, 1100), title="Image to edit",
          ui_extra=[("image", "image")]),
        N(31, "VAEEncode", {}, {"pixels": (30, 0, "IMAGE"), "vae": (3, 0, "VAE")}, pos=(1180, 1300)),
        N(20, "CLIPTextEncode", {"text": "make it a watercolor painting"}, {"clip": (2, 0, "CLIP")},
          pos=(1180, 480), title="Edit instruction"),
        N(32, "ReferenceLatent", {}, {"conditioning": (20, 0, "CONDITIONING"), "latent": (31, 0, "LATENT")},
          pos=(1180, 680)),
        N(21, "FluxGuidance", {"guidance": 2.5}, {"conditioning": (32, 0, "CONDITIONING")}, pos=(1180, 780)),
        N(22, "CLIPTextEncode", {"text": ""}, {"clip": (2, 0, "CLIP")}, pos=(1180, 880), title="Negative (unused at cfg 1)"),
    ]
    nodes += sample_chain("flux1_kontext_edit", positive=21, latent=31, cfg=1.0)
    return nodes


WORKFLOWS = {"flux1_dev_subject_lora": flux1_dev_subject, "flux2_klein_style_lora": flux2_klein_style,
             "flux2_klein_subject_dop": flux2_klein_subject_dop, "zimage_style_lora": zimage_style,
             "flux1_kontext_edit_lora": flux1_kontext_edit}
"""Workflow id (the API-format file the tests run) → its nodes."""

TITLES = {"flux1_dev_subject_lora": "FLUX.1-dev subject LoRA", "flux2_klein_style_lora": "FLUX.2 Klein style LoRA",
          "flux2_klein_subject_dop": "FLUX.2 Klein subject LoRA with DOP", "zimage_style_lora": "Z-Image style LoRA",
          "flux1_kontext_edit_lora": "FLUX.1 Kontext edit LoRA"}
"""Workflow id → the UI file's name, which ComfyUI's template browser shows as the title (and
the ``<title>.jpg`` beside it as the thumbnail)."""

KIND_COLORS = {"FlowTrainTrainer": (122, 74, 170), "FlowTrain": (74, 90, 150), "MarkdownNote": (70, 70, 70)}


def thumbnail(nodes: list[N], size: tuple[int, int] = (512, 384)):
    """A schematic picture of the graph (nodes as boxes with their titles, links as lines),
    drawn from the layout, for the template browser."""
    from PIL import Image, ImageDraw, ImageFont

    boxes = {n.id: (n.pos[0], n.pos[1], n.pos[0] + node_size(n)[0], n.pos[1] + node_size(n)[1]) for n in nodes}
    right = max(b[2] for b in boxes.values())
    bottom = max(b[3] for b in boxes.values())
    pad = 16
    scale = min((size[0] - 2 * pad) / right, (size[1] - 2 * pad) / bottom)
    at = lambda x, y: (pad + x * scale, pad + y * scale)  # noqa: E731
    image = Image.new("RGB", size, (32, 32, 36))
    draw = ImageDraw.Draw(image)
    for n in nodes:
        for src, _, _ in n.links.values():
            a, b = boxes[src], boxes[n.id]
            draw.line([at(a[2], a[1] + 30), at(b[0], b[1] + 30)], fill=(150, 150, 160), width=1)
    font = ImageFont.load_default()
    for n in nodes:
        x0, y0, x1, y1 = boxes[n.id]
        kind = n.type if n.type in KIND_COLORS else "FlowTrain" if n.type.startswith("FlowTrain") else ""
        fill = KIND_COLORS.get(kind, (60, 64, 72))
        draw.rounded_rectangle([at(x0, y0), at(x1, y1)], radius=4, fill=fill, outline=(200, 200, 210))
        label = (n.title or n.type).replace("FlowTrain", "")
        draw.text((at(x0, y0)[0] + 3, at(x0, y0)[1] + 2), label[:14], fill=(240, 240, 240), font=font)
    return image


def main(out: Path = ROOT / "example_workflows") -> None:
    (out / "api").mkdir(parents=True, exist_ok=True)
    for name, make in WORKFLOWS.items():
        nodes = make()
        layout(nodes)
        title = TITLES[name]
        (out / f"{title}.json").write_text(json.dumps(ui_format(nodes), indent=1) + "\n", encoding="utf-8")
        (out / "api" / f"{name}.json").write_text(json.dumps(api_format(nodes), indent=1) + "\n", encoding="utf-8")
        thumbnail(nodes).save(out / f"{title}.jpg", quality=85)
        print(f"wrote {title} ({len(nodes)} nodes)", file=sys.stderr)


if __name__ == "__main__":
    main()
