"""The frictions a new user hit (issue 23): each one that can regress, pinned here.

The layer's backward mode is ``deq.backward`` (``backward_mode`` stays an alias), and its
signature shows the real defaults rather than None.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import phantomgrad as pg
from conftest import TanhLayer


def test_the_backward_mode_is_deq_backward_and_backward_mode_is_an_alias():
    mode = pg.NPG(k=3, damping=0.5)
    deq = pg.DEQ(TanhLayer(), backward=mode)
    assert deq.backward is mode and deq.backward_mode is mode
    other = pg.JFB()
    deq.backward_mode = other  # the old name still sets it (swap.py, the bench and users' code do)
    assert deq.backward is other
    deq.backward = mode
    assert deq.backward_mode is mode
    assert "backward=NPG(" in repr(deq)
    assert copy.deepcopy(deq).backward is not mode  # a plain attribute: deep-copied with the layer


def test_settings_changed_after_construction_are_checked_like_the_constructors():
    """The trainer configures layers through their public attributes (issue 24: it set layer.fallback past the
    layer's checks); a bad value is refused with the constructor's one-line error."""
    deq = pg.DEQ(TanhLayer())
    deq.fallback = pg.FixedPoint(damping=0.5)
    deq.warn_not_converged = False
    assert isinstance(deq.fallback, pg.FixedPoint) and deq.warn_not_converged is False
    with pytest.raises(TypeError, match="fallback must be a phantomgrad solver"):
        deq.fallback = "fixed_point"
    with pytest.raises((TypeError, ValueError), match="warn_not_converged"):
        deq.warn_not_converged = "no"
    with pytest.raises(TypeError, match="fallback must be a phantomgrad solver"):
        pg.DEQ(TanhLayer(), fallback="fixed_point")


def test_the_signature_shows_the_real_defaults_and_layers_do_not_share_them():
    params = inspect.signature(pg.DEQ).parameters
    assert repr(params["solver"].default).startswith("Anderson(") and "max_iter=30" in repr(params["solver"].default)
    assert repr(params["backward"].default) == repr(pg.UPG(k=5, damping=0.5))
    a, b = pg.DEQ(TanhLayer()), pg.DEQ(TanhLayer(), solver=None, backward=None)  # None still means the default
    assert repr(a.solver) == repr(b.solver) == repr(params["solver"].default)
    assert a.solver is not b.solver and a.solver is not params["solver"].default
    a.solver.max_iter = 3  # mutating one layer's solver leaves the others and the default alone
    assert b.solver.max_iter == 30 and params["solver"].default.max_iter == 30
    assert a.backward is not params["backward"].default


def test_the_layer_still_solves_with_its_defaults():
    x = torch.randn(3, 4, dtype=torch.float64)
    z, info = pg.DEQ(TanhLayer())(x, torch.zeros(3, 6, dtype=torch.float64))
    assert z.shape == (3, 6) and bool(info.converged.all())


def _tiny_run(tmp_path, name, *extra):
    from conftest import tiny_overrides
    from phantomgrad.train.config import TrainConfig
    from phantomgrad.train.trainer import train

    overrides = [o for o in tiny_overrides(train_subset=64) if not o.startswith("progress=")]
    cfg = TrainConfig.from_sources(None, [*overrides, "epochs=1", f"out_dir={tmp_path / name}", *extra])
    return train(cfg)


def test_under_phantomgrad_train_the_warnings_name_cli_keys_and_a_key_silences_them(tmp_path, caplog, capsys):
    """The layer's not-converged advice speaks the CLI's syntax under the trainer (issue 25 item 4), and
    progress=auto (the default) draws no bar when stderr is not a terminal (here: pytest's capture)."""
    caplog.set_level("WARNING", logger="phantomgrad.deq")
    _tiny_run(tmp_path, "loud", "solver_max_iter=1", "solver_tol=1e-9")
    texts = [r.getMessage() for r in caplog.records if r.name == "phantomgrad.deq"]
    assert texts and all("solver_max_iter=" in t and "jac_reg_weight=" in t for t in texts)
    assert all("warn_not_converged=false silences this" in t and "pg." not in t for t in texts)
    assert "epoch 1/1" not in capsys.readouterr().err  # progress=auto: no bar off a terminal
    caplog.clear()
    _tiny_run(tmp_path, "quiet", "solver_max_iter=1", "solver_tol=1e-9", "warn_not_converged=false")
    assert not [r for r in caplog.records if r.name == "phantomgrad.deq"]


def test_progress_true_still_draws_the_bar_off_a_terminal(tmp_path, capsys):
    _tiny_run(tmp_path, "bar", "progress=true")
    assert "epoch 1/1" in capsys.readouterr().err


def test_under_phantomgrad_train_implicits_backward_warning_names_cli_keys(tmp_path, caplog):
    caplog.set_level("WARNING", logger="phantomgrad.backward")
    _tiny_run(tmp_path, "implicit", "backward=implicit", "backward_max_iter=1", "backward_tol=1e-9")
    texts = [r.getMessage() for r in caplog.records if r.name == "phantomgrad.backward"]
    assert texts and all("backward_max_iter=" in t and "backward_options.fallback=upg" in t for t in texts)
    assert not any("pg." in t.split("exact.")[-1] for t in texts)  # the advice has no Python syntax


def test_a_linear_only_solver_is_refused_as_the_forward_solver():
    """GMRES solves Implicit's linear backward system; as a DEQ's forward solver it would quietly solve the
    linearisation at z0, so the layer refuses it with one line that says where it belongs."""
    with pytest.raises(ValueError, match=r"linear systems only .*pg.Implicit\(solver=pg.GMRES"):
        pg.DEQ(TanhLayer(), solver=pg.GMRES())
    pg.DEQ(TanhLayer(), backward=pg.Implicit(solver=pg.GMRES()))  # where it belongs
