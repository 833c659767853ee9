"""The matrix through real Ray (the default): DDPO, DRaFT and Adjoint Matching on the tiny celebahq-layout DDPM and
the tiny Stable Diffusion 1.5 folder, and one cell of every other env family (SD 3.5 with GRPO), each through the
CLI's `main` with a relative run folder: the learners (Ray Train workers, whose working directory is Ray's session
folder) must leave their checkpoints in that run folder. The runs share one local Ray, started by the first."""

import pytest
import ray

from rlft.run import main
from tests.test_matrix import ALGO_OVERRIDES, cell_overrides, check_run_folder

pytestmark = pytest.mark.slow

RAY_CELLS = [
    ("ddpo", "celebahq", "over50"), ("draft", "celebahq", "over50"), ("adjoint_matching", "celebahq", "over50"),
    ("ddpo", "sd15", "image_reward"), ("draft", "sd15", "pickscore"), ("adjoint_matching", "sd15", "clip_score"),
    ("ddpo", "digits", "digit"), ("deft", "digits_sr", "measurement"), ("ddpo", "flowers102_sr", "measurement"),
    ("nft", "digits_flow", "digit"), ("grpo", "sd35_medium", "pickscore"),
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_ray():
    yield
    ray.shutdown()


@pytest.mark.parametrize("algo, env, reward", RAY_CELLS, ids=["-".join(cell) for cell in RAY_CELLS])
def test_a_cell_runs_through_ray_into_its_relative_run_folder(algo, env, reward, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in cell_overrides(algo, env, reward, tiny_models) if o != "ray.enabled=false"]
    assert set(ALGO_OVERRIDES[algo]) <= set(overrides)
    run_dir = main([*overrides, "ray.num_cpus=4", "logging.run_dir=runs/cell"])
    assert ray.is_initialized()
    assert run_dir == (tmp_path / "runs" / "cell").resolve() and (run_dir / "ray").is_dir()
    check_run_folder(run_dir)
