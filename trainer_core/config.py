"""The training configuration: one frozen, validated dataclass tree.

Each field carries its help text and allowed range in ``metadata``; ``__post_init__``
checks every field against them, so a bad value fails at construction with the field's
name, the value and what is allowed. Node tooltips read the same help text.

Registries (sigma schemes, weightings, optimizers, ...) are looked up lazily by name so
an unknown choice fails here, listing the valid names.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .configbase import ConfigError, _build, _names, _Validated, field_help, field_names, opt, suggest, with_user_names  # noqa: F401

@dataclass(frozen=True)
class BucketConfig(_Validated):
    _prefix = "data.buckets"
    resolutions: tuple[int, ...] = opt((512,), "Target training resolutions (side of a square of equal area), e.g. 512, 768, 1024. Each image is bucketed at every resolution it is large enough for.", lo=64, hi=4096)
    step: int = opt(64, "Bucket sides are multiples of this many pixels (16 is the finest every supported model allows).", lo=16, hi=256)
    min_side: int = opt(256, "Smallest allowed bucket side in pixels.", lo=16, hi=8192)
    max_side: int = opt(2048, "Largest allowed bucket side in pixels.", lo=16, hi=8192)
    allow_upscale: bool = opt(False, "Allow upscaling images smaller than a bucket (off: small images are skipped for that resolution, with a warning).")

    def check(self) -> None:
        from .models.families import common_pixel_multiple, supported_labels  # lazy: families import the LoRA names

        multiple = common_pixel_multiple()
        if self.step % multiple:
            raise ConfigError(f"data.buckets.step={self.step} must be a multiple of {multiple} (the models FlowTrain trains, "
                              f"{supported_labels()}, pack latents in patches of {multiple} pixels or a multiple)")
        if self.min_side > self.max_side:
            raise ConfigError(f"data.buckets.min_side={self.min_side} is larger than data.buckets.max_side={self.max_side}")


@dataclass(frozen=True)
class CaptionConfig(_Validated):
    _prefix = "data.captions"
    trigger_word: str = opt("", "Word that names the new concept; prepended to every caption that lacks it.")
    class_word: str = opt("", "What the concept is (e.g. 'man', 'dog', 'style'); used by preservation losses and with captions that are missing.")
    keep_tokens: int = opt(1, "Number of leading separator-split tags kept in place when shuffling (the trigger counts as one).", lo=0, hi=64)
    separator: str = opt(",", "Tag separator in captions.")
    shuffle: bool = opt(False, "Shuffle the tags after the kept ones.")
    shuffle_variants: int = opt(8, "How many shuffled variants of each caption are pre-encoded (each step picks one), so the text encoder can be freed.", lo=1, hi=256)
    caption_dropout: float = opt(0.0, "Probability that a step trains on the empty caption (teaches the unconditional prediction).", lo=0.0, hi=1.0)
    caption_extension: str = opt(".txt", "Extension of caption files next to the images.")
    caption_dropout_warmup_steps: int = opt(0, "Ramp caption dropout linearly from 0 to caption_dropout over this many steps (0 = constant).", lo=0, hi=10_000_000)
    tag_dropout: float = opt(0.0, "Probability of dropping each tag after the kept ones (per caption variant).", lo=0.0, hi=1.0)
    wildcards: bool = opt(True, "Expand {a|b|c} in captions to one random choice per variant.")

    def check(self) -> None:
        if not self.separator:
            raise ConfigError("data.captions.separator must not be empty; use ',' for tag lists")


@dataclass(frozen=True)
class AugmentConfig(_Validated):
    _prefix = "data.augment"
    flip: bool = opt(False, "Random horizontal flip (probability 0.5). Cached as two latent variants.")
    flip_opt_out_words: tuple[str, ...] = opt(("left", "right", "text"), "Captions containing any of these whole words are never flipped.")
    random_crop: bool = opt(False, "Random crop inside the bucket instead of a centre crop (turns the latent cache off).")
    color_jitter: bool = opt(False, "Random brightness/contrast/saturation (turns the latent cache off).")
    brightness: float = opt(0.1, "Colour jitter: max relative brightness change.", lo=0.0, hi=1.0)
    contrast: float = opt(0.1, "Colour jitter: max relative contrast change.", lo=0.0, hi=1.0)
    saturation: float = opt(0.1, "Colour jitter: max relative saturation change.", lo=0.0, hi=1.0)


@dataclass(frozen=True)
class DataConfig(_Validated):
    _prefix = "data"
    path: str = opt("", "Folder of images (png, jpg, webp, bmp, tiff; avif/heic when Pillow reads them) with same-name .txt captions; kohya-style 'N_name' subfolders repeat their images N times (0_name folders are skipped).")
    batch_size: int = opt(1, "Images per micro-batch (all from one bucket).", lo=1, hi=256)
    cache_dir: str = opt("", "Where encoded latents and captions are cached; empty = '<run>/.latent_cache'.")
    strict: bool = opt(False, "Stop when any image cannot be read (empty, truncated, not an image). Off: such images are skipped with one warning naming each, and the run stops only when no usable image is left.")
    buckets: BucketConfig = field(default_factory=BucketConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    control_images: bool = opt(False, "Edit LoRA (FLUX.1 Kontext, FLUX.2): pair each image with the same-name reference image(s) in a 'control' folder beside it ('control_1', 'control_2', ... for several; inside each N_name repeat folder); the caption describes the edit. Training, validation, DOP and previews condition the model on the references; images without one are left out (warned).")

    def check(self) -> None:
        if self.control_images and (self.augment.random_crop or self.augment.color_jitter):
            raise ConfigError("data.augment.random_crop / color_jitter do not combine with data.control_images: the "
                              "target would be cropped or recoloured without its reference image; turn them off "
                              "(data.augment.flip works: it mirrors target and references together)")


@dataclass(frozen=True)
class LoRAConfig(_Validated):
    _prefix = "lora"
    rank: int = opt(16, "LoRA rank (dimension of the low-rank update).", lo=1, hi=1024)
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", lo=0.0, lo_open=True, hi=4096)
    dropout: float = opt(0.0, "Dropout on the LoRA input during training.", lo=0.0, hi=0.9)
    targets: str = opt("attention", "Which layers get a LoRA: 'attention' (q/k/v/out projections), 'all' (attention + MLP) or 'custom' (target_regex).", choices=lambda: ["attention", "all", "custom"])
    target_regex: str = opt("", "With targets='custom': a regular expression matched (re.fullmatch) against module names.")
    dtype: str = opt("fp32", "dtype of the trainable LoRA weights (fp32 keeps small updates exact under bf16 base weights).", choices=lambda: ["fp32", "bf16", "fp16"])
    algorithm: str = opt("lora", "Adapter algorithm: lora (low-rank B·A), dora (LoRA plus a learned per-output magnitude, Liu et al. 2024), loha (Hadamard product of two low-rank pairs, rank/alpha as for LoRA) or lokr (Kronecker product of a small and a low-rank factor, see lokr_factor). ComfyUI's LoraLoader loads all four.", choices=_names("lora.algorithms", "ALGORITHMS"))
    lokr_factor: int = opt(-1, "LoKr: split each dimension as factor × rest (the small Kronecker factor is factor × factor); -1 = the most balanced split. Larger factors train more parameters.", lo=-1, hi=4096)
    lokr_decompose_both: bool = opt(False, "LoKr: also write the small Kronecker factor as a rank-`rank` product (only when the rank is below half its size).")
    lokr_full_matrix: bool = opt(False, "LoKr: keep the large Kronecker factor as a full matrix instead of a rank-`rank` product (more parameters, no rank limit; alpha is then unused).")
    init_from: str = opt("", "Continue from this LoRA file (FlowTrain, kohya lora_unet_*, diffusers/peft transformer.* or ComfyUI diffusion_model.* keys): training starts from its weights. Its algorithm, rank, alpha and trained layers must match this config (a mismatch is refused naming both).")

    def check(self) -> None:
        if self.targets == "custom":
            import re

            if not self.target_regex:
                raise ConfigError("lora.target_regex is empty; targets='custom' needs a regex such as '.*attn.*'")
            try:
                re.compile(self.target_regex)
            except re.error as e:
                raise ConfigError(f"lora.target_regex={self.target_regex!r} is not a valid regex: {e}") from None
        if self.dropout and self.algorithm in ("loha", "lokr"):
            raise ConfigError(f"lora.dropout={self.dropout} applies to the LoRA input of algorithms 'lora'/'dora'; "
                              f"set lora.dropout=0 for lora.algorithm={self.algorithm!r}")
        if self.lokr_factor == 0:
            raise ConfigError("lora.lokr_factor=0 is not a factor; use -1 (balanced split) or a positive size such as 8 or 16")


@dataclass(frozen=True)
class FlowConfig(_Validated):
    _prefix = "flow"
    sigma_scheme: str = opt("sigmoid", "How noise levels σ are drawn: uniform, sigmoid (logit-normal), shift, flux_shift (resolution-aware), content (high noise), style (low noise), balanced.", choices=_names("flow", "SIGMA_SCHEMES"))
    sigmoid_mean: float = opt(0.0, "Mean of the logit-normal (sigmoid scheme).", lo=-5, hi=5)
    sigmoid_std: float = opt(1.0, "Std of the logit-normal (sigmoid scheme).", lo=0.0, lo_open=True, hi=5)
    shift: float = opt(3.0, "Shift s of the 'shift' scheme: σ' = sσ/(1+(s-1)σ).", lo=0.0, lo_open=True, hi=100)
    weighting: str = opt("none", "Per-sample loss weight by σ: none or bell_shaped (emphasises mid noise).", choices=_names("flow", "WEIGHTINGS"))
    noise_offset: float = opt(0.0, "Per-sample, per-channel constant added to the noise ε (std of the offset); 0 = off.", lo=0.0, hi=1.0)
    pyramid_noise_discount: float = opt(0.0, "Multi-resolution (pyramid) noise discount; 0 = off, typical 0.3-0.8.", lo=0.0, hi=1.0)
    ip_noise_gamma: float = opt(0.0, "Input perturbation: extra noise of this scale on the noisy input only (the target keeps ε); 0 = off.", lo=0.0, hi=1.0)
    guidance: float = opt(1.0, "Guidance value fed to guidance-distilled models (FLUX.1-dev, FLUX.2-dev) during training; ignored by others.", lo=0.0, hi=100)


@dataclass(frozen=True)
class LossConfig(_Validated):
    _prefix = "loss"
    loss_type: str = opt("mse", "Elementwise loss on the velocity: mse, l1, huber or smooth_l1 (pseudo-Huber).", choices=_names("losses", "LOSS_FUNCTIONS"))
    huber_c: float = opt(0.1, "Huber/smooth_l1 parameter c (its base value under a schedule).", lo=0.0, lo_open=True, hi=10)
    huber_schedule: str = opt("constant", "How c varies with σ: constant, exponential (c^σ) or snr (flow-matching SNR form).", choices=_names("losses", "HUBER_SCHEDULES"))
    min_snr_gamma: float = opt(0.0, "Min-SNR-γ weighting for flow matching, w = min((1-σ)², γσ²); 0 = off (typical γ = 5).", lo=0.0, hi=100)
    wavelet_loss: float = opt(0.0, "Weight of an extra loss on the high-frequency wavelet bands of the predicted x0; 0 = off.", lo=0.0, hi=100)
    wavelet: str = opt("db4", "Wavelet for wavelet_loss: db4 (Daubechies-4) or haar.", choices=lambda: ["db4", "haar"])
    wavelet_levels: int = opt(2, "Decomposition levels for wavelet_loss.", lo=1, hi=6)
    sigma_bins: int = opt(10, "Number of σ bins the loss is logged by.", lo=1, hi=100)


@dataclass(frozen=True)
class OptimConfig(_Validated):
    _prefix = "optim"
    optimizer: str = opt("adamw", "Optimizer name (see the optimizer registry: adamw, adamw8bit, prodigy, adafactor, lion8bit, ...).", choices=_names("optim", "OPTIMIZERS"))
    lr: float = opt(1e-4, "Peak learning rate.", lo=0.0, lo_open=True, hi=10)
    weight_decay: float = opt(1e-4, "Decoupled weight decay.", lo=0.0, hi=1)
    betas: tuple[float, ...] = opt((0.9, 0.999), "Adam betas (beta1, beta2).", lo=0.0, hi=0.99999)
    eps: float = opt(1e-8, "Adam epsilon.", lo=0.0, lo_open=True, hi=1)
    schedule: str = opt("constant", "Learning-rate schedule after warmup (constant, linear, cosine, cosine_with_restarts, cosine_annealing_warm_restarts, polynomial).", choices=_names("optim", "SCHEDULES"))
    warmup_steps: int = opt(0, "Optimizer steps of linear warmup from 0 to lr.", lo=0, hi=1_000_000)
    min_lr_ratio: float = opt(0.0, "Floor of the schedule as a fraction of lr.", lo=0.0, hi=1.0)
    num_cycles: int = opt(1, "Cosine restarts: number of cycles.", lo=1, hi=1000)
    cycle_mult: float = opt(1.0, "Warm restarts: each cycle is this many times longer than the previous.", lo=1.0, hi=10)
    cycle_gamma: float = opt(1.0, "Warm restarts: the peak lr is multiplied by this after each cycle.", lo=0.0, lo_open=True, hi=1.0)
    power: float = opt(1.0, "Polynomial schedule power.", lo=0.0, lo_open=True, hi=10)
    prodigy_d_coef: float = opt(1.0, "Prodigy: d_coef (scales its learning-rate estimate).", lo=0.0, lo_open=True, hi=100)
    prodigy_safeguard_warmup: bool = opt(True, "Prodigy: safeguard_warmup (recommended with warmup).")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: B matrices train at lr × this ratio (16 is typical); 0 = off.", lo=0.0, hi=1000)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", lo=1, hi=1024)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = off).", lo=0.0, hi=1e6)

    def check(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas!r} must be two numbers (beta1, beta2)")


@dataclass(frozen=True)
class EmaConfig(_Validated):
    _prefix = "ema"
    enabled: bool = opt(False, "Keep an exponential moving average of the LoRA weights.")
    decay: float = opt(0.999, "Maximum EMA decay.", lo=0.0, hi=1.0)
    power: float = opt(2 / 3, "EMA warmup power (decay = 1 - (1 + step/inv_gamma)^-power, capped at decay).", lo=0.0, lo_open=True, hi=10)
    inv_gamma: float = opt(1.0, "EMA warmup inverse multiplicative factor.", lo=0.0, lo_open=True, hi=1e6)
    update_every: int = opt(1, "Update the EMA every N optimizer steps.", lo=1, hi=100_000)
    on_cpu: bool = opt(False, "Store the EMA weights on the CPU (saves accelerator memory).")
    use_for_output: bool = opt(True, "Save and preview with the EMA weights (the raw weights are saved too).")


@dataclass(frozen=True)
class DopConfig(_Validated):
    _prefix = "dop"
    enabled: bool = opt(False, "Differential Output Preservation: keep the model's behaviour on class-word prompts (needs a trigger word).")
    class_word: str = opt("", "Replaces the trigger word in the preservation captions (e.g. 'man'); empty = captions.class_word.")
    multiplier: float = opt(1.0, "Weight of the preservation loss.", lo=0.0, hi=100)
    every_n_steps: int = opt(1, "Run the preservation passes every N steps (4-8 saves time on large models).", lo=1, hi=10_000)
    gradient_surgery: bool = opt(False, "PCGrad between the main and preservation gradients when they conflict.")


@dataclass(frozen=True)
class PreviewConfig(_Validated):
    _prefix = "preview"
    every_n_steps: int = opt(0, "Render previews every N steps (0 = off); also before the first step and at the end.", lo=0, hi=10_000_000)
    prompts: tuple[str, ...] = opt((), "Preview prompts; each is rendered with and without the trigger word.")
    seed: int = opt(0, "Preview seed (fixed so previews compare across steps).", lo=0, hi=2**62)
    steps: int = opt(20, "Sampling steps per preview.", lo=1, hi=200)
    width: int = opt(512, "Preview width in pixels.", lo=64, hi=4096)
    height: int = opt(512, "Preview height in pixels.", lo=64, hi=4096)
    guidance: float = opt(3.5, "Guidance for previews (FLUX.1-dev distilled guidance or CFG scale, per model).", lo=0.0, hi=100)


@dataclass(frozen=True)
class ValidationConfig(_Validated):
    _prefix = "validation"
    every_n_steps: int = opt(0, "Compute the validation loss every N steps (0 = off).", lo=0, hi=10_000_000)
    sigmas: tuple[float, ...] = opt((0.1, 0.25, 0.5, 0.75, 0.9), "Fixed noise levels of the validation loss.", lo=0.0, lo_open=True, hi=1.0)
    images: int = opt(2, "How many images of data.path are held out for the validation loss (never trained on; chosen by validation.seed). Ignored when validation.path is set.", lo=1, hi=1000)
    path: str = opt("", "A separate folder of validation images (with captions); when set, nothing is held out of data.path.")
    seed: int = opt(1, "Seed of the fixed validation noise and of which images are held out.", lo=0, hi=2**62)
    keep_best: bool = opt(True, "Keep the LoRA with the lowest validation loss in <run>/best/.")


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""train.precision choices ("auto" is resolved before training; see ``run_facts.resolved_precision``)."""
CHECKPOINTING_MODES = ("auto", "blocks", "selective", "off")
"""train.gradient_checkpointing choices (the model adapters' checkpoint modes)."""


