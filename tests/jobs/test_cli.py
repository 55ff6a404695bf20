"""The command line: a path that does not exist is a usage error (exit 2) that names it."""

import pytest

from jobs.cli import main
from jobs.config import CONFIGS

MISSING = "/nonexistent/vitray-input"


@pytest.mark.parametrize(
    "argv",
    [
        ["info", MISSING],
        ["convert", "--from", "timm", MISSING, "OUT"],
        ["convert", "--to", "timm", MISSING, "OUT"],
        ["prepare", MISSING, "OUT"],
        ["visualize", MISSING],
        ["evaluate", MISSING, "--data", "builtin:digits"],
        ["predict", MISSING, "--input", "builtin:digits", "--output", "OUT"],
        ["pretrain", "--config", MISSING],
        ["pretrain", "--config", str(CONFIGS / "demo-pretrain.yaml"),
         "--set", f"data.dataset={MISSING}", "--set", "mlflow.enabled=false"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)  # fmt: skip
def test_a_missing_path_exits_2_naming_it(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert MISSING in capsys.readouterr().err
