"""Which checkpoint a training run logs as best and registers; an unreachable server fails
the run at its start."""

import pytest

from jobs.tracking.mlflow_tracker import best_checkpoint

from helpers import free_port, pretrain_config, tracked_fit

KEPT = [  # (checkpoint, metrics) as Ray keeps them: a lucky sample at step 10
    ("epoch-1", {"step": 10, "val_top1": 0.95}),
    ("epoch-2", {"step": 20, "val_top1": 0.90}),
    ("final", {"step": 30, "val_top1": 0.91}),
]


def test_the_best_score_wins_when_every_score_covers_the_whole_split():
    assert best_checkpoint(KEPT, by_score=True)[0] == "epoch-1"


def test_with_a_val_sample_the_final_checkpoint_wins_over_a_lucky_sample():
    """data.val_subset: only the last evaluation scores all of val."""
    assert best_checkpoint(KEPT, by_score=False)[0] == "final"
    assert best_checkpoint(list(reversed(KEPT)), by_score=False)[0] == "final"


def test_nothing_kept_is_nothing_to_log():
    assert best_checkpoint([], by_score=True) is None


def test_unreachable_tracking_server_fails_at_start(tmp_path):
    cfg = pretrain_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match="not reachable"):
        tracked_fit(cfg)
