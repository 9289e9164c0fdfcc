"""Model configs shipped with the package, so single-file checkpoints load with no download.

Stable Diffusion 1.5 (also right for 1.4 and most SD 1.x fine-tunes): the UNet, VAE and CLIP ViT-L/14 text tower
sizes of the original release, in diffusers' / transformers' config names. The scheduler is SD's: scaled-linear
betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction, "leading" spacing with offset 1.
Stable Diffusion 2.x: linear projections in the transformers, per-level head counts 5/10/20/20 (64-wide heads),
the OpenCLIP ViT-H/14 text tower without its last layer (SD 2 reads the penultimate one), 768 px for the
v-prediction models and 512 px for the epsilon "base" ones.
Stable Diffusion XL base: three levels (no attention at the first), 1/2/10 transformer layers, CLIP-L and OpenCLIP
bigG/14 (with its projection) side by side, size/crop conditioning through ``text_time`` embeddings, VAE scaling
0.13025.
Stable Diffusion 3: the MMDiT's sizes are read from a file's shapes (``ldm.single_file.mmdit_config``); the VAE
and the flow scheduler (shift 3) are here.
"""
import re
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}
SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "clip_sample": False, "timestep_spacing": "leading",
}

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                 "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0,
}
SD2_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
            "cross_attention_dim": 1024}
SD2_TEXT = {**SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
            "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512, "pad_token_id": 0}

SDXL_VAE = {**SD15_VAE, "scaling_factor": 0.13025, "sample_size": 1024}
SDXL_TEXT_2 = {**SD15_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280, "pad_token_id": 0}


SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def sd3_vae_config(latent_channels: int = 16, quant_conv: bool = False) -> dict:
    """SD3's VAE: SD's layout with 16 latent channels, no quant convolutions, scaling 1.5305 and shift 0.0609."""
    return {**SD15_VAE, "latent_channels": latent_channels, "sample_size": 1024, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "use_quant_conv": quant_conv, "use_post_quant_conv": quant_conv}


def sd2_prediction(file_name: str) -> str:
    """SD 2.x keys do not say whether a model predicts v: the 768 px releases do (``*768*``, ``*-v*``)."""
    return "v_prediction" if re.search(r"768|[-_]v[-_.]", file_name.lower()) else "epsilon"


def family_configs(family: str, file_name: str = "") -> tuple[dict, dict, list[dict], dict]:
    """(UNet, VAE, [text encoder(s)], scheduler) configs of a family (``sd1``, ``sd1-inpaint``, ``sd2``, ``sdxl``)."""
    if family in ("sd1", "sd1-inpaint"):
        unet = {**SD15_UNET, "in_channels": 9 if family == "sd1-inpaint" else 4}
        return unet, dict(SD15_VAE), [dict(SD15_TEXT)], dict(SD15_SCHEDULER)
    if family == "sd2":
        size = 96 if sd2_prediction(file_name) == "v_prediction" else 64
        return {**SD2_UNET, "sample_size": size}, {**SD15_VAE, "sample_size": size * 8}, [dict(SD2_TEXT)], \
            dict(SD15_SCHEDULER)
    if family == "sdxl":
        return dict(SDXL_UNET), dict(SDXL_VAE), [dict(SD15_TEXT), dict(SDXL_TEXT_2)], dict(SD15_SCHEDULER)
    raise ValueError(f"no shipped configs for the {family} family")
