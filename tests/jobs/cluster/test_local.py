"""The local cluster's secrets: a fresh owner-only token at every `up`, never another's."""

import stat

from jobs.cluster.local import cluster_env, write_token


def test_every_up_writes_a_new_owner_only_token(tmp_path):
    write_token(tmp_path)
    first = (tmp_path / "auth_token").read_text()
    write_token(tmp_path)
    second = (tmp_path / "auth_token").read_text()
    assert len(second) == 64 and second != first
    assert stat.S_IMODE((tmp_path / "auth_token").stat().st_mode) == 0o600


def test_an_inherited_token_does_not_override_the_clusters(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    env = cluster_env(tmp_path)
    assert "RAY_AUTH_TOKEN" not in env
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path.resolve() / "auth_token")
