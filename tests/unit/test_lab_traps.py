"""Traps a scientist training, evaluating and publishing their own model falls into: resuming a
run with another recipe, publishing a fine-tune or an evaluation of other weights, loading a
published model by name, and tracebacks (or empty folders) for ordinary mistakes."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdinn_stream.apps.cli import build_parser, main
from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.weights import save_weights

TINY = ["--widths", "4,8,16", "--batch-size", "32"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """160 labelled 32x32 samples in an .npz, as `cdinn-stream simulate` writes them."""
    d = simulate(160, 32, seed=2)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, intensity=d.intensity, amplitude=d.amplitude, phase=d.phase)
    return path


@pytest.fixture
def no_plots(monkeypatch):
    """Training curves and evaluation figures skipped: matplotlib takes seconds per figure here."""
    import cdinn_stream.lab.evaluate as evaluate_module
    import cdinn_stream.lab.train as train_module

    for module, name in ((train_module, "plot_training_curve"), (evaluate_module, "plot_examples"),
                         (evaluate_module, "plot_chi2_extremes")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)


@pytest.fixture
def isolated_models(tmp_path, monkeypatch) -> Path:
    """The model search path without the user's folders: cwd, $CDINN_MODELS and XDG_DATA_HOME in tmp_path."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("CDINN_MODELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return work


def _first_run(run: Path, data: Path) -> list[str]:
    """A one-epoch run of two planned (its 1e-6 minute budget stops it), to be resumed."""
    args = ["train", "--out", str(run), "--data", str(data), "--n-train", "96", "--n-val", "32", "--epochs", "2",
            "--max-minutes", "1e-6", "--seed", "4", *TINY]
    assert main(args) == 0
    return args


def _run_folder(path: Path, weights: Path, history: dict) -> Path:
    path.mkdir()
    shutil.copy(weights, path / "best.pt")
    (path / "history.json").write_text(json.dumps(history))
    return path


TRAIN_HISTORY = {"recipe": {"n_train": 10, "n_val": 2, "seed": 0, "photons": None},
                 "history": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "lr": 1e-3, "seconds": 1.0}]}


def _report(weights: Path, out: Path, **fields) -> Path:
    """An evaluation folder as `evaluate` leaves it for ``weights`` (its report only: fast)."""
    out.mkdir()
    report = {"model": weights.stem, "n": 8, "seed": 1, "size": 32, "recipe": "paper", "centre": False,
              "photons": None, "precision": "fp32", "views": 1, "methods": {}, "weights": str(weights),
              "weights_sha256": _sha256(weights), **fields}
    (out / "report.json").write_text(json.dumps(report))
    return out


def _evaluate(model: str | Path, out: Path, *extra: str) -> Path:
    assert main(["evaluate", "--model", str(model), "--out", str(out), "-n", "8", "--no-erhio",
                 "--refine-iterations", "0", "--device", "cpu", *extra]) == 0
    return out


# 1. --resume continues the stored recipe


def test_resume_continues_the_stored_recipe(tmp_path, data, capsys, no_plots):
    run = tmp_path / "run"
    _first_run(run, data)
    before = json.loads((run / "history.json").read_text())
    assert len(before["history"]) == 1
    # --data given again (same value) and nothing else: n_train, n_val, epochs, max_minutes, widths, seed
    # come from the stored recipe, not the parser's defaults
    assert main(["train", "--out", str(run), "--resume", "--data", str(data)]) == 0
    after = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in after["history"]] == [1, 2]
    assert after["history"][0] == before["history"][0]
    assert after["recipe"] == before["recipe"]
    assert after["recipe"]["n_train"] == 96 and after["recipe"]["max_minutes"] == 1e-6
    # nothing given at all: the same
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "history.json").read_text())["recipe"] == before["recipe"]


