"""`python -m rlft.pretrain env=digits` writes loadable weights (a few steps here; the shipped run used 1,500)."""

import torch

from rlft.envs.digits import load_classifier
from rlft.envs.models import load_ddpm
from rlft.pretrain import main


def test_pretrain_writes_a_loadable_ddpm_and_classifier(tmp_path):
    # pretrain.models picks what trains (the judge, the third model, has its own tests in tests/test_judge.py)
    main([f"pretrain.out_dir={tmp_path}", "pretrain.models=[ddpm,classifier]", "pretrain.ddpm_steps=3",
          "pretrain.ddpm_batch_size=4", "pretrain.classifier_epochs=1", "device=cpu"])  # fmt: skip
    assert not (tmp_path / "digit_judge.safetensors").exists()
    unet, scheduler_config = load_ddpm(str(tmp_path / "digits_ddpm"))
    assert scheduler_config["num_train_timesteps"] == 1000
    assert unet(torch.zeros(2, 1, 16, 16), torch.tensor([10, 500])).sample.shape == (2, 1, 16, 16)
    classifier = load_classifier(tmp_path / "digit_classifier.safetensors")
    assert classifier(torch.zeros(3, 1, 16, 16)).shape == (3, 10)


def test_missing_classifier_weights_say_how_to_make_them(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="python -m rlft.pretrain env=digits"):
        load_classifier(tmp_path / "nothing.safetensors")
