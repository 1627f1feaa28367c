"""The backward-solver comparison (python -m phantomgrad.experiments.bench.backward_solvers) at a tiny size."""

import json

from phantomgrad.experiments.bench.backward_solvers import backward_solver_names, main
from phantomgrad.solvers import SOLVERS


def test_every_backward_solver_gets_a_row(tmp_path, capsys):
    out = tmp_path / "backward.json"
    main(
        ["--model", "synthetic", "--batch", "3", "--max-iter", "40", "--train-steps", "2", "--repeats", "1"]
        + ["--json", str(out)]
    )
    result = json.loads(out.read_text())
    names = [r["solver"] for r in result["rows"]]
    assert names == backward_solver_names() and "gmres" in names and "reversible" not in names
    assert set(names) <= set(SOLVERS) and len(result["train_losses"]) == 2
    for row in result["rows"]:  # the untrained synthetic map is a contraction: every backward solve converges
        assert row["converged"] == 1.0 and 1 <= row["steps_to_tol"] <= 40 and row["rel_residual"] <= 1e-4
    assert "| gmres | 100% |" in capsys.readouterr().out