@dataclass(frozen=True)
class TrainConfig(_Validated):
    _prefix = "train"
    steps: int = opt(1000, "Optimizer steps to train.", lo=1, hi=10_000_000)
    seed: int = opt(42, "Seed for every random choice (σ, noise, captions, data order).", lo=0, hi=2**62)
    precision: str = opt("bf16", "Compute dtype of the base model: bf16, fp16 or fp32; auto = bf16 where the device computes bf16 natively, else fp32 (in ComfyUI: the dtype ComfyUI runs the model in, except that bf16/fp8 weights train in bf16 where the device computes bf16 natively; the run's config.json records the dtype it chose). LoRA weights stay in lora.dtype.", choices=lambda: list(PRECISIONS))
    gradient_checkpointing: str = opt("blocks", "Gradient checkpointing: blocks = recompute every transformer block in backward (least memory); selective = recompute only cheap elementwise ops; auto = recompute only when a step's activations would not fit in half of the free memory; off = keep every activation (fastest, most memory). Old configs' true/false read as blocks/off.", choices=lambda: list(CHECKPOINTING_MODES))
    compile: str = opt("auto", "torch.compile each transformer block (not the whole model; LoRA and checkpointing work as without): 'auto' = on a CUDA GPU with Triton, off elsewhere; 'on' forces it (the first steps are slow while it compiles); 'off'.", choices=lambda: ["auto", "on", "off"])
    base_quantization: str = opt("none", "Command line (diffusers folders) only: load the frozen base transformer quantized by bitsandbytes, 'int8' (LLM.int8, ~half the memory of bf16) or 'nf4' (4-bit NormalFloat, ~a quarter); needs bitsandbytes and a CUDA GPU. The LoRA stays in lora.dtype and computes in train.precision. ComfyUI MODELs bring their own quantization (fp8, comfy_quant files).", choices=lambda: ["none", "int8", "nf4"])
    save_every: int = opt(250, "Save a LoRA checkpoint every N steps (0 = only at the end).", lo=0, hi=10_000_000)
    log_every: int = opt(10, "Log the loss every N steps.", lo=1, hi=1_000_000)
    output_dir: str = opt("output", "Folder that holds run folders.")
    output_name: str = opt("flowtrain_lora", "Run name: the run folder and LoRA file names.")
    keep_checkpoints: int = opt(3, "Keep the newest N checkpoints (the newest complete one is never deleted); 0 = keep all.", lo=0, hi=100_000)
    existing_run: str = opt("resume", "When the run folder already exists: resume (from its newest complete checkpoint) or refuse.", choices=lambda: ["resume", "refuse"])
    resume_from: str = opt("", "Resume from this checkpoint folder instead of the newest one (empty = newest).")
    tensorboard: bool = opt(True, "Write TensorBoard event files to <run>/tensorboard (when the tensorboard package is installed): loss and its terms, lr, grad norm, validation loss, loss by σ bin, previews.")

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):  # config.json files written before the modes
            object.__setattr__(self, "gradient_checkpointing", "blocks" if self.gradient_checkpointing else "off")
        super().__post_init__()

    def check(self) -> None:
        name = self.output_name
        control = any(ord(c) < 32 or ord(c) == 127 for c in name)
        if not name or "/" in name or "\\" in name or name in {".", ".."} or ".." in name.split(".")[0:1] or control:
            raise ConfigError(f"train.output_name={name!r} must be a plain name without path separators, '..' "
                              "or control characters (e.g. 'my_lora')")