def test_resume_refuses_a_flag_that_differs_from_the_stored_recipe(tmp_path, data, capsys, no_plots):
    run = tmp_path / "run"
    _first_run(run, data)
    capsys.readouterr()
    for flag, value in (("--n-train", "64"), ("--epochs", "5"), ("--lr", "0.01"), ("--widths", "8,16,32")):
        assert main(["train", "--out", str(run), "--resume", "--data", str(data), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cdinn-stream train: error:") and flag in err and "\n" not in err.strip()
    assert main(["train", "--out", str(run), "--resume", "--centre"]) == 2
    assert "--centre" in capsys.readouterr().err
    assert json.loads((run / "history.json").read_text())["recipe"]["n_train"] == 96  # untouched


def test_train_api_resume_refuses_another_recipe(tmp_path, data, no_plots):
    from cdinn_stream.lab.train import TrainConfig, train

    kw = dict(out_dir=tmp_path / "run", data=str(data), n_train=96, n_val=32, widths=(4, 8, 16), batch_size=32,
              epochs=2, max_minutes=1e-6)
    train(TrainConfig(**kw))
    with pytest.raises(ValueError, match="n_train"):
        train(TrainConfig(**{**kw, "n_train": 64}), resume=True)
    assert len(train(TrainConfig(**kw), resume=True)["history"]) == 2


def test_resume_without_a_checkpoint_is_refused(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--resume", "--data", str(data), "--n-train", "96", "--n-val", "32",
                 "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(run / "checkpoint.pt") in err
    assert not run.exists()


# 2. publish: fine-tune runs, evaluations of other weights, overwriting, the shipped models


def test_evaluate_records_the_weights_hash(tmp_path, tiny_weights, no_plots):
    ev = _evaluate(tiny_weights, tmp_path / "ev")
    report = json.loads((ev / "report.json").read_text())
    assert report["weights_sha256"] == _sha256(tiny_weights)


def test_publish_a_finetune_run(tmp_path, tiny_weights, isolated_models, no_plots):
    d = simulate(40, 32, seed=8, photons=1e6)
    np.savez(tmp_path / "frames.npz", intensity=d.intensity)
    ft = tmp_path / "ft"
    assert main(["finetune", str(tmp_path / "frames.npz"), "--init-weights", str(tiny_weights), "--out", str(ft),
                 "--epochs", "1"]) == 0
    ev = _report(ft / "best.pt", tmp_path / "ev")
    models = tmp_path / "models"
    assert main(["publish", str(ft), str(ev), "--name", "tuned-32", "--models", str(models)]) == 0
    card = json.loads((models / "tuned-32.json").read_text())
    assert card["name"] == "tuned-32" and card["recipe"]["kind"] == "nse"
    assert card["data"]["frames"] == 40 and card["epochs_run"] == 1
    assert card["weights_bytes"] == (models / "tuned-32.pt").stat().st_size


def test_publish_refuses_an_evaluation_of_other_weights_and_writes_nothing(tmp_path, tiny_weights, capsys):
    run = _run_folder(tmp_path / "run", tiny_weights, TRAIN_HISTORY)
    other = tmp_path / "other.pt"
    torch.manual_seed(9)
    save_weights(CDINN(ModelConfig(32, (4, 8, 16), 1, 2)), other)
    ev_other = _report(other, tmp_path / "ev-other", recipe="crystal")
    ev = _report(tiny_weights, tmp_path / "ev")
    models = tmp_path / "models"
    assert main(["publish", str(run), str(ev_other), "--name", "tiny-32", "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert "other weights" in err and "best.pt" in err
    assert not models.exists()
    for extra in (["--also", str(ev_other)], ["--crystal-evaluation", str(ev_other)]):
        assert main(["publish", str(run), str(ev), "--name", "tiny-32", "--models", str(models), *extra]) == 2
        assert "other weights" in capsys.readouterr().err
        assert not models.exists()
    assert main(["publish", str(run), str(ev), "--name", "tiny-32", "--models", str(models)]) == 0


def test_publish_refuses_a_report_without_a_weights_hash(tmp_path, tiny_weights, capsys):
    run = _run_folder(tmp_path / "run", tiny_weights, TRAIN_HISTORY)
    ev = _report(tiny_weights, tmp_path / "ev")
    report = json.loads((ev / "report.json").read_text())
    del report["weights"], report["weights_sha256"]  # as evaluate wrote reports before it recorded the hash
    (ev / "report.json").write_text(json.dumps(report))
    assert main(["publish", str(run), str(ev), "--name", "tiny-32", "--models", str(tmp_path / "models")]) == 2
    assert "re-run" in capsys.readouterr().err and not (tmp_path / "models").exists()


def test_publish_refuses_to_overwrite_without_force(tmp_path, tiny_weights, capsys):
    run = _run_folder(tmp_path / "run", tiny_weights, TRAIN_HISTORY)
    ev = _report(tiny_weights, tmp_path / "ev")
    models = tmp_path / "models"
    args = ["publish", str(run), str(ev), "--name", "tiny-32", "--models", str(models)]
    assert main(args) == 0
    card = (models / "tiny-32.json").read_text()
    capsys.readouterr()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (models / "tiny-32.json").read_text() == card
    assert main([*args, "--force"]) == 0


def test_publish_over_a_shipped_model_needs_force_and_warns(tmp_path, tiny_weights, monkeypatch, capsys, caplog):
    import cdinn_stream.lab.card as card_module

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(tiny_weights, shipped / "cdinn-32.pt")
    (shipped / "cdinn-32.json").write_text(json.dumps({"name": "cdinn-32"}))
    monkeypatch.setattr(card_module, "shipped_model_dirs", lambda: [shipped])
    run = _run_folder(tmp_path / "run", tiny_weights, TRAIN_HISTORY)
    ev = _report(tiny_weights, tmp_path / "ev")
    args = ["publish", str(run), str(ev), "--name", "cdinn-32", "--models", str(shipped)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "shipped" in err and "cdinn-32" in err and "--force" in err
    assert json.loads((shipped / "cdinn-32.json").read_text()) == {"name": "cdinn-32"}
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--force"]) == 0
    assert "shipped model cdinn-32" in caplog.text
    assert json.loads((shipped / "cdinn-32.json").read_text())["epochs_run"] == 1


def test_the_package_models_folder_is_the_shipped_one():
    from cdinn_stream.nn.reconstruct import shipped_model_dirs

    repo_models = Path(__file__).resolve().parents[2] / "models"
    assert repo_models.resolve() in [d.resolve() for d in shipped_model_dirs()]


def test_attach_refuses_an_evaluation_of_other_weights(tmp_path, tiny_weights, capsys):
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(5)
    save_weights(CDINN(ModelConfig(32, (4, 8, 16), 1, 2)), models / "tiny.pt")  # not tiny_weights
    (models / "tiny.json").write_text(json.dumps({"name": "tiny"}))
    ev = _report(tiny_weights, tmp_path / "ev", model="tiny", recipe="crystal")
    assert main(["publish", "--attach", "tiny", "--crystal-evaluation", str(ev), "--models", str(models)]) == 2
    assert "other weights" in capsys.readouterr().err
    assert json.loads((models / "tiny.json").read_text()) == {"name": "tiny"}


# 3. the model search path


def test_published_model_loads_by_name(tmp_path, tiny_weights, isolated_models, no_plots):
    from cdinn_stream import load_model

    run = _run_folder(tmp_path / "run", tiny_weights, TRAIN_HISTORY)
    ev = _report(tiny_weights, tmp_path / "ev")
    assert main(["publish", str(run), str(ev), "--name", "lab-cdinn-32"]) == 0  # --models default: ./models
    assert (isolated_models / "models" / "lab-cdinn-32.pt").is_file()
    model = load_model("lab-cdinn-32", device="cpu")
    assert model.name == "lab-cdinn-32" and model.card["name"] == "lab-cdinn-32"
    # evaluate finds it by name too, and records its hash
    ev2 = _evaluate("lab-cdinn-32", tmp_path / "ev2")
    report = json.loads((ev2 / "report.json").read_text())
    assert report["weights_sha256"] == _sha256(isolated_models / "models" / "lab-cdinn-32.pt")


def test_search_path_order(tmp_path, tiny_weights, isolated_models, monkeypatch):
    from cdinn_stream.nn.reconstruct import model_path, model_search_path

    first, second = tmp_path / "first", tmp_path / "second"
    user = tmp_path / "xdg" / "cdinn-stream" / "models"
    for folder in (first, second, user, isolated_models / "models"):
        folder.mkdir(parents=True)
        shutil.copy(tiny_weights, folder / "mine.pt")
    shutil.copy(tiny_weights, user / "only-user.pt")
    monkeypatch.setenv("CDINN_MODELS", f"{first}{__import__('os').pathsep}{second}")
    path = [d.resolve() for d in model_search_path()]
    assert path[:4] == [first.resolve(), second.resolve(), (isolated_models / "models").resolve(), user.resolve()]
    assert model_path("mine") == first / "mine.pt"
    assert model_path("only-user") == user / "only-user.pt"
    monkeypatch.delenv("CDINN_MODELS")
    assert model_path("mine").resolve() == (isolated_models / "models" / "mine.pt").resolve()
    assert model_path("cdinn-32").is_file()  # the shipped ones come last


def test_unknown_model_name_lists_where_it_looked(isolated_models, tmp_path, monkeypatch, capsys):
    from cdinn_stream import load_model

    monkeypatch.setenv("CDINN_MODELS", str(tmp_path / "env-models"))
    with pytest.raises(ValueError) as err:
        load_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and str(tmp_path / "env-models") in message
    assert str(tmp_path / "xdg" / "cdinn-stream" / "models") in message and "cdinn-32" in message


# 4. clear errors, no empty folders


def test_train_missing_data_file_is_a_clear_error_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "mine"
    assert main(["train", "--out", str(out), "--data", str(tmp_path / "nope.npz"), "--n-train", "8",
                 "--n-val", "8", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdinn-stream train: error:") and "nope.npz" in err
    assert not (tmp_path / "runs").exists()


def test_train_data_without_labels_is_a_clear_error(tmp_path, capsys):
    d = simulate(20, 32, seed=1)
    np.savez(tmp_path / "frames.npz", intensity=d.intensity)
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "frames.npz"), "--n-train", "8",
                 "--n-val", "8", *TINY]) == 2
    err = capsys.readouterr().err
    assert "amplitude" in err and "phase" in err and not (tmp_path / "run").exists()


def test_wrong_size_message_names_the_flags(tmp_path, data, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(data), "--n-train", "150",
                 "--n-val", "20", *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds 160 samples" in err and "--n-train" in err and "--n-val" in err
    assert not (tmp_path / "run").exists()


def test_train_help_shows_the_paper_split(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default 180000" in out and "default 20000" in out and "default 30" in out


def test_ctrl_c_during_training_says_how_to_resume(tmp_path, data, monkeypatch, capsys):
    import cdinn_stream.lab.train as train_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    real = train_module.plot_training_curve
    monkeypatch.setattr(train_module, "plot_training_curve", interrupt)  # right after the first checkpoint
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(data), "--n-train", "96", "--n-val", "32",
                 "--epochs", "2", *TINY]) == 130
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pt") in err and f"cdinn-stream train --out {run} --resume" in err
    monkeypatch.setattr(train_module, "plot_training_curve", real)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert len(json.loads((run / "history.json").read_text())["history"]) == 2


def test_evaluate_on_a_data_file(tmp_path, tiny_weights, data, no_plots):
    ev = _evaluate(tiny_weights, tmp_path / "ev", "--data", str(data))
    report = json.loads((ev / "report.json").read_text())
    assert report["data"] == str(data) and report["n"] == 8
    nn = report["methods"]["nn"]["metrics"]["support_iou"]["median"]
    # the first 8 samples of the file, scored against its labels
    from cdinn_stream.core.metrics import score
    from cdinn_stream.nn.reconstruct import load_model

    d = np.load(data)
    rec = load_model(tiny_weights, device="cpu").predict(d["intensity"][:8])
    want = score(rec.amplitude, rec.phase, d["amplitude"][:8], d["phase"][:8], d["intensity"][:8])
    assert nn == pytest.approx(float(np.median(want["support_iou"])), abs=0.02)


def test_publish_missing_evaluation_folder(tmp_path, tiny_weights, capsys):
    run = _run_folder(tmp_path / "run", tiny_weights, TRAIN_HISTORY)
    assert main(["publish", str(run), str(tmp_path / "no-eval"), "--name", "x", "--models",
                 str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdinn-stream publish: error:") and "no-eval" in err
    assert not (tmp_path / "models").exists()


def test_failed_evaluate_and_finetune_leave_no_folder(tmp_path, tiny_weights, data, capsys):
    assert main(["evaluate", "--model", str(tiny_weights), "--out", str(tmp_path / "ev"), "--data", str(data),
                 "-n", "500", "--no-erhio"]) == 2
    assert "-n" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    np.savez(tmp_path / "small.npz", intensity=np.ones((20, 16, 16), np.float32))
    assert main(["finetune", str(tmp_path / "small.npz"), "--init-weights", str(tiny_weights), "--out",
                 str(tmp_path / "ft")]) == 2
    assert not (tmp_path / "ft").exists()
    assert main(["finetune", str(tmp_path / "missing.npz"), "--init-weights", str(tiny_weights), "--out",
                 str(tmp_path / "ft")]) == 2
    assert "missing.npz" in capsys.readouterr().err and not (tmp_path / "ft").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_a_clear_error(tiny_weights, tmp_path, data, capsys):
    from cdinn_stream import load_model

    with pytest.raises(ValueError, match="CUDA is not available in this torch build/machine: use device='cpu'"):
        load_model(tiny_weights, device="cuda")
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(data), "--n-train", "96", "--n-val", "32",
                 "--device", "cuda", *TINY]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_publish_int8_checks_the_evaluated_weights_and_the_name(tmp_path, tiny_weights):
    from cdinn_stream.core.physics import normalized_amplitude
    from cdinn_stream.lab.card import publish_int8
    from cdinn_stream.nn.int8 import int8_available, quantize, save_int8_weights

    if not int8_available():
        pytest.skip("no oneDNN int8 operators in this torch build")
    torch.manual_seed(1)
    x = normalized_amplitude(torch.as_tensor(simulate(16, 32, seed=3).intensity))[:, None]
    weights = tmp_path / "tiny-int8.pt"
    save_int8_weights(quantize(CDINN(ModelConfig(32, (8, 16, 32), 2, 4)).eval(),
                               x.contiguous(memory_format=torch.channels_last)), weights)
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.json").write_text(json.dumps({"name": "tiny", "code_commit": "abc1234"}))
    stage = {"recipe": {"lr": 1e-4}, "steps": 10, "batch": 8, "train_samples": 80, "training_seconds": 1.0}
    with pytest.raises(ValueError, match="other weights"):
        publish_int8(weights, _report(tiny_weights, tmp_path / "ev-float"), "tiny-int8", models, source="tiny",
                     stages=[stage])
    assert not (models / "tiny-int8.pt").exists()
    ev = _report(weights, tmp_path / "ev")
    assert publish_int8(weights, ev, "tiny-int8", models, source="tiny", stages=[stage]).is_file()
    with pytest.raises(ValueError, match="--force"):
        publish_int8(weights, ev, "tiny-int8", models, source="tiny", stages=[stage])
    publish_int8(weights, ev, "tiny-int8", models, source="tiny", stages=[stage], force=True)


def test_train_refuses_to_overwrite_a_run_without_resume(tmp_path):
    from cdinn_stream.lab.train import TrainConfig, train

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(out_dir=out, size=32, widths=(4, 8, 16), n_train=8, n_val=8, epochs=1))
    assert (out / "checkpoint.pt").read_bytes() == b"an earlier run's checkpoint"
