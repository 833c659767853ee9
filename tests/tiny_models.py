"""Tiny randomly initialised models of the real classes, saved with save_pretrained in the real layouts."""

from __future__ import annotations

import json
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
    config = path / "scheduler" / "scheduler_config.json"  # SD 1.5's own config also says clip_sample: false
    config.write_text(json.dumps({**json.loads(config.read_text()), "clip_sample": False}, indent=2))
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


def save_tiny_clip_with_tokenizer(path: Path, image_size: int = 24, projection_dim: int = 16, seed: int = 0) -> Path:
    """save_tiny_clip's CLIPModel and image processor with tiny_clip_tokenizer's tokenizer beside them, as in
    openai/clip-vit-large-patch14 (one folder holds model, tokenizer and image processor)."""
    save_tiny_clip(path, image_size=image_size, projection_dim=projection_dim, seed=seed)
    tiny_clip_tokenizer().save_pretrained(path)
    return path


def save_tiny_pickscore(path: Path, image_size: int = 24, logit_scale: float = 50.0,
                        seed: int = 1) -> tuple[Path, Path]:  # fmt: skip
    """PickScore's two repos in miniature: (model folder, processor folder). The model is a CLIPModel whose learned
    logit scale exp(logit_scale) is `logit_scale` (PickScore_v1's is about 100), as yuvalkirstain/PickScore_v1; the
    processor folder holds the tokenizer and image processor, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    import math

    from transformers import CLIPImageProcessor, CLIPModel

    clip_dir = save_tiny_clip(path / "clip", image_size=image_size, projection_dim=12, seed=seed)
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    model.save_pretrained(path / "model")
    size = {"shortest_edge": image_size}
    # the laion repo's layout: preprocessor_config.json and the tokenizer's files (CLIPProcessor.from_pretrained reads
    # them; transformers 5's CLIPProcessor.save_pretrained would write one processor_config.json instead)
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(
        path / "processor")
    tiny_clip_tokenizer().save_pretrained(path / "processor")
    return path / "model", path / "processor"


def tiny_bert_tokenizer():
    """An uncased WordPiece BERT tokenizer over single letters, with BERT's special tokens ([PAD] = 0)."""
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *[f"##{c}" for c in letters]]
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


# transformers' BlipVisionModel names -> BLIP's ViT names (salesforce/BLIP models/vit.py, as ImageReward saves them)
BLIP_ORIGINAL_VISION_NAMES = [
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("post_layernorm.", "norm."),
    ("encoder.layers.", "blocks."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".self_attn.projection.", ".attn.proj."),
    (".self_attn.qkv.", ".attn.qkv."),
]


