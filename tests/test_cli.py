"""The command line: every registered command's module imports and builds its parser, and the
top-level help and a wrong command name give argparse's usual answers."""

import pytest

from phantomgrad.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_working_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert f"phantomgrad {name}" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_an_error_that_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as done:
        main(["trian"])
    assert done.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_train_help_lists_every_config_key_with_type_default_and_meaning(capsys):
    import dataclasses

    from phantomgrad.train.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    keyed = [line for line in out.splitlines() if line.startswith("  ") and " (" in line]
    lines = {line.split(" (", 1)[0].strip(): line for line in keyed}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in lines, f.name
        assert "default" in lines[f.name] and len(f.metadata["help"]) > 5
    assert "lr (float, default 0.003): learning rate" in out
    assert "solver (str, default anderson)" in out and "one of fixed_point, anderson, broyden" in out
    assert "exit codes:" in out and "3 training diverged" in out


def test_help_choices_come_from_the_registries(capsys):
    from phantomgrad.modes import BACKWARD_MODES
    from phantomgrad.solvers import SOLVERS
    from phantomgrad.train import registry

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    backward_line = next(line for line in out.splitlines() if line.startswith("  backward ("))
    assert all(name in backward_line for name in BACKWARD_MODES)
    solver_line = next(line for line in out.splitlines() if line.startswith("  solver ("))
    assert all(name in solver_line for name in registry.forward_solver_names())
    assert "gmres" not in solver_line
    backward_solver_line = next(line for line in out.splitlines() if line.startswith("  backward_solver ("))
    assert all(name in backward_solver_line for name in registry.solver_names())
    assert set(SOLVERS) - set(registry.solver_names()) == {"unrolled"}  # built from pretrain_depth, not solver=
    # GMRES solves Implicit's linear backward system: a backward_solver, never the forward solver=
    assert set(registry.solver_names()) - set(registry.forward_solver_names()) == {"gmres"}
    dataset_line = next(line for line in out.splitlines() if line.startswith("  dataset ("))
    assert all(name in dataset_line for task in registry.TASKS for name in registry.datasets(task))


def test_version(capsys):
    from phantomgrad import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"phantomgrad {__version__}"


def test_overrides_may_follow_an_option(monkeypatch):
    import phantomgrad.train.command as command

    seen = {}
    monkeypatch.setattr(command, "run", lambda args: seen.update(vars(args)) or 0)
    assert main(["train", "epochs=2", "--resume", "out_dir=x", "lr=0.1"]) == 0
    assert seen["overrides"] == ["epochs=2", "out_dir=x", "lr=0.1"] and seen["resume"]
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--bogus"])
