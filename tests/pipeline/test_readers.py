"""Planning from metadata: a prepared dataset's manifest, row groups grouped into tasks,
seeded samples of units. Real shards of real digits, no Ray."""

import json

import pyarrow.parquet as pq
import pytest

from pipeline.prepare import prepare
from pipeline.readers import open_source, plan_tasks, plan_units, sample_units


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """builtin:digits in shards of ~4 KB: about 40 train shards of one row group each."""
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("builtin:digits", out, shard_size="4kb", progress=False)
    return out


@pytest.fixture
def footer_reads(monkeypatch) -> list[object]:
    """Every Parquet file opened, by any route (pq.read_metadata opens a ParquetFile too)."""
    opened: list[object] = []
    init = pq.ParquetFile.__init__

    def counted(self, source, *args, **kwargs):
        opened.append(source)
        init(self, source, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", counted)
    return opened


def test_a_prepared_dataset_plans_from_its_manifest_without_opening_a_shard(
    small_shards, footer_reads
):
    manifest = json.loads((small_shards / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 20
    assert all(sum(s["row_group_rows"]) == s["rows"] for s in shards)
    assert all(len(s["row_group_bytes"]) == s["row_groups"] for s in shards)

    source = open_source(str(small_shards))
    units = plan_units(source, source.split_files("train"))
    assert footer_reads == []
    assert [u["rows"] for u in units] == [n for s in shards for n in s["row_group_rows"]]
    assert [u["bytes"] for u in units] == [b for s in shards for b in s["row_group_bytes"]]


def test_a_manifest_without_row_group_sizes_is_still_read_from_the_footers(
    tmp_path, small_shards, footer_reads
):
    """Manifests written before they recorded row groups' sizes plan as before, from every
    footer (read in parallel)."""
    old = tmp_path / "old"
    old.mkdir()
    for f in small_shards.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["row_group_rows"], shard["row_group_bytes"]
    (old / "manifest.json").write_text(json.dumps(manifest))

    source = open_source(str(old))
    units = plan_units(source, source.split_files("train"))
    shards = len(source.split_files("all"))
    assert len(footer_reads) == shards
    new = open_source(str(small_shards))
    assert units == [
        {**u, "path": u["path"].replace(str(small_shards), str(old))}
        for u in plan_units(new, new.split_files("train"))
    ]


def test_tasks_group_consecutive_row_groups_up_to_the_byte_target(small_shards):
    source = open_source(str(small_shards))
    units = plan_units(source, source.split_files("train"))
    target = 5 * max(u["bytes"] for u in units)
    tasks = plan_tasks(units, target)
    assert [u for task in tasks for u in task] == units  # each unit once, in order
    assert all(sum(u["bytes"] for u in task) <= target for task in tasks)
    assert len(tasks) <= len(units) // 4  # several row groups per task
    # a task closes only when its next unit would not fit
    for task, after in zip(tasks, tasks[1:], strict=False):
        assert sum(u["bytes"] for u in task) + after[0]["bytes"] > target
    assert plan_tasks(units, 1) == [[u] for u in units]  # a unit over the target: alone


def test_a_sample_of_units_has_the_rows_asked_and_depends_on_its_seed_only(small_shards):
    source = open_source(str(small_shards))
    units = plan_units(source, source.split_files("train"))
    sample = sample_units(units, 300, seed=0)
    assert sum(u["rows"] for u in sample) == 300
    assert sample == sample_units(units, 300, seed=0)
    assert sample != sample_units(units, 300, seed=1)
    assert len({u["path"] for u in sample}) > 1  # from across the split, not its first shard
    assert sum(u["rows"] for u in sample_units(units, 10**6, seed=0)) == 1257  # all there is
