"""The command line, run as a user would (in-process through ``main``)."""

import json

import numpy as np
import pytest

from cdinn_stream.apps.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("simulate", "train", "evaluate", "publish", "bench", "finetune", "backfill"):
        assert cmd in out
    for cmd in ("simulate", "train", "evaluate", "publish", "bench", "finetune", "backfill"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "usage: cdinn-stream " + cmd in capsys.readouterr().out


def test_simulate_writes_npz(tmp_path):
    out = tmp_path / "d.npz"
    assert main(["simulate", str(out), "-n", "10", "--size", "64", "--photons", "1e5"]) == 0
    data = np.load(out)
    assert data["intensity"].shape == (10, 64, 64) and data["phase"].shape == (10, 64, 64)


def test_evaluate_then_publish(tmp_path, tiny_weights, capsys):
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny_weights), "--out", str(ev), "-n", "12", "--iterations", "30",
                 "--refine-iterations", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| nn |" in out and "| erhio |" in out and "| nn+refine |" in out
    report = json.loads((ev / "report.json").read_text())
    assert report["n"] == 12 and set(report["methods"]) == {"nn", "erhio", "nn+refine"}
    for m in report["methods"].values():
        assert {"median", "p90"} <= set(m["metrics"]["chi2"])
        assert m["ms_per_pattern_batched"] > 0
    for fig in ("examples.png", "best.png", "worst.png"):
        assert (ev / fig).stat().st_size > 1000
    # a training run folder, as `train` leaves it
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(tiny_weights.read_bytes())
    (run / "history.json").write_text(json.dumps({
        "recipe": {"n_train": 10, "n_val": 2, "seed": 0, "photons": None},
        "history": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "lr": 1e-3, "seconds": 1.0}]}))
    models = tmp_path / "models"
    assert main(["publish", str(run), str(ev), "--name", "tiny-32", "--models", str(models)]) == 0
    card = json.loads((models / "tiny-32.json").read_text())
    assert card["name"] == "tiny-32" and card["epochs_run"] == 1
    assert card["evaluation"]["methods"]["nn"]["metrics"]["support_iou"]["median"] >= 0
    assert len(card["code_commit"]) >= 7
    from cdinn_stream import load_model

    assert load_model(models / "tiny-32.pt", device="cpu").card["name"] == "tiny-32"
    # a second stage fine-tuned from the shipped weights: its card carries the first stage
    (run / "history.json").write_text(json.dumps({
        "recipe": {"n_train": 20, "n_val": 2, "seed": 1, "photons": None},
        "history": [{"epoch": e, "train_loss": 0.5, "val_loss": 0.4, "lr": 1e-4, "seconds": 2.0 * e}
                    for e in (1, 2)]}))
    before = tmp_path / "tiny-32.before.json"
    before.write_text((models / "tiny-32.json").read_text())
    assert main(["publish", str(run), str(ev), "--name", "tiny-32", "--models", str(models),
                 "--after", str(before), "--also", str(ev), "--force"]) == 0  # it replaces the first tiny-32
    card = json.loads((models / "tiny-32.json").read_text())
    assert card["other_evaluations"][0]["n"] == 12 and card["evaluation"]["views"] == 1
    assert [s["recipe"]["n_train"] for s in card["lineage"]] == [10]
    assert card["lineage"][0]["best_val_loss"] == 0.9
    assert card["total_epochs"] == 3 and card["total_training_seconds"] == 5.0


