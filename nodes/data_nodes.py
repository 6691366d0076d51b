"""Nodes that describe a training run without running anything: the dataset (folder,
buckets, captions), the LoRA shape, DOP and preview settings. Each turns widgets into one
frozen value (``nodes.specs`` / ``trainer_core.config``) for the Trainer."""
from __future__ import annotations

import hashlib

from comfy_api.latest import io, ui

from trainer_core.config import (BucketConfig, CaptionConfig, DataConfig, DopConfig, LoRAConfig, PreviewConfig,
                                 ValidationConfig)

from trainer_core.lora.algorithms import ALGORITHMS

from . import specs
from .common import CATEGORY, Dataset, DopType, LoraConfigType, PreviewType, bounds, send_text, tip


class FlowTrainDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainDataset", display_name="FlowTrain Dataset", category=CATEGORY,
            description=("A folder of training images with same-name caption files (for an edit LoRA: with "
                         "same-name reference images in control/ folders). Reports what it found, including "
                         "unreadable images (skipped) and ignored files."),
            inputs=[
                io.String.Input("folder", default="flowtrain_dataset", tooltip=(
                    "Absolute path, or a subfolder of ComfyUI's input folder. " + tip(DataConfig, "path"))),
                io.String.Input("caption_extension", default=".txt", tooltip=tip(CaptionConfig, "caption_extension")),
                io.Boolean.Input("strict", default=False, tooltip=tip(DataConfig, "strict")),
                io.Boolean.Input("control_images", default=False, tooltip=tip(DataConfig, "control_images")),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip=(
                "The scanned folder (images, captions, repeats): into Bucketer → Caption Processor → Trainer."))],
            search_aliases=["flowtrain", "training images", "lora dataset", "image folder", "captions folder"],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, strict=False, control_images=False):
        """Re-scan when files in the folder change (ComfyUI's cache only sees the widgets)."""
        import folder_paths
        from trainer_core.control import folder_snapshot

        try:
            path = specs.resolve_dataset_path(folder, folder_paths.get_input_directory())
        except ValueError as e:
            return str(e)
        snap = folder_snapshot(path)
        return hashlib.sha256(repr(sorted(snap.items())).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, caption_extension, strict=False, control_images=False) -> io.NodeOutput:
        import folder_paths

        path = specs.resolve_dataset_path(folder, folder_paths.get_input_directory())
        ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        spec = specs.dataset_spec(path, ext, strict, control_images)
        text = f"{path}: {spec.describe()}"
        send_text(spec.describe(), cls.hidden.unique_id)
        return io.NodeOutput(spec, ui=ui.PreviewText(text))


class FlowTrainBucketer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainBucketer", display_name="FlowTrain Bucketer", category=CATEGORY,
            description="How images are sized into aspect-ratio buckets for training.",
            inputs=[
                Dataset.Input("dataset", tooltip="The dataset from a FlowTrain Dataset node."),
                io.String.Input("resolutions", default="512", tooltip=(
                    tip(BucketConfig, "resolutions") + " Comma-separated.")),
                io.Int.Input("step", default=64, **bounds(BucketConfig, "step"), tooltip=tip(BucketConfig, "step")),
                io.Int.Input("min_side", default=256, **bounds(BucketConfig, "min_side"),
                             tooltip=tip(BucketConfig, "min_side")),
                io.Int.Input("max_side", default=2048, **bounds(BucketConfig, "max_side"),
                             tooltip=tip(BucketConfig, "max_side")),
                io.Boolean.Input("allow_upscale", default=False, tooltip=tip(BucketConfig, "allow_upscale")),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="The dataset with these bucket sizes.")],
            search_aliases=["flowtrain", "aspect ratio buckets", "resolution", "bucketing"],
        )

    @classmethod
    def execute(cls, dataset, resolutions, step, min_side, max_side, allow_upscale) -> io.NodeOutput:
        buckets = BucketConfig(resolutions=specs.parse_int_list(resolutions, "resolutions"), step=step,
                               min_side=min_side, max_side=max_side, allow_upscale=allow_upscale)
        return io.NodeOutput(dataset.with_buckets(buckets))


class FlowTrainCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainCaptions", display_name="FlowTrain Caption Processor", category=CATEGORY,
            description="Trigger word, class word, tag shuffling and caption dropout for the dataset's captions.",
            inputs=[
                Dataset.Input("dataset", tooltip="The dataset from a FlowTrain Dataset or Bucketer node."),
                io.String.Input("trigger_word", default="sks", tooltip=tip(CaptionConfig, "trigger_word")),
                io.String.Input("class_word", default="", tooltip=tip(CaptionConfig, "class_word")),
                io.Int.Input("keep_tokens", default=1, **bounds(CaptionConfig, "keep_tokens"),
                             tooltip=tip(CaptionConfig, "keep_tokens")),
                io.String.Input("separator", default=",", tooltip=tip(CaptionConfig, "separator")),
                io.Boolean.Input("shuffle", default=False, tooltip=tip(CaptionConfig, "shuffle")),
                io.Float.Input("caption_dropout", default=0.0, step=0.01, **bounds(CaptionConfig, "caption_dropout"),
                               tooltip=tip(CaptionConfig, "caption_dropout")),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="The dataset with this caption policy.")],
            search_aliases=["flowtrain", "trigger word", "class word", "caption dropout", "shuffle tags"],
        )

    @classmethod
    def execute(cls, dataset, trigger_word, class_word, keep_tokens, separator, shuffle,
                caption_dropout) -> io.NodeOutput:
        captions = CaptionConfig(trigger_word=trigger_word.strip(), class_word=class_word.strip(),
                                 keep_tokens=keep_tokens, separator=separator, shuffle=shuffle,
                                 caption_dropout=caption_dropout)
        return io.NodeOutput(dataset.with_captions(captions))


class FlowTrainLoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainLoraConfig", display_name="FlowTrain LoRA Config", category=CATEGORY,
            description="Shape of the LoRA to train: algorithm (LoRA, DoRA, LoHa, LoKr), rank, alpha, dropout and "
                        "which layers get one.",
            inputs=[
                io.Int.Input("rank", default=16, **bounds(LoRAConfig, "rank"), tooltip=tip(LoRAConfig, "rank")),
                io.Float.Input("alpha", default=16.0, min=0.0, max=4096.0, step=0.5, tooltip=tip(LoRAConfig, "alpha")),
                io.Float.Input("dropout", default=0.0, step=0.01, **bounds(LoRAConfig, "dropout"),
                               tooltip=tip(LoRAConfig, "dropout")),
                io.Combo.Input("targets", options=["attention", "all", "custom"], default="attention",
                               tooltip=tip(LoRAConfig, "targets")),
                io.String.Input("target_regex", default="", tooltip=tip(LoRAConfig, "target_regex")),
                io.Combo.Input("dtype", options=["fp32", "bf16", "fp16"], default="fp32", tooltip=tip(LoRAConfig, "dtype")),
                io.Combo.Input("algorithm", options=ALGORITHMS.names(), default="lora", tooltip=tip(LoRAConfig, "algorithm")),
                io.Int.Input("lokr_factor", default=-1, **bounds(LoRAConfig, "lokr_factor"),
                             tooltip=tip(LoRAConfig, "lokr_factor")),
                io.Boolean.Input("lokr_decompose_both", default=False, tooltip=tip(LoRAConfig, "lokr_decompose_both")),
                io.Boolean.Input("lokr_full_matrix", default=False, tooltip=tip(LoRAConfig, "lokr_full_matrix")),
            ],
            outputs=[LoraConfigType.Output(display_name="lora_config", tooltip="The LoRA shape, for the Trainer.")],
            search_aliases=["flowtrain", "lora rank", "network dim", "dora", "loha", "lokr", "lycoris"],
        )

    @classmethod
    def execute(cls, rank, alpha, dropout, targets, target_regex, dtype, algorithm="lora", lokr_factor=-1,
                lokr_decompose_both=False, lokr_full_matrix=False) -> io.NodeOutput:
        return io.NodeOutput(LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                                        target_regex=target_regex, dtype=dtype, algorithm=algorithm,
                                        lokr_factor=lokr_factor, lokr_decompose_both=lokr_decompose_both,
                                        lokr_full_matrix=lokr_full_matrix))


class FlowTrainDopSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainDopSettings", display_name="FlowTrain DOP Settings", category=CATEGORY,
            description="Differential Output Preservation: keep what the base model does for the class word.",
            inputs=[
                io.Boolean.Input("enabled", default=True, tooltip=tip(DopConfig, "enabled")),
                io.String.Input("class_word", default="", tooltip=tip(DopConfig, "class_word")),
                io.Float.Input("multiplier", default=1.0, step=0.05, **bounds(DopConfig, "multiplier"),
                               tooltip=tip(DopConfig, "multiplier")),
                io.Int.Input("every_n_steps", default=1, **bounds(DopConfig, "every_n_steps"),
                             tooltip=tip(DopConfig, "every_n_steps")),
                io.Boolean.Input("gradient_surgery", default=False, tooltip=tip(DopConfig, "gradient_surgery")),
                io.Conditioning.Input("class_conditioning", optional=True, tooltip=(
                    "Optional: the class caption's CONDITIONING, for graphs that train without a text encoder "
                    "(captions without the trigger word then use it).")),
            ],
            outputs=[DopType.Output(display_name="dop", tooltip="DOP settings, for the Trainer's dop input.")],
            search_aliases=["flowtrain", "differential output preservation", "prior preservation", "regularization"],
        )

    @classmethod
    def execute(cls, enabled, class_word, multiplier, every_n_steps, gradient_surgery,
                class_conditioning=None) -> io.NodeOutput:
        config = DopConfig(enabled=enabled, class_word=class_word.strip(), multiplier=multiplier,
                           every_n_steps=every_n_steps, gradient_surgery=gradient_surgery)
        return io.NodeOutput(specs.DopSettings(config, class_conditioning))


class FlowTrainPreviewSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlowTrainPreviewSettings", display_name="FlowTrain Preview Settings", category=CATEGORY,
            description=("Sample images while training, with and without the trigger word; optionally a "
                         "validation loss curve."),
            inputs=[
                io.Int.Input("every_n_steps", default=250, **bounds(PreviewConfig, "every_n_steps"),
                             tooltip=tip(PreviewConfig, "every_n_steps")),
                io.String.Input("prompts", multiline=True, default="a photo of sks",
                                tooltip=tip(PreviewConfig, "prompts", "One prompt per line.")),
                io.Int.Input("seed", default=0, min=0, max=2**62, control_after_generate=False,
                             tooltip=tip(PreviewConfig, "seed")),
                io.Int.Input("steps", default=20, **bounds(PreviewConfig, "steps"), tooltip=tip(PreviewConfig, "steps")),
                io.Int.Input("width", default=512, step=16, **bounds(PreviewConfig, "width"),
                             tooltip=tip(PreviewConfig, "width")),
                io.Int.Input("height", default=512, step=16, **bounds(PreviewConfig, "height"),
                             tooltip=tip(PreviewConfig, "height")),
                io.Float.Input("guidance", default=3.5, step=0.1, **bounds(PreviewConfig, "guidance"),
                               tooltip=tip(PreviewConfig, "guidance")),
                io.Int.Input("validation_every", default=0, **bounds(ValidationConfig, "every_n_steps"),
                             tooltip=tip(ValidationConfig, "every_n_steps",
                                         "Drawn in the run folder's learning_curve.svg; validation.json holds the "
                                         "values (held-out images, fixed noise levels); the LoRA with the lowest "
                                         "validation loss is kept in the run folder's best/.")),
                io.Int.Input("validation_images", default=2, **bounds(ValidationConfig, "images"),
                             tooltip=tip(ValidationConfig, "images")),
            ],
            outputs=[PreviewType.Output(display_name="preview", tooltip=(
                "Preview and validation settings, for the Trainer's preview input."))],
            search_aliases=["flowtrain", "sample images", "validation loss", "training previews"],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        return io.NodeOutput(specs.preview_settings(**widgets))
