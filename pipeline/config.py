"""DataConfig: what to read and how to turn it into patches (validated before Ray starts)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.decode import MAX_PIXELS
from vit.config import DEFAULT_EVAL, Preprocessing

Filter = Literal["bilinear", "bicubic", "nearest"]  # the resize filters torch has for uint8


class RandAugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_ops: int = Field(2, ge=1)
    magnitude: int = Field(9, ge=0, le=30)


class DataConfig(BaseModel):
    """The `data` section of every job config."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="builtin:digits, builtin:fashion-mnist, builtin:photos?n=N, a `vitray "
        "prepare` output directory (local, s3:// or gs://), Hugging Face image Parquet, a "
        "`datasets` save_to_disk directory, WebDataset .tar shards, MNIST-format IDX files, "
        "an image folder (class folders, or split folders of class folders) or a Hugging "
        "Face imagefolder with metadata; see docs/data.md"
    )
    # where the images and labels are (None: detected, see pipeline.readers)
    image_column: str | None = Field(
        None,
        description="Parquet: the image column (default: the Image feature, else `image`); "
        "WebDataset: the image extension (default: any image extension)",
    )
    label_column: str | None = Field(
        None,
        description="Parquet: the label column (default: the ClassLabel feature, else `label`); "
        "WebDataset: the label extension (default: the one of cls, cls2, index, inx, id, or "
        "json with label_field, that the first sample has)",
    )
    label_field: str | None = Field(None, description="WebDataset: the label's key in its json")
    image_size: int | tuple[int, int] = 224
    channels: Literal[1, 3] = 3
    # training augmentation (Inception-style crop + flip; RandAugment optional)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment: RandAugmentConfig | None = None
    # Resize and evaluation crop. None: a fine-tune takes its weights' own (their
    # config.json's `preprocessing`), anything else the defaults in `eval_transform`.
    interpolation: Filter | None = Field(
        None, description="the resize filter (antialiased); default bilinear"
    )
    eval_crop_fraction: float | None = Field(
        None, gt=0, le=1, description="evaluation: the crop's share of the resized image (0.875)"
    )
    eval_crop_mode: Literal["center", "squash"] | None = Field(
        None,
        description="evaluation: center (resize the shorter side, keep the aspect ratio; timm, "
        "torchvision) or squash (resize both sides; Hugging Face); default center",
    )
    # streaming
    shuffle_buffer: int = Field(1000, ge=0, description="local shuffle buffer, in rows")
    cpus_per_task: float = Field(1.0, gt=0, description="CPU fraction of each decode task")
    # Rows per block that a decode task streams out (blocks stay under Ray's 128 MB). Small
    # blocks reach a consumer sooner, but Ray Train splits them per worker at a cost: 64-row
    # blocks made 2-worker digits epochs 2.0-2.5 s instead of 1.7 (one 1,257-row block).
    decode_batch_size: int = Field(2048, ge=1, description="rows per output block of a decode task")
    task_bytes: int = Field(
        64 * 2**20,
        gt=0,
        description="Parquet bytes (compressed) one decode task reads, row group by row group; "
        "a small split gets smaller tasks, two per decode slot of the cluster",
    )
    val_subset: int | None = Field(
        None,
        ge=1,
        description="rows of the val split evaluated during training: the same seeded sample "
        "of row groups at every evaluation; the whole split at the end (None: always whole)",
    )
    # a val split where the source has none (Hub datasets: train and test only)
    val_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="carve this share of train as val where the source has no val split: "
        "whole read units (image files one by one) in a seeded order, the same on every run",
    )
    val_split: str | None = Field(
        None, description="validate on this split of the source instead (warns when it is test)"
    )
    val_seed: int = Field(0, description="the seed of data.val_fraction's choice")
    # bad input
    strict: bool = False
    max_pixels: int = Field(MAX_PIXELS, gt=0)

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sizes = (v, v) if isinstance(v, int) else v
        if min(sizes) < 1:
            raise ValueError("image_size must be positive")
        return v

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected 0 < low <= high, got {v}")
        return v

    @model_validator(mode="after")
    def _one_val_source(self) -> DataConfig:
        if self.val_fraction is not None and self.val_split is not None:
            raise ValueError("set data.val_fraction or data.val_split, not both")
        return self

    @property
    def eval_transform(self) -> tuple[str, float, str]:
        """(interpolation, eval crop fraction, eval crop mode) in force."""
        return (
            self.interpolation or DEFAULT_EVAL.interpolation,
            self.eval_crop_fraction or DEFAULT_EVAL.crop_fraction,
            self.eval_crop_mode or DEFAULT_EVAL.crop_mode,
        )

    @property
    def size_hw(self) -> tuple[int, int]:
        return (
            (self.image_size, self.image_size)
            if isinstance(self.image_size, int)
            else tuple(self.image_size)
        )

    @classmethod
    def for_checkpoint(cls, dataset: str, meta: dict[str, Any], **settings: Any) -> DataConfig:
        """The eval-side data config that feeds a checkpoint (`meta`: its config.json): its
        image size, channels, resize and crop, unless `settings` (not None) say otherwise."""
        model = meta["model"]
        return cls(
            dataset=dataset,
            image_size=tuple(model["image_size"]),
            channels=model["in_chans"],
            **{key: value for key, value in settings.items() if value is not None},
        ).with_preprocessing(meta.get("preprocessing"))

    def with_preprocessing(self, preprocessing: dict[str, Any] | None) -> DataConfig:
        """The resize and crop that weights declare (config.json's `preprocessing`: filter,
        crop fraction, crop mode), for those this config leaves unset."""
        if not preprocessing:
            return self
        p = Preprocessing.from_dict(preprocessing)  # checked: filter, fraction, mode
        declared = {
            "interpolation": p.interpolation,
            "eval_crop_fraction": p.crop_fraction,
            "eval_crop_mode": p.crop_mode,
        }
        if self.interpolation is None and declared["interpolation"] not in get_args(Filter):
            raise ValueError(
                f"the weights were evaluated with {declared['interpolation']} resizing, which "
                "vitray does not have: set data.interpolation (bilinear, bicubic or nearest)"
            )
        unset = {k: v for k, v in declared.items() if getattr(self, k) is None}
        return self.model_validate({**self.model_dump(), **unset})
