"""Tiny randomly initialised models of the real classes, saved with save_pretrained in the real layouts."""

from __future__ import annotations

from pathlib import Path

import torch

AGE_LABELS = {0: "0-2", 1: "3-9", 2: "10-19", 3: "20-29", 4: "30-39", 5: "40-49", 6: "50-59", 7: "60-69",
              8: "more than 70"}  # fmt: skip  (the id2label of nateraw/vit-age-classifier)


def tiny_clip_tokenizer(max_length: int = 16):
    """A byte-level BPE CLIP tokenizer over single letters (no merges): enough to tell prompts apart."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [f"{c}</w>" for c in letters]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def save_tiny_stable_diffusion(path: Path, seed: int = 0) -> Path:
    """unet/, vae/, text_encoder/, tokenizer/, scheduler/ as in stable-diffusion-v1-5 (32 px images, 16 px latents)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(path / "unet")  # fmt: skip
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(path / "vae")  # fmt: skip
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(path / "text_encoder")  # fmt: skip
    tokenizer.save_pretrained(path / "tokenizer")
    # SD 1.5's scheduler config: scaled-linear betas, leading spacing, steps_offset 1, set_alpha_to_one false
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(path / "scheduler")  # fmt: skip
    return path


def save_tiny_clip(path: Path, image_size: int = 24, projection_dim: int = 16, seed: int = 0) -> Path:
    """A CLIPModel (ViT-L/14 layout, tiny widths) and its CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(path)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_age_classifier(path: Path, image_size: int = 24, seed: int = 0) -> Path:
    """A ViTForImageClassification with the age classes of nateraw/vit-age-classifier, and its processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       image_size=image_size, patch_size=8, id2label=AGE_LABELS,
                       label2id={v: k for k, v in AGE_LABELS.items()})  # fmt: skip
    model = ViTForImageClassification(config)
    with torch.no_grad():  # random heads give near-uniform classes; a larger head makes the oracle checks sharper
        model.classifier.weight.mul_(20)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
