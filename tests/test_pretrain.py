"""`python -m rlft.pretrain env=digits` writes loadable weights (a few steps here; the shipped run used 1,500)."""

import torch
from rlft.envs.digits import load_classifier

from rlft.policy import load_base_model
from rlft.pretrain import main


def test_pretrain_writes_a_loadable_ddpm_and_classifier(tmp_path):
    main([f"pretrain.out_dir={tmp_path}", "pretrain.ddpm_steps=3", "pretrain.classifier_epochs=1", "device=cpu"])
    unet, scheduler_config = load_base_model(str(tmp_path / "digits_ddpm"))
    assert scheduler_config["num_train_timesteps"] == 1000
    assert unet(torch.zeros(2, 1, 16, 16), torch.tensor([10, 500])).sample.shape == (2, 1, 16, 16)
    classifier = load_classifier(tmp_path / "digit_classifier.safetensors")
    assert classifier(torch.zeros(3, 1, 16, 16)).shape == (3, 10)


def test_missing_classifier_weights_say_how_to_make_them(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="python -m rlft.pretrain env=digits"):
        load_classifier(tmp_path / "nothing.safetensors")
