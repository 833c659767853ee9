"""A base DDPM from a folder of images: trains, resumes to the same weights, and is fine-tunable with env=ddpm."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rlft.pretrain_folder
from rlft.pretrain import main
from rlft.pretrain_folder import load_image_folder
from rlft.rollout import RolloutWorker
from tests.helpers import tiny_cfg

TINY_UNET = ["pretrain.image_size=8", "pretrain.channels=1", "pretrain.block_out_channels=[8,16]",
             "pretrain.attention_levels=[1]", "pretrain.layers_per_block=1", "pretrain.norm_num_groups=4",
             "pretrain.ddpm_batch_size=4", "device=cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Ten 12x10 "microscopy" PNGs (bright blobs on dark), one in a subfolder, plus a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "more").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:10, 0:12]
    for i in range(10):
        cy, cx = rng.uniform(2, 8), rng.uniform(2, 10)
        blob = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)).astype(np.uint8)
        Image.fromarray(blob).save(folder / ("more" if i == 0 else ".") / f"cell_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "more" / "nothing").mkdir()
    return folder


def test_images_are_cropped_resized_and_kept_as_uint8(image_folder):
    images = load_image_folder(image_folder, size=8, channels=1)
    assert images.shape == (10, 1, 8, 8) and images.dtype == torch.uint8
    assert load_image_folder(image_folder, size=4, channels=3).shape == (10, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_image_folder(image_folder / "more" / "nothing", size=8, channels=1)
    with pytest.raises(ValueError, match="pretrain.channels=2"):
        load_image_folder(image_folder, size=8, channels=2)


def test_training_resumes_to_the_same_weights_and_the_model_fine_tunes(image_folder, tmp_path, monkeypatch):
    common = [f"pretrain.image_folder={image_folder}", "pretrain.checkpoint_every=2", "pretrain.ddpm_steps=4",
              *TINY_UNET]  # fmt: skip
    main([*common, f"pretrain.out_dir={tmp_path / 'once'}"])
    save = rlft.pretrain_folder.save_checkpoint

    def save_then_crash(path, *args):
        save(path, *args)
        raise KeyboardInterrupt  # killed right after the checkpoint of step 2

    monkeypatch.setattr(rlft.pretrain_folder, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main([*common, f"pretrain.out_dir={tmp_path / 'twice'}"])
    assert not (tmp_path / "twice" / "config.json").exists()
    monkeypatch.setattr(rlft.pretrain_folder, "save_checkpoint", save)
    main([*common, f"pretrain.out_dir={tmp_path / 'twice'}"])  # resumes from step 2
    once = load_file(str(tmp_path / "once" / "diffusion_pytorch_model.safetensors"))
    twice = load_file(str(tmp_path / "twice" / "diffusion_pytorch_model.safetensors"))
    assert once.keys() == twice.keys()
    for name in once:
        torch.testing.assert_close(once[name], twice[name], rtol=0, atol=0, msg=name)
    initial = load_file(str(tmp_path / "twice" / "checkpoint" / "unet.safetensors"))
    assert any(not torch.equal(initial[k], once[k]) for k in once)  # training moved the weights
    # the folder is a base model for any algorithm: env=ddpm env.base_model=<folder>
    cfg = tiny_cfg(tmp_path / "once", "env=ddpm", "reward=jpeg_compressibility", "env.num_inference_steps=3")
    batch = RolloutWorker(cfg).collect(0, seed=0, n=8)
    assert batch["latents"].shape == (8, 4, 1, 8, 8) and batch["reward_finite"].all()


def test_bad_settings_are_named(image_folder, tmp_path):
    with pytest.raises(SystemExit, match="pretrain.out_dir"):
        main([f"pretrain.image_folder={image_folder}"])
    with pytest.raises(ValueError, match="pretrain.image_size=12 must divide by 2"):
        main([f"pretrain.image_folder={image_folder}", f"pretrain.out_dir={tmp_path}", "pretrain.image_size=12",
              "pretrain.block_out_channels=[8,16,16,16]", "pretrain.norm_num_groups=4"])  # fmt: skip