@dataclass(frozen=True)
class MemoryConfig(_Validated):
    _prefix = "memory"
    budget_gb: float = opt(0.0, "Accelerator memory the run may use, in GB (2^30 bytes). 0 = auto: the free memory of the device minus margin_gb (on a CPU: the available RAM). From it FlowTrain picks gradient checkpointing and how many transformer blocks stream from CPU memory; a run that cannot fit is refused before training, with the change that makes it fit.", lo=0.0, hi=100_000)
    margin_gb: float = opt(0.5, "Memory left unused for the allocator's fragmentation, other programs and the display (subtracted from the free memory with budget_gb=0 and from budget_gb otherwise).", lo=0.0, hi=1000)
    streaming: str = opt("auto", "Weight streaming (block offload): auto = stream the fewest transformer blocks that make the run fit the budget; off = never (a run that does not fit is refused); all = stream every block (slowest, least memory; also for tests).", choices=lambda: ["auto", "off", "all"])

    def check(self) -> None:
        if self.budget_gb and self.margin_gb >= self.budget_gb:
            raise ConfigError(f"memory.margin_gb={self.margin_gb} leaves nothing of memory.budget_gb={self.budget_gb}; "
                              "lower the margin or raise the budget")


def _preset_names() -> list[str]:
    from .presets import PRESETS

    return ["auto", "none", *PRESETS]


