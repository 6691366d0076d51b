"""Sampler preview: sample a MODEL (the trained one, or base + a LORA_MODEL) with
ComfyUI's own sampler, each prompt with and without the trigger word; or a grid of
prompts × LoRA strengths.

Prompts (and the empty negative) are encoded through the engine's content-keyed text
cache (``trainer_core.data.cache.TextCache``: text + the CLIP's weights identity) in
``<ComfyUI temp>/flowtrain_prompt_cache``, so re-running the node with another model or
LoRA encodes nothing it encoded before (ComfyUI empties its temp folder at start-up)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import specs
from .common import CATEGORY
from .sampling import Conditioning, embedding_conditioning, image_grid, sample_image

MODES = ("images", "grid")
PROMPT_CACHE = "flowtrain_prompt_cache"


def prompt_cache_dir() -> str:
    import os

    import folder_paths

    return os.path.join(folder_paths.get_temp_directory(), PROMPT_CACHE)


def cached_prompts(clip, arch, texts: list[str], cache_dir) -> dict[str, Conditioning]:
    """text → CONDITIONING for every text, encoded only when the cache lacks it."""
    from trainer_core.data.cache import TextCache

    from . import bridge

    encoder = bridge.ClipTextEncoder(clip, arch)
    embeddings = TextCache(cache_dir).get_or_encode(texts, encoder, what="Sampler Preview prompts")
    return {t: embedding_conditioning(e) for t, e in embeddings.items()}


def prompt_texts(prompts: tuple[str, ...], trigger: str, *, pairs: bool) -> list[str]:
    """Texts to render: per prompt (with trigger, without trigger) when ``pairs`` and a
    trigger is set, else with the trigger only."""
    if not prompts:
        raise ValueError("FlowTrain Sampler Preview: prompts is empty; write one prompt per line")
    out = []
    for prompt in prompts:
        with_t, without = specs.trigger_variants(prompt, trigger)
        out += [with_t, without] if pairs and trigger else [with_t]
    return out


def prompt_conditionings(clip, positive, prompts: tuple[str, ...], trigger: str, *, pairs: bool, arch=None,
                         negative=None) -> tuple[list, Conditioning]:
    """(conditionings to render, negative). Without a CLIP: the given positive
    CONDITIONING once and the given negative; with one, the prompts and (unless given)
    the empty negative, through the prompt cache."""
    if clip is None:
        if positive is None:
            raise ValueError("FlowTrain Sampler Preview needs a CLIP (to encode the prompts) or a positive CONDITIONING")
        return [positive], negative
    texts = prompt_texts(prompts, trigger, pairs=pairs)
    conds = cached_prompts(clip, arch, texts + ([""] if negative is None else []), prompt_cache_dir())
    return [conds[t] for t in texts], negative if negative is not None else conds[""]


def reference_latents(vae, image=None, latent=None) -> list:
    """Raw VAE latents of the reference inputs (first image of a batch each), in input order."""
    refs = []
    if image is not None:
        refs.append(vae.encode(image[:1, :, :, :3]))
    if latent is not None:
        refs.append(latent["samples"][:1])
    return refs


class FlowTrainSamplerPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="FlowTrainSamplerPreview", display_name="FlowTrain Sampler Preview", category=CATEGORY,
            is_output_node=True,
            description=("Renders each prompt with and without the trigger word (mode 'images'), or a grid of "
                         "prompts (rows) × LoRA strengths (columns) (mode 'grid', needs the LoRA input)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample: the Trainer's MODEL, or the base model with 'lora'."),
                io.Vae.Input("vae", tooltip="VAE that decodes the samples."),
                io.String.Input("prompts", multiline=True, default="a photo of sks", tooltip="One prompt per line."),
                io.String.Input("trigger_word", default="sks", tooltip=(
                    "Each prompt is rendered with it (prepended when missing) and without it.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed, the same for every image so they compare."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Distilled guidance for FLUX.1-dev/FLUX.2-dev (sampled at cfg 1); the CFG scale for others.")),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="ComfyUI scheduler."),
                io.Int.Input("width", default=512, min=64, max=4096, step=16, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=16, tooltip="Image height in pixels."),
                io.Combo.Input("mode", options=list(MODES), default="images", tooltip=(
                    "images: each prompt with and without the trigger; grid: prompts × LoRA strengths in one image.")),
                io.String.Input("strengths", default="0, 0.5, 1.0", tooltip=(
                    "Grid mode: comma-separated LoRA strengths, one column each (0 = base model).")),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "Text encoder for the prompts. Their embeddings are cached (by text and encoder) in ComfyUI's temp "
                    "folder, so sampling another model or LoRA encodes nothing again.")),
                io.Conditioning.Input("positive", optional=True, tooltip="In place of clip + prompts: this CONDITIONING."),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "Negative CONDITIONING for CFG models (default: the empty prompt, or zeros without a CLIP).")),
                io.LoraModel.Input("lora", optional=True, tooltip=(
                    "A LORA_MODEL applied to 'model' (strength 1 in images mode, each column's strength in grid mode).")),
                io.Image.Input("reference_image", optional=True, tooltip=(
                    "Edit LoRAs (FLUX.1 Kontext, FLUX.2): the image to edit, encoded with 'vae' and given to the "
                    "model as a reference latent (what ReferenceLatent does). The samples then have its size "
                    "(width/height are ignored).")),
                io.Latent.Input("reference", optional=True, tooltip=(
                    "Edit LoRAs: a reference LATENT (e.g. VAE Encode of the image to edit; after reference_image when "
                    "both are given). The samples have the first reference's size.")),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip=(
                "The sampled images: each prompt at each strength (images mode) or one labelled grid (grid mode)."))],
            search_aliases=["flowtrain", "lora preview", "lora strength grid", "compare lora", "sample with lora"],
        )

    @classmethod
    def execute(cls, model, vae, prompts, trigger_word, seed, steps, guidance, sampler_name, scheduler, width, height,
                mode, strengths, clip=None, positive=None, negative=None, lora=None, reference_image=None,
                reference=None) -> io.NodeOutput:
        from . import bridge

        arch = bridge.detect_arch(model)
        trigger = trigger_word.strip()
        if mode == "grid" and lora is None:
            raise ValueError("FlowTrain Sampler Preview: grid mode needs the 'lora' input (columns are its strengths)")
        conds, negative = prompt_conditionings(clip, positive, specs.parse_prompts(prompts), trigger,
                                               pairs=mode != "grid", arch=arch, negative=negative)
        refs = reference_latents(vae, reference_image, reference)
        if refs:
            ratio = vae.spacial_compression_encode()
            height, width = refs[0].shape[-2] * ratio, refs[0].shape[-1] * ratio
        kw = dict(seed=seed, steps=steps, guidance=guidance, sampler_name=sampler_name, scheduler=scheduler,
                  width=width, height=height, references=refs)
        if mode == "grid":
            columns = [model if s == 0 else bridge.model_with_lora(model, lora, s)
                       for s in specs.parse_float_list(strengths, "strengths")]
            rows = [[sample_image(m, vae, c, negative, **kw) for m in columns] for c in conds]
            images = image_grid(rows)
        else:
            m = model if lora is None else bridge.model_with_lora(model, lora, 1.0)
            import torch

            images = torch.cat([sample_image(m, vae, c, negative, **kw) for c in conds])
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))
