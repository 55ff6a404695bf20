"""Checkpoint staging directories: a killed worker's are removed by the next worker to start
on the node; those of live processes never are."""

from __future__ import annotations

import os
import tempfile

from jobs.training.staging import remove_orphans, staging_dir

from helpers import ended_pid


def test_only_the_staging_directories_of_ended_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = staging_dir()
    assert mine.parent == tmp_path and mine.name.startswith(f"vitray-checkpoint-{os.getpid()}-")
    (mine / "model.safetensors").write_bytes(b"weights")
    dead = tmp_path / f"vitray-checkpoint-{ended_pid()}-a1b2"
    (dead / "checkpoint").mkdir(parents=True)
    (dead / "checkpoint" / "train_state.pt").write_bytes(b"state")
    parent = tmp_path / f"vitray-checkpoint-{os.getppid()}-c3d4"  # alive: the test runner
    parent.mkdir()
    others = [tmp_path / "vitray-checkpoint-x9y8", tmp_path / "other-123-dir"]
    for path in others:
        path.mkdir()

    assert remove_orphans() == [dead]
    assert not dead.exists()
    assert (mine / "model.safetensors").exists() and parent.exists()
    assert all(path.exists() for path in others)
