import json

import numpy as np
import pytest
import torch

from cdinn_stream.core.simulate import simulate
from cdinn_stream.lab.train import TrainConfig, train
from cdinn_stream.nn.reconstruct import load_model


def test_train_checkpoint_resume_and_outputs(tmp_path, monkeypatch):
    import cdinn_stream.lab.train as train_module

    cfg = TrainConfig(out_dir=tmp_path, widths=(4, 8, 16), convs_per_stage=1, n_train=512, n_val=128,
                      batch_size=128, epochs=3, seed=3)
    real_plot, plots = train_module.plot_training_curve, []

    def plot_then_stop_after_two(history, path):  # the run is interrupted after its second epoch's checkpoint
        real_plot(history, path)
        plots.append(path)
        if len(plots) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "plot_training_curve", plot_then_stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_module, "plot_training_curve", real_plot)
    first = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    for name in ("checkpoint.pt", "best.pt", "training_curve.png", "history.json"):
        assert (tmp_path / name).is_file(), name
    resumed = train(cfg, resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["recipe"]["n_train"] == 512
    model = load_model(tmp_path / "best.pt", device="cpu")
    assert model.size == 32


def test_training_is_deterministic(tmp_path):
    kw = dict(widths=(4, 8, 16), convs_per_stage=1, n_train=256, n_val=64, batch_size=64, epochs=1, seed=5)
    a = train(TrainConfig(out_dir=tmp_path / "a", **kw))
    b = train(TrainConfig(out_dir=tmp_path / "b", **kw))
    assert a["history"][0]["val_loss"] == pytest.approx(b["history"][0]["val_loss"], rel=1e-6)


def test_fourier_loss_is_zero_for_the_truth_and_blind_to_twin_and_shift():
    import math

    import torch

    from cdinn_stream.core.physics import twin_torch
    from cdinn_stream.lab.losses import fourier_loss

    d = simulate(8, 32, seed=4)
    m = torch.sqrt(torch.as_tensor(d.intensity))
    a = torch.as_tensor(d.amplitude).clamp(1e-4, 1 - 1e-4)
    p = torch.as_tensor(d.phase)
    logits = (torch.log(a / (1 - a)), torch.logit((p / (2 * math.pi) + 0.5).clamp(1e-6, 1 - 1e-6)))
    wrong = (logits[0], torch.zeros_like(logits[1]) + 3.0 * torch.randn_like(logits[1]))
    photons = torch.full((8,), 1e5)
    for kind in ("nse", "pearson", "poisson"):
        truth = float(fourier_loss(*logits, m, kind=kind, photons=photons))
        assert truth < 1e-3 and float(fourier_loss(*wrong, m, kind=kind, photons=photons)) > 100 * max(truth, 1e-5)
    twin = twin_torch(torch.polar(a, p).conj())
    ta, tp = twin.abs().clamp(1e-4, 1 - 1e-4), twin.angle()
    shifted = (torch.roll(torch.log(ta / (1 - ta)), 3, -1),
               torch.roll(torch.logit((tp / (2 * math.pi) + 0.5).clamp(1e-6, 1 - 1e-6)), 3, -1))
    assert float(fourier_loss(*shifted, m)) < 1e-3


def test_finetune_on_unlabelled_frames_lowers_the_fourier_loss(tmp_path, tiny_weights):
    from cdinn_stream.apps.cli import main

    d = simulate(600, 32, seed=8, photons=1e6)
    np.savez(tmp_path / "frames.npz", intensity=d.intensity)
    assert main(["finetune", str(tmp_path / "frames.npz"), "--init-weights", str(tiny_weights), "--out",
                 str(tmp_path / "ft"), "--epochs", "3", "--lr", "3e-3"]) == 0
    h = json.loads((tmp_path / "ft" / "history.json").read_text())["history"]
    assert min(e["val_loss"] for e in h[1:]) < h[0]["val_loss"]
    assert (tmp_path / "ft" / "best.pt").is_file()


def test_fresh_noise_cosine_schedule_and_data_folder(tmp_path):
    from cdinn_stream.apps.cli import main

    assert main(["simulate", str(tmp_path / "data"), "-n", "700", "--workers", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--n-train", "600",
                 "--n-val", "100", "--epochs", "2", "--widths", "4,8,16", "--photons", "1e4", "1e7",
                 "--background", "0.2", "--fresh-noise", "--schedule", "cosine", "--device", "auto"]) == 0
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(h["history"]) == 2 and h["recipe"]["fresh_noise"] and h["machine"]["cores"] >= 1
    assert h["history"][1]["lr"] < h["history"][0]["lr"] < 1e-3  # cosine decay within the run
    with pytest.raises(ValueError, match="holds 700 samples"):
        train(TrainConfig(out_dir=tmp_path / "x", data=str(tmp_path / "data"), n_train=700, n_val=100))


def test_patterson_fine_tune_starts_from_weights_without_it(tmp_path, tiny_weights):
    """--patterson with --init-weights of a model without the channels adds them (zero weights)."""
    from cdinn_stream.apps.cli import main
    from cdinn_stream.nn.weights import read_weights

    assert main(["train", "--out", str(tmp_path / "run"), "--n-train", "64", "--n-val", "16", "--epochs", "1",
                 "--widths", "4,8,16", "--space-to-depth", "2", "--patterson", "--init-weights", str(tiny_weights),
                 "--batch-size", "32"]) == 0
    tuned = read_weights(tmp_path / "run" / "best.pt")
    assert tuned.config.patterson and tuned.config.space_to_depth == 2
    first = next(m for m in tuned.encoder if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 12 and first.weight[:, 4:].abs().max() > 0  # the new channels learnt


def test_vector_phase_fine_tune_starts_from_an_angle_network(tmp_path, tiny_weights):
    """--phase-head vector with --init-weights of an angle network converts its head; the result
    loads, predicts phases in [-pi, pi] and cannot be fine-tuned back into an angle head."""
    from cdinn_stream.apps.cli import main

    args = ["--n-train", "64", "--n-val", "16", "--epochs", "1", "--batch-size", "32", "--recipe", "crystal",
            "--widths", "4,8,16", "--space-to-depth", "2"]
    assert main(["train", "--out", str(tmp_path / "run"), "--phase-head", "vector", "--init-weights",
                 str(tiny_weights), *args]) == 0
    model = load_model(tmp_path / "run" / "best.pt", device="cpu")
    assert model.network.config.phase_head == "vector"
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert h["recipe"]["phase_head"] == "vector" and np.isfinite(h["history"][0]["val_loss"])
    data = simulate(4, 32, seed=3)
    rec = model.predict(data.intensity)
    assert rec.phase.shape == (4, 32, 32) and np.abs(rec.phase).max() <= np.pi + 1e-6
    with pytest.raises(ValueError, match="vector phase head"):
        train(TrainConfig(out_dir=tmp_path / "back", init_weights=str(tmp_path / "run" / "best.pt"), n_train=32,
                          n_val=8, epochs=1, widths=(4, 8, 16), space_to_depth=2))


@pytest.mark.parametrize("fresh_noise", [False, True])
def test_mixed_recipes_centred_training(tmp_path, fresh_noise):
    """Both recipes in one set, centred as inference centres them: the weights say so, and a model
    loaded from them centres its input."""
    from cdinn_stream.apps.cli import main

    args = ["train", "--out", str(tmp_path / "run"), "--recipe", "mixed", "--crystal-fraction", "0.5", "--centre",
            "--n-train", "256", "--n-val", "64", "--batch-size", "64", "--epochs", "1", "--widths", "4,8,16",
            "--photons", "1e3", "1e8", "--background", "0.2"]
    assert main(args + (["--fresh-noise"] if fresh_noise else [])) == 0
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert h["recipe"]["data_recipe"] == "mixed" and h["recipe"]["centre"]
    assert np.isfinite(h["history"][0]["val_loss"])
    model = load_model(tmp_path / "run" / "best.pt", device="cpu")
    assert model.network.config.centred_input and model.centre
    if fresh_noise:  # a fine-tune of a centred network stays centred, asked or not
        assert main(["train", "--out", str(tmp_path / "tuned"), "--init-weights", str(tmp_path / "run" / "best.pt"),
                     "--n-train", "128", "--n-val", "32", "--batch-size", "64", "--epochs", "1",
                     "--widths", "4,8,16"]) == 0
        assert load_model(tmp_path / "tuned" / "best.pt", device="cpu").centre
    with pytest.raises(ValueError, match="data_recipe"):
        train(TrainConfig(out_dir=tmp_path / "x", data_recipe="measured"))
