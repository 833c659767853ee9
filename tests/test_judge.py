"""The independent digit judge (envs/judge.py): quality on unseen data, independence from the reward classifier."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rlft.envs.digits import load_classifier, load_digits
from rlft.envs.judge import judge_metrics, load_judge, predict_probs, train_judge

TARGET = 3  # the digit the reward hack of DRaFT produces: 8s, 9s and 5s scored as confident 3s


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def train_split():
    return load_digits("train")  # the reward classifier's training data; the judge never saw it


def test_shipped_judge_classifies_the_unseen_train_split(judge, train_split):
    images, labels = train_split
    predicted = predict_probs(judge, images).argmax(1)
    assert (predicted == labels).float().mean().item() >= 0.95
    # it also agrees with the reward classifier on real digits: the two differ on hacked samples, not on data
    reward_predicted = predict_probs(load_classifier(), images).argmax(1)
    assert (predicted == reward_predicted).float().mean().item() >= 0.95


def test_judge_is_frozen_and_of_another_family(judge):
    assert not judge.training
    assert not any(p.requires_grad for p in judge.parameters())
    assert not any(isinstance(m, nn.Conv2d) for m in judge.modules())
    assert any(isinstance(m, nn.Conv2d) for m in load_classifier().modules())


def test_missing_weights_say_how_to_rebuild_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m rlft.pretrain env=digits pretrain.models=\[judge\]"):
        load_judge(tmp_path / "missing.safetensors")


def test_retraining_with_the_same_seed_reproduces_the_shipped_judge(judge, train_split, tmp_path):
    images, labels = train_split
    shipped_accuracy = (predict_probs(judge, images).argmax(1) == labels).float().mean().item()
    result = train_judge(tmp_path / "judge.safetensors", seed=0)
    assert result["train_accuracy"] == pytest.approx(shipped_accuracy, abs=0.005)
    # bit-identical on the machine that trained it; another CPU's kernels may round differently in the last bits
    shipped, retrained = judge.state_dict(), load_file(result["path"])
    assert all(torch.allclose(shipped[k], retrained[k], atol=1e-3) for k in shipped)


def test_training_is_seeded(tmp_path):
    first, again, other = (train_judge(tmp_path / f"{name}.safetensors", seed=seed, epochs=2)["path"]
                           for name, seed in [("first", 0), ("again", 0), ("other", 1)])  # fmt: skip
    first, again, other = load_file(first), load_file(again), load_file(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_judge_metrics_on_real_digits_and_on_noise(judge, train_split):
    images, labels = train_split
    threes = images[labels == TARGET]
    real = judge_metrics(threes, TARGET, judge)
    assert real["target_fraction"] >= 0.9
    assert sum(real["counts"]) == len(threes)
    assert real["counts"][TARGET] == round(real["target_fraction"] * len(threes))
    noise = torch.rand(len(threes), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # confidence is what tells a broken sampler's blobs from digits
    assert judge_metrics(noise, TARGET, judge)["confidence"] < real["confidence"] - 0.2


def fool_reward_classifier(images, classifier, target, eps=0.3, step=0.005, steps=300, stop_prob=0.9):
    """Signed-gradient ascent on log p(target | x) under `classifier`, within an L-infinity ball of radius `eps`.

    Each image stops once p(target | x) > stop_prob: the reward is then saturated, as for a fine-tune that has
    hacked it; pushing on would spend the budget turning the image into an actual `target`, which is no hack.
    """
    adversarial, done = images.clone(), torch.zeros(len(images), dtype=torch.bool)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        log_prob = torch.log_softmax(classifier(adversarial), dim=1)[:, target]
        (grad,) = torch.autograd.grad(log_prob.sum(), adversarial)
        done |= log_prob.detach().exp() > stop_prob
        moved = adversarial.detach() + step * grad.sign() * (~done).float().view(-1, 1, 1, 1)
        adversarial = (images + (moved - images).clamp(-eps, eps)).clamp(-1, 1)
    return adversarial.detach()


def test_an_image_that_fools_the_reward_classifier_does_not_fool_the_judge(judge, train_split):
    images, labels = train_split
    eights = images[labels == 8][:32]  # unseen by the judge, so its memory of these images gives it no edge
    classifier = load_classifier()
    hacked = fool_reward_classifier(eights, classifier, TARGET)
    assert (hacked - eights).abs().max().item() <= 0.3 + 1e-6
    reward_fooled = (predict_probs(classifier, hacked).argmax(1) == TARGET).float().mean().item()
    judge_fooled = judge_metrics(hacked, TARGET, judge)["target_fraction"]
    assert reward_fooled >= 0.9
    assert judge_fooled <= reward_fooled - 0.5
