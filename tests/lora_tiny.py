"""The tiny diffusers FLUX.1 transformer and inputs both LoRA test files use."""
import torch


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, w, t = 2, 4, 4, 5
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h * w) // w
    img_ids[:, 2] = torch.arange(h * w) % w
    return {
        "hidden_states": torch.randn(b, h * w, 64, generator=g),
        "encoder_hidden_states": torch.randn(b, t, 32, generator=g),
        "pooled_projections": torch.randn(b, 16, generator=g),
        "timestep": torch.rand(b, generator=g),
        "guidance": torch.full((b,), 3.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(t, 3),
    }


def run(module, x):
    with torch.no_grad():
        return module(**x, return_dict=False)[0]
