"""CLIP zero-shot on the demo world: the prompt table, and the `zeroshot` sub-command's CSV + accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from captionlab.models import zeroshot as zs


@pytest.fixture(scope="module")
def demo_backend(demo_clip: Path):
    from captionlab.models.clip import load_clip

    return load_clip(demo_clip, device="cpu")


def test_prompt_table_on_demo_world(demo_world: Path, demo_backend) -> None:
    p1 = demo_world / "p1_data"
    result = zs.run_zero_shot(demo_backend, p1 / "val", p1 / "id2label.json", zs.TEMPLATES)
    table = result.table
    print("\n" + table.to_string())
    assert set(table["template"]) == {zs.template_name(t) for t in zs.TEMPLATES}
    assert table["accuracy"].notna().all() and (table["n"] == len(result.predictions)).all()
    assert list(table["accuracy"]) == sorted(table["accuracy"], reverse=True)
    assert table["accuracy"].iloc[0] >= 0.9, table.to_string()
    # the table's accuracy agrees with the per-image predictions
    best = result.best_template()
    assert (result.predictions[best] == result.predictions["label"]).mean() == pytest.approx(table["accuracy"].iloc[0])


def test_zeroshot_command(demo_world: Path, demo_clip: Path, demo_backend, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from captionlab.cli import main

    p1 = demo_world / "p1_data"
    out = tmp_path / "pred.csv"
    argv = ["zeroshot", "--images", str(p1 / "val"), "--labels", str(p1 / "id2label.json"), "--out", str(out),
            "--clip", str(demo_clip), "--template", "a photo of a {object}.", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    acc = zs.accuracy(out, p1 / "val")  # also checks the CSV covers exactly the folder's images
    assert f"accuracy {acc:.4f}" in printed
    assert out.read_text().splitlines()[0] == "filename,label"
    direct, _ = zs.classify(demo_backend, [zs.open_image(p1 / "val" / "0_0.png")],
                            [zs.load_id2label(p1 / "id2label.json")[i] for i in range(20)], "a photo of a {object}.")
    assert zs.read_predictions_csv(out)["0_0.png"] == int(direct[0])

    # user errors: one line naming the file, exit code 2, nothing written
    missing = tmp_path / "nope.json"
    assert main(argv[:3] + ["--labels", str(missing), "--out", str(tmp_path / "x.csv")] + argv[7:]) == 2
    assert f"{missing}: " in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
