"""The seed tutorial (python -m curvgraph.examples.seed_tutorial) meets the issue's target."""

from __future__ import annotations

import json
import subprocess
import sys


def test_seed_tutorial_reaches_the_target(tmp_path):
    json_path, png_path = tmp_path / "history.json", tmp_path / "figure.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "curvgraph.examples.seed_tutorial",
            "--json",
            str(json_path),
            "--out",
            str(png_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Epoch [1/2], Iter. [1/16], Loss: ")
    assert any(line.startswith("Epoch [2/2], Iter. [16/16], Loss: ") for line in lines)
    history = json.loads(json_path.read_text())
    assert set(history) == {"train_epoch", "batch_loss", "batch_acc"}
    assert len(history["batch_loss"]) == 32 and history["train_epoch"][-1] == 2.0
    last_loss = sum(history["batch_loss"][16:]) / 16
    last_acc = sum(history["batch_acc"][16:]) / 16
    assert last_loss <= 0.40 and last_acc >= 0.89, (last_loss, last_acc)
    assert png_path.stat().st_size > 10_000  # the two-panel figure