def test_crystal_evaluation_with_sweeps_goes_into_the_card(tmp_path, tiny_weights, capsys):
    ev = tmp_path / "ev-crystal"
    assert main(["evaluate", "--model", str(tiny_weights), "--recipe", "crystal", "--out", str(ev), "-n", "12",
                 "--iterations", "20", "--refine-iterations", "5", "--noise", "1e3", "1e6", "--offsets", "0", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "crystal recipe" in out and "ramp removed" in out and "| 1 |" in out
    report = json.loads((ev / "report.json").read_text())
    assert report["recipe"] == "crystal" and report["seed"] == 27_182_818
    assert set(report["noise"]) == {"clean", "1000", "1e+06"} and set(report["offsets"]) == {"0", "1"}
    assert "strain_rmse" in report["methods"]["erhio"]["metrics"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.json").write_text(json.dumps({"name": "tiny", "evaluation": {"n": 1}}))
    (models / "tiny.pt").write_bytes(tiny_weights.read_bytes())  # the weights evaluated
    # the report is of another model: refused, with the reason
    assert main(["publish", "--attach", "other", "--crystal-evaluation", str(ev), "--models", str(models)]) == 2
    assert "evaluates 'tiny'" in capsys.readouterr().err
    assert main(["publish", "--attach", "tiny", "--crystal-evaluation", str(ev), "--models", str(models)]) == 0
    card = json.loads((models / "tiny.json").read_text())
    assert card["evaluation"] == {"n": 1} and card["evaluation_crystal"]["offsets"]["1"]["chi2"]["median"] > 0
    assert (models / "tiny.crystal.worst.png").stat().st_size > 1000


def test_errors_are_reported_not_raised(capsys):
    assert main(["evaluate", "--model", "no-such-model", "-n", "2"]) == 2
    assert "no shipped model named" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick(tmp_path, tiny_weights):
    """Every suite runs end to end on real parts (a Tiled server process, a ZeroMQ subscriber)."""
    assert main(["bench", "--quick", "--model", str(tiny_weights), "--models", str(tiny_weights),
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    rows = r["model"]["rows"]
    assert [x["batch"] for x in rows if x["precision"] == "fp32"] == [1, 4, 16, 64]
    assert all(x["network_gflop_per_s"] > 0 for x in rows) and r["model"]["matmul_peak_gflop_per_s"]["fp32"] > 0
    assert r["erhio"]["ms_single"] > 0 and r["erhio"]["side_by_side"]["erhio"]["chi2"] >= 0
    p = r["pipeline"]
    assert p["throughput"]["frames_received_zmq"] == p["throughput"]["frames_in_tiled"] == p["throughput"]["frames"]
    assert p["latency"]["frames_received_zmq"] == p["latency"]["frames"]
    assert p["memory"]["frames_in_tiled"] == p["memory"]["frames"]
    assert p["ceiling"]["frames_received_zmq"] == p["ceiling"]["frames"] and p["ceiling"]["frames_per_s"] > 0
    z = p["throughput_zmq_only"]
    assert z["frames_received_zmq"] == z["frames"] and z["frames_in_tiled"] is None and z["ratio_to_raw_model"] > 0
    paper = p["throughput_paper_network"]
    assert paper["frames_received_zmq"] == paper["frames_in_tiled"] == paper["frames"]
    assert paper["ratio_to_raw_model"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "ER/HIO" in md and "Pipeline end to end" in md


@pytest.mark.slow
def test_bench_trust_quick(tmp_path):
    """The trust suite runs end to end on the shipped model: chi^2 cost, refinement windows, the
    automatic-refinement policies in a live run (ZeroMQ), live adaptation; every frame accounted for."""
    assert main(["bench", "--quick", "--suite", "trust", "--model", "cdinn-32", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())["trust"]
    costs = [row for row in r["chi2_cost"] if "error" not in row]
    assert costs and all(row["chi2_us"] > 0 and row["network_us"] > 0 for row in costs)
    for recipe in ("paper", "crystal"):
        assert set(r["windows"][recipe]) == {"nn", "nn+refine (model window)", "nn+refine (2x window)",
                                             "erhio (2x window)"}
    a = r["auto_refine"]
    policies = [v for v in a.values() if isinstance(v, dict)]
    assert len(policies) == 3 and all(p["zmq_frames"] == a["frames"] for p in policies)
    off, frames_budget, cpu_budget = policies
    assert off["refined"] is None and off["chi2_median_best"] == off["chi2_median_nn"]
    assert 0 < frames_budget["refined"]["frames"] <= 0.2 * a["frames"] + 1
    assert cpu_budget["refined"]["frames"] >= frames_budget["refined"]["frames"]
    assert cpu_budget["doubtful_chi2_median_best"] < cpu_budget["doubtful_chi2_median_nn"]
    assert r["adaptation"]["frames_out"] == r["adaptation"]["frames"]
    assert "Trust" in (tmp_path / "bench.md").read_text()
