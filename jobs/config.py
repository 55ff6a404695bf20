"""Job configs: YAML data with one typed schema, validated before Ray starts.

Every section forbids unknown keys; `--set section.key=value` overrides any key (values are
parsed as YAML); `smoke: true` shrinks the run to a minute on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from jobs.secrets import redact
from pipeline.config import DataConfig
from vit import ViTConfig

CONFIGS = Path(__file__).parent / "configs"  # the shipped YAML job configs


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    preset: str | None = Field(None, description="e.g. s/16; fine-tunes take init.checkpoint's")
    overrides: dict[str, Any] = Field(default_factory=dict, description="ViTConfig fields")


class InitSection(Section):
    """Where a fine-tune starts: its architecture and weights come from this checkpoint."""

    checkpoint: str | None = Field(
        None,
        description="a vitray checkpoint directory, runs:/<id>/<path>, models:/<name>/<version> "
        "or models:/<name>@<alias>, or timm:DIR, hf:DIR (with their config.json / "
        "preprocessor_config.json), torchvision:PATH[:WEIGHTS_ENUM], jax:PATH.npz",
    )
    interpolation: Literal["timm", "hf", "big_vision", "torchvision"] | None = Field(
        None,
        description="how the position embeddings are resized to the new grid; default: as "
        "the weights' source does (timm's for vitray's, HF's for its DINOv2)",
    )
    keep_head: bool = Field(False, description="keep the classifier (same classes only)")


class TrainSection(Section):
    batch_size: int = Field(128, ge=1, description="global batch, across workers")
    epochs: int = Field(10, ge=1)
    max_steps: int = Field(0, ge=0, description="cap on optimizer steps; 0 = epochs decide")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    layer_decay: float = Field(1.0, gt=0, le=1, description="lr x decay^(depth - layer); 1 = off")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="global norm; 0 = off")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="Beta alpha of mixup; 0 = off (DeiT: 0.8)")
    cutmix: float = Field(0.0, ge=0, description="Beta alpha of CutMix; 0 = off (DeiT: 1.0)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    compile: bool = False
    grad_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in the backward pass: less memory "
        "(l/16, h/14 at 384-518 px) for about a third more compute",
    )
    report_every: int = Field(20, ge=1, description="steps between reports to Ray and MLflow")
    seed: int = 0


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        0.5,
        description="auto: the largest size at which the nodes hold every worker and each "
        "keeps room for one decode task (under autoscaling: the largest node's CPUs, shared by "
        "the workers on it, one per GPU)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are laid out on nodes (SPREAD: one per node first)"
    )
    autoscaling: bool = Field(
        False,
        description="the cluster adds nodes on demand: start even when it cannot hold the "
        "job yet (otherwise a job that does not fit fails at once instead of waiting forever)",
    )


class RunSection(Section):
    name: str = "vitray"
    storage_path: str = "runs"
    max_failures: int = Field(2, ge=0)
    num_to_keep: int = Field(2, ge=1)
    ray_train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING",
        description="Ray Train's own console logs (INFO: every report of every rank, in full)",
    )


class MlflowSection(Section):
    enabled: bool = True
    experiment: str = "vitray"
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else ./mlflow.db
    register_as: str | None = Field(
        None,
        description="register the run's best checkpoint under this MLflow model name, with "
        "mlflow.alias: what a fine-tune's init.checkpoint models:/<name>@<alias> starts from",
    )
    alias: str = "champion"


DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


class TuneSection(Section):
    """`vitray tune`: a search over config keys; each trial is a full training run."""

    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="dotted config key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | "
        "{randint: [lo, hi]} | {choice: [...]} | {grid: [...]}",
    )
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1, description="samples (x each grid point)")
    max_concurrent: int = Field(2, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep the top 1/rf per rung")
    time_budget_s: float = Field(3600, gt=0, description="the whole search; then it stops")
    stall_timeout_s: float = Field(600, gt=0, description="a running trial silent this long")
    select: Literal["final", "peak"] = Field(
        "final",
        description="final: among the trials that trained longest, the best last metric and "
        "its final checkpoint; peak: the best metric any report reached (an early epoch "
        "picked on a small val split: optimistic)",
    )
    trial_decode_cpus: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="CPUs a single-worker trial keeps for its decode tasks (at least "
        "data.cpus_per_task). auto: one decode task on CPUs; on a GPU, the cores that feed "
        "one GPU training this model at 50%% MFU at the measured decode rate per core "
        "(jobs/training/mfu.py), capped by the largest GPU node's spare CPUs",
    )
    register_as: str | None = Field(None, description="MLflow registered model name")
    alias: str = "champion"

    @field_validator("space")
    @classmethod
    def _known_distributions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, dist in space.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: expected one of {DISTRIBUTIONS} as the only key")
            kind, args = next(iter(dist.items()))
            if not isinstance(args, list) or not args:
                raise ValueError(f"{key}: {kind} takes a list")
            if kind in ("loguniform", "uniform", "randint"):
                if len(args) != 2 or not args[0] < args[1] + (kind == "randint"):
                    raise ValueError(f"{key}: {kind} takes [low, high] with low < high")
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs low > 0")
        return space


class JobConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    init: InitSection = Field(default_factory=InitSection)
    data: DataConfig
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    smoke: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if not (self.model.preset or self.init.checkpoint):
            raise ValueError("set model.preset (pretraining) or init.checkpoint (fine-tuning)")
        if self.model.preset:
            self.check_patch(self.vit_config(num_classes=1).patch_size)  # raises on bad keys
        for key in self.tune.space:
            if not known_key(type(self), key):
                raise ValueError(f"tune.space: {key} is not a config key")
        if self.tune.scheduler == "asha" and self.tune.grace_period > self.train.epochs:
            raise ValueError(
                f"tune.grace_period {self.tune.grace_period} is above train.epochs "
                f"{self.train.epochs}: ASHA could never stop a trial early"
            )
        if self.tune.select == "peak" and self.data.val_subset:
            raise ValueError(
                "tune.select: peak compares every epoch's val_top1, and with data.val_subset "
                "all but the last are scored on a sample: use tune.select: final"
            )
        per_step = self.scaling.num_workers * self.train.grad_accum
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} is not divisible by "
                f"scaling.num_workers x train.grad_accum = {per_step}"
            )
        return self

    def check_patch(self, patch_size: int) -> None:
        h, w = self.data.size_hw
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"data.image_size {h}x{w} is not a multiple of the model's patch size {patch_size}"
            )

    def vit_config(self, num_classes: int) -> ViTConfig:
        """The pretraining architecture: model.preset at data.image_size, plus overrides."""
        return ViTConfig.from_preset(
            self.model.preset,
            image_size=self.data.size_hw,
            in_chans=self.data.channels,
            num_classes=num_classes,
            **self.model.overrides,
        )

    @property
    def micro_batch(self) -> int:
        """Per worker, per forward pass: computed here, on the driver."""
        return self.train.batch_size // (self.scaling.num_workers * self.train.grad_accum)

    def shrunk(self) -> JobConfig:
        """`smoke: true`: a couple of minutes on a CPU, whatever the config asks for."""
        if not self.smoke:
            return self
        return self.model_copy(
            update={
                "train": self.train.model_copy(
                    update={"max_steps": min(self.train.max_steps or 20, 20), "report_every": 5}
                ),
                "scaling": self.scaling.model_copy(update={"use_gpu": False}),
            }
        )


def known_key(section: type[BaseModel], dotted: str) -> bool:
    """Whether `dotted` names a field of the schema (anything under a free-form dict, such
    as model.overrides, counts)."""
    head, _, rest = dotted.partition(".")
    field = section.model_fields.get(head)
    if field is None:
        return False
    kind = field.annotation
    models = [
        t for t in get_args(kind) or (kind,) if isinstance(t, type) and issubclass(t, BaseModel)
    ]
    if models:  # a section, or an optional one
        return bool(rest) and known_key(models[0], rest)
    return not rest or get_origin(kind) is dict


class ConfigError(ValueError):
    """A config that cannot run: the message names the offending key."""


def set_key(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[leaf] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read YAML, apply `section.key=value` overrides, validate; ConfigError names the key."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        set_key(tree, key.strip(), yaml.safe_load(raw))
    return validate_config(tree, str(path))


def with_values(cfg: JobConfig, values: dict[str, Any]) -> JobConfig:
    """`cfg` with dotted keys replaced (a Tune trial's sample), validated again."""
    tree = cfg.model_dump(mode="json")
    for key, value in values.items():
        set_key(tree, key, value)
    return validate_config(tree, f"trial {values}")


def validate_config(tree: dict, origin: str) -> JobConfig:
    try:
        return JobConfig.model_validate(tree).shrunk()
    except ValidationError as e:
        lines = [
            f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError(f"invalid config {origin}:\n  " + "\n  ".join(lines)) from e


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}, for MLflow params."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --set: the options of every job command."""
    parser.add_argument("--config", required=True, help="a YAML file, e.g. jobs/configs/...")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable); values are YAML",
    )


def shown(cfg: JobConfig) -> dict[str, Any]:
    """The config as printed and logged (console, MLflow params, config.yaml): no secrets."""
    return yaml.safe_load(redact(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))
