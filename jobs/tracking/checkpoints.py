"""Checkpoint references: anything a user may point `init.checkpoint` at, made local.

A vitray checkpoint directory; an MLflow URI (`runs:/<id>/checkpoint/best`,
`models:/<name>/<version>`, `models:/<name>@<alias>`, a logged model or its run path);
or foreign weights as `FORMAT:PATH` (timm, hf, torchvision, jax), converted on the way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vit import ViT, load_checkpoint
from vit.checkpoint import CONFIG_FILE, WEIGHTS_FILE

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
FOREIGN_FORMATS = ("timm", "hf", "torchvision", "jax")


def find_checkpoint_dir(root: Path) -> Path:
    """The vitray checkpoint inside a downloaded tree (an MLflow model keeps it under
    artifacts/checkpoint)."""
    for config in sorted(root.rglob(CONFIG_FILE), key=lambda p: len(p.parts)):
        if (config.parent / WEIGHTS_FILE).is_file():
            return config.parent
    raise FileNotFoundError(f"no vitray checkpoint ({WEIGHTS_FILE} + {CONFIG_FILE}) in {root}")


def fetch_checkpoint(ref: str, tracking_uri: str | None, workdir: str) -> Path:
    """A local vitray checkpoint directory for `ref`, downloading or converting into
    `workdir` as needed (a local checkpoint directory is used where it is)."""
    if ref.startswith(MLFLOW_SCHEMES):
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=ref, dst_path=workdir, tracking_uri=tracking_uri
        )
        return find_checkpoint_dir(Path(local))
    fmt, sep, path = ref.partition(":")
    if sep and fmt in FOREIGN_FORMATS:
        from vit.convert import import_weights

        out = Path(workdir) / "converted"
        import_weights(fmt, Path(path), out)
        return out
    directory = Path(ref)
    if not (directory / CONFIG_FILE).is_file():
        found = (
            f"{directory} holds no {CONFIG_FILE}"
            if directory.is_dir()
            else f"no such directory: {directory}"
        )
        raise FileNotFoundError(
            f"checkpoint {ref!r}: {found}; give a vitray checkpoint directory "
            f"({WEIGHTS_FILE} + {CONFIG_FILE}), an MLflow URI ({', '.join(MLFLOW_SCHEMES)}) "
            f"or FORMAT:PATH with FORMAT in {', '.join(FOREIGN_FORMATS)}"
        )
    return directory


@contextmanager
def local_checkpoint(ref: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """`fetch_checkpoint` into a temporary directory that is removed on exit: a download or
    a conversion (a ViT-B/16 is 350 MB) is not left behind in /tmp by every command."""
    with tempfile.TemporaryDirectory(prefix="vitray-checkpoint-") as workdir:
        yield fetch_checkpoint(ref, tracking_uri, workdir)


def load_any(ref: str, tracking_uri: str | None = None, **kwargs) -> ViT:
    """`load_checkpoint` for any reference: `load_any("models:/digits@champion")`."""
    with local_checkpoint(ref, tracking_uri) as directory:
        return load_checkpoint(directory, **kwargs)
