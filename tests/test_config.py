import pytest

from phantomgrad.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from phantomgrad.train.config import ConfigError, TrainConfig


def test_defaults_are_valid_and_train_upg_5_05_on_digits():
    cfg = TrainConfig()
    assert (cfg.dataset, cfg.model, cfg.backward, cfg.k, cfg.damping) == ("digits", "mdeq-tiny", "upg", 5, 0.5)


def test_file_then_overrides(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 3\nbackward: npg\nlr: 0.01\n")
    cfg = TrainConfig.from_sources(yaml_file, ["epochs=5", "damping=0.8", "data_dir=null", "solver_tol=1e-5"])
    assert (cfg.epochs, cfg.backward, cfg.lr, cfg.damping, cfg.data_dir, cfg.solver_tol) == (
        5,
        "npg",
        0.01,
        0.8,
        None,
        1e-5,
    )
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('epochs = 2\noptimizer = "sgd"\nlr = 1\n')
    cfg = TrainConfig.from_sources(toml_file)
    assert (cfg.epochs, cfg.optimizer, cfg.lr) == (2, "sgd", 1.0)
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize(
    "override, match",
    [
        ("epoch=3", "unknown config key 'epoch'; did you mean 'epochs'"),
        ("bakward=upg", "did you mean 'backward'"),
        ("epochs=three", "epochs must be int"),
        ("epochs=2.5", "epochs must be int"),
        ("k=0", "k must be >= 1"),
        ("damping=1.5", r"damping must be in \(0, 1\]"),
        ("damping=0", "damping"),
        ("lr=-0.1", "lr must be > 0"),
        ("lr=fast", "lr must be float"),
        ("backward=upgg", "did you mean 'upg'"),
        ("solver=newton", "solver must be one of"),
        ("progress=maybe", "progress must be true, false or auto"),
        ("backward=shine", "backward=shine does not work with solver=anderson; use solver=broyden"),
        ("arch.pretrain_depth=3", "arch.pretrain_depth=3 is not used by task=image: no code reads it"),
        ("epochs", "key=value"),
    ],
)
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_sources(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_sources(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        TrainConfig.from_sources(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_sources(listy)
    wrong_suffix = tmp_path / "cfg.json"
    wrong_suffix.write_text("{}")
    with pytest.raises(ConfigError, match="yaml"):
        TrainConfig.from_sources(wrong_suffix)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 3, "values": [1, 2]})
    assert load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck.pt.json"]  # no temporary file left behind
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_metrics_csv_takes_columns_that_appear_later(tmp_path):
    import csv

    from phantomgrad.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    writer.write({"epoch": 1, "train_loss": 1.0})
    writer.write({"epoch": 2, "train_loss": 0.9, "test_accuracy": 0.5})
    writer.write({"epoch": 3, "train_loss": 0.8})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["test_accuracy"] for r in rows] == ["", "0.5", ""]
    writer.truncate_after(2)
    assert [r["epoch"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["1", "2"]


def test_a_new_backward_mode_is_one_class_and_one_registry_entry(monkeypatch, capsys):
    """Config validation, the builder and train --help pick a registered mode up, with the config
    keys it declares (``config_keys``)."""
    import phantomgrad as pg
    from phantomgrad.cli import main
    from phantomgrad.modes import BACKWARD_MODES
    from phantomgrad.train import builders

    class HalfStep(pg.JFB):
        config_keys = ("damping",)

        def __init__(self, damping: float = 1.0):
            super().__init__()
            self.damping = damping

    monkeypatch.setitem(BACKWARD_MODES, "halfstep", HalfStep)
    mode = builders.build_backward(TrainConfig.from_sources(None, ["backward=halfstep", "damping=0.25"]))
    assert isinstance(mode, HalfStep) and mode.damping == 0.25
    with pytest.raises(ConfigError, match="not used by backward=halfstep"):
        builders.build_backward(TrainConfig.from_sources(None, ["backward=halfstep", "backward_options={k: 3}"]))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "halfstep" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=inf", "lr must be > 0 and finite, got inf"),
        ("weight_decay=.nan", "weight_decay must be >= 0 and finite, got nan"),
        ("solver_tol=-1e-3", "solver_tol must be > 0"),
        ("backward_tol=.inf", "backward_tol must be > 0 and finite"),
        ("grad_clip=-1", "grad_clip must be > 0"),
        ("damping=.nan", "damping must be in (0, 1], got nan"),
        ("dropout=-0.1", "dropout must be in [0, 1)"),
        ("momentum=.inf", "momentum must be in [0, 1), got inf"),
        ("jac_reg_weight=inf", "jac_reg_weight must be >= 0 and finite"),
        ("max_bad_steps=0", "max_bad_steps must be >= 1"),
    ],
)
def test_non_finite_or_absurd_hyperparameters_are_refused_with_their_range(override, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_sources(None, [override])
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_every_registered_name_is_accepted():
    from phantomgrad.train import registry

    for task in registry.TASKS:
        for dataset in registry.datasets(task):
            for model in registry.models(task):
                TrainConfig(task=task, dataset=dataset, model=model)
    for mode in registry.backward_modes():
        TrainConfig(backward=mode, solver=registry.solvers_for_mode(mode)[0])
    for solver in registry.forward_solver_names():
        TrainConfig(solver=solver, backward_solver=solver, fallback_solver=solver)
    for solver in registry.solver_names():  # GMRES too: a backward solver only
        TrainConfig(backward="implicit", backward_solver=solver)
    with pytest.raises(ConfigError, match="solver must be one of"):
        TrainConfig(solver="gmres")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["pretrain_steps=3"], r"pretrain_steps=3 is not used by task=graph \(it applies to task=image or task=lm\)"),
        (["pretrain_depth=3"], "pretrain_depth=3 is not used by task=graph"),
        (["trajectory_weight=2"], r"trajectory_weight=2.0 is not used by task=graph \(it applies to task=image\)"),
        (["precision=bf16"], "precision=bf16 is not supported by task=graph: .*; leave precision at fp32"),
    ],
)
def test_keys_the_graph_task_does_not_act_on_are_refused_with_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig.from_sources(None, ["task=graph", "dataset=chains", *overrides])
    assert "\n" not in str(err.value)
    TrainConfig.from_sources(None, ["task=graph", "dataset=chains", "pretrain_depth=6"])  # the default is no error


def test_trajectory_weight_is_refused_on_the_language_model_task():
    with pytest.raises(ConfigError, match="trajectory_weight=0.5 is not used by task=lm"):
        TrainConfig.from_sources(None, ["task=lm", "dataset=bible", "trajectory_weight=0.5"])


def test_shine_with_broyden_is_accepted():
    assert TrainConfig.from_sources(None, ["backward=shine", "solver=broyden"]).solver == "broyden"
