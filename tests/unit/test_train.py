import json

import pytest

from cdinn_stream.reconstruct import load_model
from cdinn_stream.train import TrainConfig, train


def test_train_checkpoint_resume_and_outputs(tmp_path):
    cfg = TrainConfig(out_dir=tmp_path, widths=(4, 8, 16), convs_per_stage=1, n_train=512, n_val=128,
                      batch_size=128, epochs=2, seed=3)
    first = train(cfg)
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    for name in ("checkpoint.pt", "best.pt", "training_curve.png", "history.json"):
        assert (tmp_path / name).is_file(), name
    cfg.epochs = 3
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
