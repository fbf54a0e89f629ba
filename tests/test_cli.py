import json
import os
import subprocess
import sys

import torch
import yaml

from fersearch.cli import main
from fersearch.run_files import RUN_FILES


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), "--threads", "2", *extra])


def test_train_writes_every_output(synthetic_dir, tmp_path, capsys):
    assert _train(synthetic_dir, tmp_path / "run", "--epochs", "2", "--set", "shift=0.1") == 0
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "seed10 test" in printed
    for name in RUN_FILES:
        assert (tmp_path / "run" / name).is_file(), name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"accuracy", "f1_macro", "f1_weighted"} <= set(metrics[split])
    assert len(metrics["history"]) == 2 and set(metrics["by_protocol"]) == {"ferplus8", "seed10"}
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["shift"] == 0.1 and config["epochs"] == 2 and config["lr"] == 0.01
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert saved["classes"][0] == "neutral" and "state_dict" in saved
    # A second run into the same folder must not clobber the first without --overwrite.
    assert _train(synthetic_dir, tmp_path / "run", "--epochs", "1") == 2
    assert "already holds" in capsys.readouterr().err


def test_resnet18_trains_one_epoch_on_cpu(synthetic_dir, tmp_path):
    assert _train(synthetic_dir, tmp_path / "r", "--model", "resnet18", "--epochs", "1", "--smoke",
                  "--set", "pretrained=false", "--set", "stem=small") == 0
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["model"] == "resnet18" and config["pretrained"] is False and config["stem"] == "small"
    saved = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert saved["state_dict"]["conv1.weight"].shape == (64, 1, 3, 3)  # the small stem, one channel
    assert saved["state_dict"]["fc.weight"].shape == (len(saved["classes"]), 512)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and 0 <= metrics["test"]["accuracy"] <= 1


def test_trains_one_epoch_on_real_ferplus_subset(real_subset, tmp_path):
    assert _train(real_subset, tmp_path / "real", "--epochs", "1", "--protocol", "seed10") == 0
    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 200 and 0.2 < metrics["test"]["accuracy"] <= 1.0


def test_missing_or_absent_data_offers_synthetic(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "o")]) == 2
    assert "--data synthetic" in capsys.readouterr().err
    assert _train(tmp_path / "nowhere", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_out_is_refused_before_training(synthetic_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _train(synthetic_dir, blocker / "out") == 2
    assert "cannot write to --out" in capsys.readouterr().err


def test_bad_data_via_cli_has_no_traceback(synthetic_copy, tmp_path):
    (synthetic_copy / "FER2013Valid" / "label.csv").unlink()
    env = {**os.environ, "FERSEARCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "fersearch", "train", "--data", str(synthetic_copy), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"fersearch: error: {synthetic_copy} is not a FERPlus folder: missing FER2013Valid/label.csv "
        "(expected Microsoft's layout, or fer2013.csv + fer2013new.csv)"
    )


def test_synthetic_and_prepare_commands(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "syn"), "--train", "30", "--valid", "10", "--test", "10"]) == 0
    assert (tmp_path / "syn" / "FER2013Train" / "label.csv").read_text().count("\n") == 30
    assert main(["prepare", "--fer2013", str(tmp_path / "x.csv"), "--ferplus", str(tmp_path / "y.csv"),
                 "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_shows_progress_within_an_epoch(capsys):
    """`fersearch train`: a line every few seconds inside an epoch (samples done, samples/s,
    time left), none at the epoch's end (the epoch's own line follows)."""
    from fersearch.cli import EpochProgress

    progress = EpochProgress(epoch=2, epochs=30, total=1000, every_s=0.0)
    progress.start -= 2.0  # two seconds into the epoch
    progress(250)
    progress(1000)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("  epoch 2/30: 250/1,000 samples, ")
    rate = float(lines[0].split(", ")[1].split()[0].replace(",", ""))
    assert 100 < rate <= 125 and lines[0].endswith("s left in the epoch")
