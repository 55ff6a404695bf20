"""`vitray visualize`, `evaluate` and `predict` on a pretrained digits checkpoint, with a
real local Ray and a real MLflow server. Slow: marked, still run in CI."""

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main

pytestmark = pytest.mark.slow


def test_visualize_writes_and_logs_the_papers_figures(
    pretrained, digits_dir, mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("vitray-visualize-test")
    run_id = client.create_run(experiment).info.run_id
    out = tmp_path / "figures"
    data = str(digits_dir / "digits")
    main(
        [
            "visualize",
            str(pretrained),
            "--data",
            data,
            "--out",
            str(out),
            "--mlflow-run",
            run_id,
            "--tracking-uri",
            mlflow_server,
        ]
    )
    names = {
        "patch_embedding_filters.png",
        "posemb_similarity.png",
        "attention_distance.png",
        "attention_rollout.png",
    }
    assert {p.name for p in out.iterdir()} == names
    for path in out.iterdir():
        assert Image.open(path).size[0] > 100
    logged = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert logged == {f"figures/{n}" for n in names}


def test_evaluate_logs_accuracy_per_class_and_confusion_matrix(
    pretrained, digits_dir, mlflow_server, capsys
):
    from mlflow import MlflowClient

    main(
        [
            "evaluate",
            str(pretrained),
            "--data",
            str(digits_dir / "digits"),
            "--split",
            "test",
            "--eval-crop-fraction",
            "1.0",
            "--tracking-uri",
            mlflow_server,
            "--experiment",
            "vitray-eval-test",
        ]
    )
    printed = capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("vitray-eval-test")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    assert metrics["test_images"] == 360 and 0.1 < metrics["test_top1"] <= metrics["test_top5"]
    per_class = [metrics[f"test_acc_class_{c}"] for c in "0123456789"]
    assert min(per_class) >= 0 and max(per_class) <= 1
    assert f"{metrics['test_top1']:.4f}" in printed
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/test_confusion_matrix.png" in artifacts


def test_predict_writes_topk_parquet_and_reports_bad_images(
    ray_local, pretrained, digits_dir, tmp_path, awkward_images
):
    folder = tmp_path / "images"
    for i, (name, (data, usable)) in enumerate(sorted(awkward_images.items())):
        target = folder / ("good" if usable else "bad")
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{i:02d}-{name}.png").write_bytes(data)
    for c in range(12):  # more class folders than the model has classes: still predicted
        (folder / f"extra{c:02d}").mkdir()
        (folder / f"extra{c:02d}" / "x.png").write_bytes(awkward_images["jpeg"][0])
    out = tmp_path / "predictions"
    main(
        [
            "predict",
            str(pretrained),
            "--input",
            str(folder),
            "--output",
            str(out),
            "--top-k",
            "3",
            "--cpus-per-task",
            "0.5",
        ]
    )
    table = pq.read_table(out).to_pandas()
    usable = sum(u for _, u in awkward_images.values())
    assert len(table) == len(awkward_images) + 12
    assert int(table["ok"].sum()) == usable + 12
    good = table[table["ok"]]
    assert all(len(labels) == 3 for labels in good["top_labels"])
    assert all(set(labels) <= set("0123456789") for labels in good["top_labels"])
    assert all(scores[0] >= scores[1] >= scores[2] for scores in good["top_scores"])
    assert set(table["id"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}

    flat = tmp_path / "unlabelled"  # images without class subfolders: predicted as they are
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.jpg").write_bytes(awkward_images["jpeg"][0])
    main(["predict", str(pretrained), "--input", str(flat), "--output", str(tmp_path / "p2"),
          "--cpus-per-task", "0.5"])  # fmt: skip
    table = pq.read_table(tmp_path / "p2").to_pandas()
    assert len(table) == 3 and table["ok"].all() and (table["label"] == -1).all()
