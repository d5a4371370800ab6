"""Checkpoints: one weights_only file that rebuilds an identical model."""

from pathlib import Path

import pytest
import torch

from vae_core.checkpoint import load_checkpoint, read_checkpoint, rebuild, save_checkpoint
from vae_core.model import ConvVAE, VAEConfig
from vae_core.training import TrainConfig, make_optimizer


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig(1, 28, 28, (8, 16), 4, "bernoulli"),
        VAEConfig(3, 40, 28, (8, 16, 16), 6, "gaussian"),
        VAEConfig(3, 28, 28, (8, 16), 4, "gaussian_optimal"),
    ],
)
@pytest.mark.parametrize("as_str", [True, False])
def test_round_trip_gives_identical_outputs(tmp_path, config, as_str):
    torch.manual_seed(0)
    model = ConvVAE(config)
    if config.likelihood == "gaussian":
        with torch.no_grad():
            model.likelihood.log_scale.fill_(-1.7)  # not the initial value
    if config.likelihood == "gaussian_optimal":
        model.likelihood.variance.copy_(torch.tensor([0.003, 0.02, 0.4]))  # a trained buffer
    path = tmp_path / "sub" / "vae.pt"
    save_checkpoint(str(path) if as_str else path, model, extra={"mlflow_run_id": "abc"})

    loaded = load_checkpoint(str(path) if as_str else path)
    assert loaded.config == config
    assert not loaded.training
    model.eval()
    x = torch.rand(3, config.in_channels, config.height, config.width)
    z = torch.randn(5, config.latent_dim)
    assert torch.equal(loaded(x)[0], model(x)[0])
    assert torch.equal(loaded.decode(z), model.decode(z))
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert torch.equal(
        loaded.likelihood.log_prob(x, model(x)[0]), model.likelihood.log_prob(x, model(x)[0])
    )


def test_rebuild_makes_the_model_of_a_checkpoint_read_once(tmp_path):
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4)).eval()
    save_checkpoint(tmp_path / "vae.pt", model, extra={"mlflow_run_id": "abc"})
    payload = read_checkpoint(tmp_path / "vae.pt")
    rebuilt = rebuild(payload)
    assert payload["extra"] == {"mlflow_run_id": "abc"} and not rebuilt.training
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(rebuilt.encode(x)[0], model.encode(x)[0])


def test_extra_and_state_survive_weights_only_load(tmp_path):
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4))
    cfg = TrainConfig(1, 4, 1e-3, 0.0, "constant", 0.0, 1.0, 0, 1, 0)
    optimizer = make_optimizer(model, cfg)
    model(torch.rand(2, 1, 28, 28))[0].sum().backward()
    optimizer.step()  # optimizer now has exp_avg state to save
    extra = {"mlflow_run_id": "run1", "params_hash": "p" * 8, "data_hash": "d" * 8}
    rng = torch.get_rng_state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, extra=extra, optimizer=optimizer.state_dict(), epoch=3, rng=rng)

    raw = torch.load(path, weights_only=True)  # what a user would run: no arbitrary unpickling
    assert raw["extra"] == extra
    assert raw["config"]["widths"] == [8]
    payload = read_checkpoint(path)
    assert payload["epoch"] == 3
    assert torch.equal(payload["rng"], rng)
    fresh = make_optimizer(ConvVAE(VAEConfig(1, 28, 28, (8,), 4)), cfg)
    fresh.load_state_dict(payload["optimizer"])
    state = optimizer.state_dict()["state"]
    assert all(
        torch.equal(fresh.state_dict()["state"][k]["exp_avg"], v["exp_avg"])
        for k, v in state.items()
    )


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4))
    path = tmp_path / "vae.pt"
    save_checkpoint(path, model)
    save_checkpoint(path, model)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["vae.pt"]


def test_reserved_state_keys_are_refused(tmp_path):
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", model, config={})
    assert not (tmp_path / "x.pt").exists()


def test_bad_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="other.pt: not a retina-vae checkpoint"):
        load_checkpoint(other)
