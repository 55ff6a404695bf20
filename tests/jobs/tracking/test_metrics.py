"""Rank 0's metrics sink against a real MLflow server that is stopped and started again on
the same port and store, as an operator's restart does."""

import threading
import time

from jobs.tracking.metrics import DROPPED_TAG, MlflowMetrics


def steps_logged(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def test_outages_mid_run_and_at_the_end_lose_no_kept_report(restartable_mlflow, capfd):
    """Stopped after step 1: each report returns in seconds (rank 0 holds its peers no
    longer), the outage is warned about once, the last 3 reports are kept and the older
    dropped and counted. After the restart the kept ones reach the run with the next report,
    and the tag counts the dropped values. Stopped again before the last reports: `close`
    retries with backoff until the server is back."""
    from mlflow import MlflowClient

    server = restartable_mlflow
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    sink = MlflowMetrics(server.uri, run_id, buffer_reports=3, retry_every_s=0)
    sink.log({"loss": 1.0, "lr": 0.1}, 1)

    server.stop()
    for step in range(2, 7):
        t0 = time.monotonic()
        sink.log({"loss": 1.0 / step, "lr": 0.1}, step)
        assert time.monotonic() - t0 < 15  # MLflow's defaults wait ~4 min per request
    err = capfd.readouterr().err
    assert err.count("is unreachable") == 1 and "training goes on" in err

    server.start()
    sink.log({"loss": 0.1, "lr": 0.1}, 7)
    assert steps_logged(client, run_id) == [1, 4, 5, 6, 7]
    assert client.get_run(run_id).data.tags[DROPPED_TAG] == "4"  # steps 2 and 3, 2 values each
    err = capfd.readouterr().err
    assert "is back after" in err and "4 reports sent" in err

    server.stop()
    sink.log({"loss": 0.05, "lr": 0.1}, 8)
    restart = threading.Thread(target=server.start)
    restart.start()
    sink.close()
    restart.join()
    assert steps_logged(client, run_id) == [1, 4, 5, 6, 7, 8]
    err = capfd.readouterr().err
    assert "sending the last metrics failed" in err
    assert "4 metric values of 2 reports were dropped" in err
