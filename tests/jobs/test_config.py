import pytest

from jobs.cli import BENCHMARKS, COMMANDS, main
from jobs.config import CONFIGS, ConfigError, load_config

SHIPPED = sorted(CONFIGS.glob("*.yaml"))
DEMO = CONFIGS / "demo-pretrain.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate_and_say_what_they_are(path):
    finetune = "init:" in path.read_text()  # needs the checkpoint given on the command line
    if finetune:
        with pytest.raises(ConfigError, match="init.checkpoint"):
            load_config(path)
    cfg = load_config(path, ["init.checkpoint=runs/pretrained"] if finetune else [])
    assert cfg.micro_batch >= 1
    assert path.read_text().startswith("#"), "each config opens with its purpose and cost"


def test_set_overrides_are_typed():
    cfg = load_config(DEMO, ["train.max_steps=7", "data.image_size=32", "run.name=x"])
    assert cfg.train.max_steps == 7 and cfg.data.size_hw == (32, 32) and cfg.run.name == "x"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=0.1", "train.lrr: Extra inputs are not permitted"),
        ("train.lr=fast", "train.lr"),
        ("data.image_size=18", "not a multiple of (the )?patch.size 4"),
        ("train.batch_size=127", "not divisible by scaling.num_workers"),
        ("model.preset=xl/16", "unknown preset"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


TUNE = CONFIGS / "demo-tune.yaml"


@pytest.mark.parametrize(
    "override,message",
    [
        ("tune.grace_period=11", "tune.grace_period 11 is above train.epochs 10"),
        ("tune.space={train.lrr: {uniform: [0.1, 0.2]}}", "train.lrr is not a config key"),
        ("tune.space={data.image_size.h: {choice: [16]}}", "data.image_size.h is not a config"),
        ("tune.space={train.lr: {loguniform: [0, 0.1]}}", "loguniform needs low > 0"),
        ("tune.space={train.lr: {uniform: [0.2, 0.1]}}", "low < high"),
    ],
)
def test_bad_searches_name_the_key_before_ray_starts(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TUNE, ["init.checkpoint=runs/x", "train.epochs=10", override])


def test_a_peak_search_on_a_val_sample_is_refused():
    """Peak compares every epoch's score; with data.val_subset all but the last score a
    sample, so a lucky sample could be registered."""
    with pytest.raises(ConfigError, match="use tune.select: final"):
        load_config(TUNE, ["init.checkpoint=runs/x", "tune.select=peak", "data.val_subset=60"])
    load_config(TUNE, ["init.checkpoint=runs/x", "tune.select=final", "data.val_subset=60"])


def test_search_space_keys_reach_into_optional_sections_and_free_dicts():
    space = (
        "tune.space={data.randaugment.magnitude: {randint: [1, 9]}, "
        "model.overrides.drop_path: {uniform: [0.0, 0.2]}}"
    )
    cfg = load_config(TUNE, ["init.checkpoint=runs/x", space])
    assert set(cfg.tune.space) == {"data.randaugment.magnitude", "model.overrides.drop_path"}


def test_cli_exits_2_before_ray_starts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(DEMO), "--set", "train.epochs=0"])
    assert exit_info.value.code == 2
    assert "train.epochs" in capsys.readouterr().err


def test_smoke_shrinks_the_run():
    cfg = load_config(DEMO, ["smoke=true"])
    assert 0 < cfg.train.max_steps <= 20


@pytest.mark.parametrize(
    "argv", [[name] for name in COMMANDS] + [["bench", name] for name in BENCHMARKS], ids=str
)
def test_every_command_explains_itself(argv, capsys):
    """`vitray COMMAND --help` imports the command's module and lists its options."""
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    assert f"usage: vitray {' '.join(argv)}" in capsys.readouterr().out


def test_passwords_in_uris_never_reach_what_is_printed_or_logged():
    from jobs.config import shown
    from jobs.secrets import redact

    uri = "http://alice:s3cr%2Ft@mlflow.example:5000"
    cfg = load_config(DEMO, [f"mlflow.tracking_uri={uri}", "data.dataset=s3://k:v@bucket/x"])
    assert redact(f"server {uri} is down") == "server http://alice:***@mlflow.example:5000 is down"
    assert redact("http://mlflow.example:5000/path") == "http://mlflow.example:5000/path"
    text = str(shown(cfg))
    assert "s3cr" not in text and ":v@" not in text and "alice:***@" in text
    assert cfg.mlflow.tracking_uri == uri  # the job itself still has it