def save_tiny_image_reward(path: Path, seed: int = 0) -> dict[str, Path]:
    """ImageReward in miniature, in THUDM/ImageReward's layout: `checkpoint/ImageReward.pt` (torch.save of a state
    dict with blip.visual_encoder.* in BLIP's ViT names, blip.text_encoder.* in BLIP's med BERT names, BLIP's unused
    vision_proj / text_proj and position_ids, and the MLP head mlp.layers.{0,2,4,6,7}) beside `med_config.json`;
    a BERT tokenizer in `tokenizer/`; and, for hand computations, the same weights as transformers' BLIP models
    saved with save_pretrained in `hf_vision/` and `hf_text/` and the head's state dict in `head.pt`.

    The ViT has 64-d attention heads like BLIP's (the loader reads the head count from the width)."""
    import json

    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    torch.manual_seed(seed)
    tokenizer = tiny_bert_tokenizer()
    # BLIP's med_config.json (ImageReward's), with tiny sizes
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=32, initializer_range=0.02, intermediate_size=64,
               layer_norm_eps=1e-12, max_position_embeddings=40, model_type="bert", num_attention_heads=2,
               num_hidden_layers=1, pad_token_id=0, type_vocab_size=2, vocab_size=len(tokenizer) + 2,
               encoder_width=128, add_cross_attention=True)  # fmt: skip
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=16,
                                              layer_norm_eps=1e-6)).eval()  # fmt: skip
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=128,
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=40, pad_token_id=0, bos_token_id=None,
                                        sep_token_id=None), add_pooling_layer=False).eval()  # fmt: skip
    with torch.no_grad():  # random layer norms and larger weights, so that every part changes the score
        for module in [*vision.modules(), *text.modules()]:
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for model, std in ((vision, 0.1), (text, 0.2)):
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0, std)
    head = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), [(32, 16), (16, 8), (8, 4), (4, 2), (2, 1)], strict=True):
        layer = torch.nn.Linear(n_in, n_out)
        head[f"layers.{index}.weight"], head[f"layers.{index}.bias"] = layer.weight.data, layer.bias.data
    state = {}
    for name, value in vision.state_dict().items():
        for ours, theirs in BLIP_ORIGINAL_VISION_NAMES:
            name = name.replace(ours, theirs)
        state[f"blip.visual_encoder.{name}"] = value
    state.update({f"blip.text_encoder.{name}": value for name, value in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    state.update({"blip.vision_proj.weight": torch.randn(8, 128), "blip.vision_proj.bias": torch.zeros(8),
                  "blip.text_proj.weight": torch.randn(8, 32), "blip.text_proj.bias": torch.zeros(8)})  # fmt: skip
    state.update({f"mlp.{name}": value for name, value in head.items()})
    (path / "checkpoint").mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "checkpoint" / "ImageReward.pt")
    (path / "checkpoint" / "med_config.json").write_text(json.dumps(med, indent=2))
    tokenizer.save_pretrained(path / "tokenizer")
    vision.save_pretrained(path / "hf_vision")
    text.save_pretrained(path / "hf_text")
    torch.save(head, path / "head.pt")
    return {name: path / name for name in ("checkpoint", "tokenizer", "hf_vision", "hf_text")} | {
        "head": path / "head.pt"}


def save_tiny_flowers102(root: Path, per_split: int = 3, seed: int = 0) -> Path:
    """Oxford Flowers102 in miniature, in torchvision's layout: root/flowers-102/jpg/image_NNNNN.jpg (random RGB
    photographs of several sizes), setid.mat (trnid / valid / tstid) and imagelabels.mat."""
    import numpy as np
    from PIL import Image
    from scipy.io import savemat

    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    count = 3 * per_split
    for number in range(1, count + 1):
        height, width = (int(s) for s in generator.integers(20, 40, size=2))
        pixels = generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "jpg" / f"image_{number:05d}.jpg")
    ids = np.arange(1, count + 1).reshape(3, per_split)
    savemat(folder / "setid.mat", {"trnid": ids[0][None], "valid": ids[1][None], "tstid": ids[2][None]})
    savemat(folder / "imagelabels.mat", {"labels": np.ones((1, count))})
    return root


def tiny_t5_tokenizer(max_length: int = 32):
    """A sentencepiece-style (Unigram, metaspace) T5 tokenizer over single letters, with T5's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in letters] + [(f"\u2581{c}", -1.5) for c in letters]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)  # fmt: skip


def save_tiny_sd3(path: Path, seed: int = 0, with_t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline folder as stabilityai/stable-diffusion-3.5-medium's (model_index.json, transformer/,
    vae/, text_encoder/ CLIP-L, text_encoder_2/ CLIP-G, text_encoder_3/ T5, their tokenizers, scheduler/): 16 latent
    channels, the VAE's scaling and shift factors, a FlowMatchEulerDiscreteScheduler with shift 3 (32 px images, 16 px
    latents). `with_t5=False` leaves out text_encoder_3/ and tokenizer_3/, as users who drop T5 do (the pipeline
    then uses zeros for its tokens)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    parts = {}
    parts["transformer"] = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=16,
    )  # fmt: skip
    parts["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    clip_tokenizer = tiny_clip_tokenizer()
    for suffix in ("", "_2"):  # the two CLIPs' widths sum to pooled_projection_dim
        parts[f"text_encoder{suffix}"] = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ))  # fmt: skip
        parts[f"tokenizer{suffix}"] = clip_tokenizer
    parts["tokenizer_3"] = tiny_t5_tokenizer() if with_t5 else None
    parts["text_encoder_3"] = T5EncoderModel(T5Config(
        vocab_size=len(parts["tokenizer_3"]), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
    )) if with_t5 else None  # fmt: skip
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    StableDiffusion3Pipeline(**parts).save_pretrained(path)
    return path
