"""The end-of-run summary printed by ``phantomgrad train`` leads with the task's headline metric:
accuracy for images, perplexity and bits per character for language models; never "n/a"."""

import json
import math
import re

from phantomgrad.cli import main


def _value(printed: str, label: str) -> float:
    match = re.search(rf"^{re.escape(label)}\s+(\S+)$", printed, flags=re.M)
    assert match, printed
    return float(match.group(1))


def test_image_run_prints_its_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "arch.channels=[8,8]",
                "arch.head_channels=[4,8]",
                "arch.final_channels=32",
                "solver_max_iter=4",
                "batch_size=128",
                "epochs=1",
                "progress=false",
                "threads=2",
                "data_options={train_subset: 256, test_subset: 128}",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "n/a" not in printed
    accuracy = _value(printed, "test accuracy (final epoch)")
    assert 0 <= accuracy <= 1
    assert accuracy == json.loads((out / "summary.json").read_text())["final_metrics"]["test_accuracy"].__round__(4)


def test_language_model_run_prints_perplexity_and_bits_per_character(tmp_path, capsys):
    words = (
        "and god said let there be light and there was light and god saw the light that it was good "
        "in the beginning god created the heaven and the earth"
    ).split()
    lines = [" ".join(words[i % 20 : i % 20 + 10]) for i in range(300)]
    (tmp_path / "bible-kjv.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "task=lm",
                "dataset=bible",
                f"data_dir={tmp_path}",
                "model=deq-transformer-tiny",
                "data_options={seq_len: 16, train_tokens: 1025, eval_tokens: 257}",
                "batch_size=16",
                "epochs=1",
                "solver_max_iter=4",
                "progress=false",
                "threads=2",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "n/a" not in printed and "accuracy" not in printed
    ppl = _value(printed, "test perplexity (final epoch)")
    bpc = _value(printed, "test bits per character (final epoch)")
    assert ppl > 1 and math.isclose(bpc, math.log2(ppl), rel_tol=1e-2)
