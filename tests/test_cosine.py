import json

from phantomgrad.cli import main
from phantomgrad.experiments.cosine import CosineConfig, run_study


def test_cosine_rises_with_k_and_small_damping_slows_it():
    result = run_study(CosineConfig(dim=16, in_dim=8, batch=8, max_k=6, trials=2))
    assert min(result.implicit_vs_backprop) > 0.9999
    cos = {(r["mode"], r["damping"], r["k"]): r["cosine_mean"] for r in result.rows}
    for mode in ("UPG", "NPG"):
        for lam in (0.5, 0.8, 1.0):
            curve = [cos[(mode, lam, k)] for k in range(1, 7)]
            assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:])), (mode, lam, curve)
        assert cos[(mode, 0.5, 3)] < cos[(mode, 1.0, 3)]


def test_cosine_command_writes_csv_png_json(tmp_path, capsys):
    out = tmp_path / "cos"
    code = main(
        ["cosine", "--max-k", "3", "--trials", "1", "--dim", "8", "--out", str(out), "--json", str(tmp_path / "s.json")]
    )
    assert code == 0
    assert (out / "cosine.csv").read_text().count("\n") == 1 + 2 * 3 * 3
    assert (out / "cosine.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "s.json").read_text())
    assert len(summary["rows"]) == 18
    assert "exact gradient check" in capsys.readouterr().out


def test_cosine_command_rejects_bad_values(capsys):
    assert main(["cosine", "--lipschitz", "1.5"]) == 2
    assert "lipschitz" in capsys.readouterr().err
