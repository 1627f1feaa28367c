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
    assert (cfg.epochs, cfg.backward, cfg.lr, cfg.damping, cfg.data_dir, cfg.solver_tol) == (5, "npg", 0.01, 0.8, None, 1e-5)
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
        ("progress=maybe", "progress must be bool"),
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
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
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