@dataclass(frozen=True)
class ModelConfig(_Validated):
    _prefix = "model"
    preset: str = opt("none", "Per-model defaults (rank, lr, LoRA targets, σ scheme and weighting, guidance, DOP every N steps; see trainer_core/presets.py): auto = those of the model variant detected from the weights (FLUX.1-dev/schnell, FLUX.2-dev, Klein 4B/9B); a variant name = that variant's; none = no preset. A preset sets only fields still at their default value: any field you changed wins. A run's config.json records the preset it applied.", choices=_preset_names)
    file: str = opt("", "The base model file the run trained on (ComfyUI: the UNETLoader/checkpoint file name), recorded for the metadata and to run the config again; empty = unknown.")
    variant: str = opt("", "The model variant detected from the weights (recorded by the run, e.g. 'klein-4b'; empty = not detected yet). Informational: it selects nothing.")


@dataclass(frozen=True)
class TrainingConfig(_Validated):
    """Everything one training run needs to know, and nothing about where models live."""

    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    dop: DopConfig = field(default_factory=DopConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def check(self) -> None:
        """Rules that span sections."""
        if self.dop.enabled and not self.data.captions.trigger_word:
            raise ConfigError("dop.enabled needs data.captions.trigger_word: preservation compares trigger "
                              "captions with class-word captions, so without a trigger there is nothing to preserve")
        if self.dop.enabled and not (self.dop.class_word or self.data.captions.class_word):
            raise ConfigError("dop.enabled needs a class word (dop.class_word or data.captions.class_word), e.g. 'man'")
        if self.optim.loraplus_lr_ratio:
            from .lora.algorithms import ALGORITHMS

            why = ALGORITHMS.get(self.lora.algorithm).loraplus_refusal
            if why:
                raise ConfigError(f"optim.loraplus_lr_ratio does not apply to lora.algorithm={self.lora.algorithm!r}: {why}; "
                                  "set optim.loraplus_lr_ratio=0 or use algorithm 'lora'/'dora'")
        if self.optim.loraplus_lr_ratio and self.optim.optimizer == "prodigy":
            raise ConfigError("optim.loraplus_lr_ratio does not combine with optimizer 'prodigy': Prodigy estimates one "
                              "learning rate itself, so a fixed B/A ratio is overridden; use adamw, or set loraplus_lr_ratio=0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingConfig":
        return _build(cls, d, "")

    def replace(self, **sections: Any) -> "TrainingConfig":
        return dataclasses.replace(self, **sections)


