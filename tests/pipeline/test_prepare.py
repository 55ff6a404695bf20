import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.decode import BadImage
from pipeline.prepare import parse_size, prepare
from pipeline.sources import SourceError

from helpers import encode, photo


def make_folder(root, awkward_images, per_class=6):
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(photo((120 + 10 * i, 100), seed=c))
            (root / cls / f"{i}.jpg").write_bytes(encode(img, "JPEG"))
    (root / "cat" / "broken.jpg").write_bytes(awkward_images["truncated_jpeg"][0])
    (root / "dog" / "notes.jpg").write_bytes(awkward_images["text_named_jpg"][0])
    (root / "dog" / "empty.jpg").write_bytes(b"")


def test_prepare_folder_writes_shards_manifest_and_lists_bad_files(tmp_path, awkward_images):
    make_folder(tmp_path / "src", awkward_images)
    manifest = prepare(str(tmp_path / "src"), tmp_path / "out", val_fraction=0.25, progress=False)
    assert manifest["class_names"] == ["cat", "dog"]
    rows = sum(s["rows"] for s in manifest["splits"].values())
    assert rows == 12 and manifest["splits"]["val"]["rows"] > 0
    assert sorted(s["id"] for s in manifest["skipped"]) == [
        "cat/broken.jpg",
        "dog/empty.jpg",
        "dog/notes.jpg",
    ]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    shard = manifest["splits"]["train"]["shards"][0]
    table = pq.read_table(tmp_path / "out" / shard["file"])
    assert table.column_names == ["id", "image", "label"] and len(table) == shard["rows"]
    original = (tmp_path / "src" / table["id"][0].as_py()).read_bytes()
    assert table["image"][0].as_py() == original  # bytes kept, never re-encoded
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_strict_prepare_fails_naming_the_file(tmp_path, awkward_images):
    make_folder(tmp_path / "src", awkward_images)
    with pytest.raises(BadImage, match="broken.jpg|notes.jpg|empty.jpg"):
        prepare(str(tmp_path / "src"), tmp_path / "out", strict=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_rerun_is_idempotent_and_refuses_to_mix(tmp_path, awkward_images):
    make_folder(tmp_path / "a", awkward_images)
    make_folder(tmp_path / "b", awkward_images, per_class=3)
    first = prepare(str(tmp_path / "a"), tmp_path / "out", progress=False)
    assert prepare(str(tmp_path / "a"), tmp_path / "out", progress=False) == first
    with pytest.raises(SourceError, match="refusing to mix"):
        prepare(str(tmp_path / "b"), tmp_path / "out", progress=False)
    replaced = prepare(str(tmp_path / "b"), tmp_path / "out", overwrite=True, progress=False)
    assert sum(s["rows"] for s in replaced["splits"].values()) == 6


def tree(root):
    """Every file under `root`, with its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_source_folder(tmp_path, awkward_images, capsys):
    """`vitray prepare SRC OUT --overwrite` with OUT a folder of images (or an earlier output
    someone added files to) refuses, exit 2, naming OUT, and leaves every file as it was."""
    make_folder(tmp_path / "photos", awkward_images, per_class=2)
    make_folder(tmp_path / "src", awkward_images, per_class=2)
    before = tree(tmp_path / "photos")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "src"), str(tmp_path / "photos"), "--overwrite"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'photos'} is not empty and not a vitray dataset" in err
    assert tree(tmp_path / "photos") == before

    prepare(str(tmp_path / "src"), tmp_path / "out", progress=False)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(
        SourceError, match=r"out holds files prepare did not write \(\['notes.txt'\]\)"
    ):
        prepare(str(tmp_path / "photos"), tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    written = prepare(str(tmp_path / "src"), tmp_path / "empty", overwrite=True, progress=False)
    assert (tmp_path / "empty" / "manifest.json").is_file() and written["num_classes"] == 2


def test_a_failed_overwrite_keeps_the_old_output_readable(tmp_path, awkward_images):
    """The new output replaces the old only once complete: a re-prepare that fails after
    writing some shards (strict, a broken image among many) leaves the old one as it was."""
    make_folder(tmp_path / "a", awkward_images, per_class=3)
    make_folder(tmp_path / "b", awkward_images, per_class=12)
    old = prepare(str(tmp_path / "a"), tmp_path / "out", progress=False)
    before = tree(tmp_path / "out")
    with pytest.raises(BadImage, match="broken.jpg|notes.jpg|empty.jpg"):
        prepare(
            str(tmp_path / "b"), tmp_path / "out", shard_size="1kb", strict=True,
            overwrite=True, progress=False,
        )  # fmt: skip
    assert tree(tmp_path / "out") == before
    rows = sum(len(pq.read_table(f)) for f in (tmp_path / "out").glob("*.parquet"))
    assert rows == sum(s["rows"] for s in old["splits"].values()) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no temp left

    new = prepare(str(tmp_path / "b"), tmp_path / "out", overwrite=True, progress=False)
    assert sum(s["rows"] for s in new["splits"].values()) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # old removed


def test_builtin_digits_has_fixed_stratified_splits(tmp_path):
    manifest = prepare("builtin:digits", tmp_path / "digits", progress=False)
    counts = {k: v["rows"] for k, v in manifest["splits"].items()}
    assert counts == {"train": 1257, "val": 180, "test": 360}
    test = pq.read_table(tmp_path / "digits" / manifest["splits"]["test"]["shards"][0]["file"])
    per_class = [test["label"].to_pylist().count(c) for c in range(10)]
    assert min(per_class) >= 35 and max(per_class) <= 37  # stratified: ~36 per digit
    assert manifest["skipped"] == []


def test_builtin_photos_are_realistic_jpegs(tmp_path):
    manifest = prepare("builtin:photos?n=24&seed=1", tmp_path / "p", progress=False)
    assert manifest["num_classes"] == 8
    shard = manifest["splits"]["train"]["shards"][0]["file"]
    data = pq.read_table(tmp_path / "p" / shard)["image"][0].as_py()
    assert data[:2] == b"\xff\xd8"
    size = Image.open(__import__("io").BytesIO(data)).size
    assert 256 <= size[0] <= 500


def test_parse_size_and_bad_specs():
    assert parse_size("256MB") == 256 * 2**20 and parse_size("1.5GB") == int(1.5 * 2**30)
    with pytest.raises(ValueError):
        parse_size("big")
    with pytest.raises(SourceError, match="unknown built-in"):
        prepare("builtin:imagenet", "/tmp/never", progress=False)
    with pytest.raises(SourceError, match="does not exist"):
        prepare("/no/such/dir", "/tmp/never", progress=False)


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    """Not a terminal (a file, CI, a Ray job's log): no carriage returns piling up."""
    prepare("builtin:digits", tmp_path / "digits")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "prepare builtin:digits: 1797/1797 images" in err.splitlines()[-2]
