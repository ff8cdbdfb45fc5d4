import pytest

from tierec.cli import main
from tierec.errors import ConfigError
from tierec.train.config import TrainConfig, make_config


def test_toml_and_yaml_files(tmp_path):
    (tmp_path / "a.toml").write_text('data = "d"\nbatch_size = 64\nbottom_mlp = [8, 4]\nlr = 1\n')
    cfg = make_config(str(tmp_path / "a.toml"), {})
    assert cfg.batch_size == 64 and cfg.bottom_mlp == [8, 4] and cfg.lr == 1.0
    (tmp_path / "b.yaml").write_text("data: d\nsparse_optimizer: adam\n")
    assert make_config(str(tmp_path / "b.yaml"), {"batch_size": 7}).batch_size == 7


def test_flags_override_file(tmp_path):
    (tmp_path / "a.toml").write_text('data = "d"\nbatch_size = 64\n')
    assert make_config(str(tmp_path / "a.toml"), {"batch_size": 8, "epochs": None}).batch_size == 8


@pytest.mark.parametrize("text,needle", [
    ('data = "d"\nbatchsize = 3\n', "unknown key 'batchsize'"),
    ('data = "d"\nbatch_size = "big"\n', "key 'batch_size': expected an integer"),
    ('data = "d"\nbottom_mlp = [1, "x"]\n', "bottom_mlp[1]"),
    ('data = "d"\nsparse_optimizer = "rmsprop"\n', "expected one of"),
    ('data = "d"\nbatch_size = 0\n', "batch_size must be > 0"),
    ('data = "d"\nshuffle = 1\n', "expected true or false"),
    ("data = [\n", "invalid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        make_config(str(p), {})
    assert needle in str(e.value)


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("data: d\nembedding_dims: 3\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'embedding_dims'" in err and "c.yaml" in err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "/nonexistent/ds"], "does not exist"),
    (["train"], "no data set given"),
    (["eval", "/nonexistent/run"], "no such checkpoint"),
])
def test_cli_errors_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_negative_sizes_rejected():
    with pytest.raises(ConfigError, match="embedding_dim must be > 0"):
        TrainConfig(data="d", embedding_dim=-1)


def test_ssd_row_align_must_be_a_power_of_two():
    assert TrainConfig(data="d", ssd_row_align=512).ssd_row_align == 512
    for bad in (300, -512, 8192):
        with pytest.raises(ConfigError, match="ssd_row_align must be 0"):
            TrainConfig(data="d", ssd_row_align=bad)
