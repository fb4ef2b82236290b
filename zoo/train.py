"""The generative-model trainer: what a run of `zoo train` trains, on `zoo.run`'s loop.

It owns the model side of a run: the data split (resolved once), the model built from the
registry with its geometry taken from the data, fused Adam, the loss with its KL warm-up,
the sample grids and ``model.safetensors`` with the checkpoint metadata. The run folder,
the loop, logging, saves, exact resume and DDP are `zoo.run`'s, shared with the classifier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torchvision.io import read_image

import zoo
from zoo.card import write_card
from zoo.checkpoint import save_checkpoint
from zoo.data import ImageData, load_data, resolve_source
from zoo.errors import ZooError, error_reason
from zoo.files import WriteFailed
from zoo.grids import training_grid
from zoo.model import GenerativeModel
from zoo.registry import MODELS, create_model, get_model_class
from zoo.run import SETTINGS_FILE, TrainingRun, stored_settings
from zoo.settings import TrainSettings
from zoo.step import make_optimizer

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = "install the tensorboard extra: pip install 'zoo[tensorboard]'"


def _source_of(model_name: str) -> str:
    return MODELS.entry(model_name).source


def load_training_data(settings: TrainSettings, *, progress: bool = True) -> ImageData:
    """The run's split, with the source resolved once (its image size defaults by kind)."""
    source = resolve_source(settings.data, progress=progress)
    return load_data(
        source,
        settings.split,
        settings.image_size or source.default_image_size,
        attributes=settings.attributes,
        strict=settings.strict,
        progress=progress,
    )


def summary_writer_class() -> Any:
    """torch's TensorBoard writer, or a one-line error naming the extra (before any work)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ZooError(f"--tensorboard needs the tensorboard package; {TENSORBOARD_HINT}") from None
    return SummaryWriter


def build_model(settings: TrainSettings, data: ImageData) -> GenerativeModel:
    """Create the model with its image geometry and attribute count taken from the data."""
    model_class = get_model_class(settings.model)
    return create_model(settings.model, **settings.model_config, **model_class.data_config(data))


class Trainer(TrainingRun):
    """A generative model's training run (the loop and its plumbing are `zoo.run`'s)."""

    command = "train"
    weights_file = MODEL_FILE

    def __init__(
        self,
        settings: TrainSettings,
        *,
        resume: Path | None = None,
        progress: bool = True,
    ) -> None:
        settings.validate()
        get_model_class(settings.model)  # an unknown name fails before any data work
        writer_class = summary_writer_class() if settings.tensorboard else None
        self.name = settings.model
        self.tensorboard: Any = None
        super().__init__(settings, resume=resume, progress=progress)
        if writer_class is not None and self.is_main:
            # a resumed run drops the events logged after its last save, as metrics.jsonl does
            self.tensorboard = writer_class(
                log_dir=str(self.run_dir / TENSORBOARD_DIR),
                purge_step=self.step + 1 if resume is not None else None,
            )
            config = json.dumps(self.settings_record(), indent=2)
            with self._secondary("TensorBoard events"):
                self.tensorboard.add_text("config", f"```\n{config}\n```", self.step)

    def load_data(self, progress: bool) -> ImageData:
        return load_training_data(self.settings, progress=progress)

    def build(self) -> tuple[GenerativeModel, torch.optim.Optimizer]:
        model = build_model(self.settings, self.data).to(self.device)
        return model, make_optimizer(model.parameters(), self.device, self.settings.lr)

    def started(self) -> None:
        self.preview = self._preview_batch()

    def losses(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y = inputs
        return self.trainable(x, y, kl_weight=self._kl_weight(self.step + 1))

    def _kl_weight(self, step: int) -> float:
        """The KL weight of (1-based) training step ``step``: step / warm-up, up to 1."""
        warmup = self.settings.kl_warmup_steps
        return min(1.0, step / warmup) if warmup else 1.0

    def record_fields(self) -> dict[str, Any]:
        return {"kl_weight": self._kl_weight(self.step)}  # of the record's last step

    def after_log(self, epoch_end: bool, finished: bool) -> None:
        every = self.settings.sample_every
        if finished or (self.step % every == 0 if every else epoch_end):
            self.write_samples()

    @contextlib.contextmanager
    def _secondary(self, what: str) -> Iterator[None]:
        """Pictures and TensorBoard events are for reading a run, not the run itself: a write
        the system refuses (a full disk) is one warning and training goes on; a write that
        matters fails at the next save, with its own line."""
        try:
            yield
        except (OSError, WriteFailed) as error:  # ours, or what PIL / TensorBoard raise
            log.warning("%s not written: %s; training goes on", what, error_reason(error))

    def logged(self, record: dict[str, Any]) -> None:
        if self.tensorboard is not None:
            with self._secondary("TensorBoard events"):
                for key, value in record.items():
                    if key != "step" and isinstance(value, int | float):
                        self.tensorboard.add_scalar(key, value, record["step"])
                self.tensorboard.flush()

    def saved(self) -> None:
        write_card(self.run_dir / MODEL_FILE)

    def closed(self) -> None:
        if self.tensorboard is not None:
            with self._secondary("TensorBoard events"):
                self.tensorboard.close()

    def stats(self) -> str:
        losses = self.last_losses
        return (
            (
                f"loss {losses['loss']:9.2f}  recon {losses['recon']:9.2f}  "
                f"KL {losses['kl']:7.2f}  {self.last_rate:6.0f} img/s"
            )
            if losses
            else ""
        )

    def settings_record(self) -> dict[str, Any]:
        return {
            **super().settings_record(),
            "model": self.settings.model,
            "model_config": self.model.config.to_dict(),
            "data": self.data.describe(),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }

    def _preview_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed handful of images for the sample grids, the same in every grid of the run."""
        count = min(8, len(self.data))
        index = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(1))[:count]
        return self.data.batch(index, self.device)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "batch_size": self.settings.batch_size,
            "lr": self.settings.lr,
            "seed": self.settings.seed,
            "final_losses": self.last_losses,
            "wall_time_s": round(self.wall_time_s(), 2),
            "images_per_s": round(self.images_seen / max(self.wall_time_s(), 1e-9), 1),
            "device": str(self.device),
            "processes": self.ranks.world_size,
            "precision": self.precision,
            "compiled": self.settings.compile,
            "versions": {
                "zoo": zoo.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }

    def save_weights(self) -> None:
        attr_rates = self.data.attrs.mean(dim=0).tolist() if self.data.attr_names else []
        save_checkpoint(
            self.run_dir / MODEL_FILE,
            self.model,
            attr_names=self.data.attr_names,
            attr_rates=attr_rates,
            preprocess=self.data.preprocess.to_dict(),
            data=self.data.describe(),
            training=self.summary(),
            source=_source_of(self.settings.model),
        )

    def write_samples(self) -> Path | None:
        if not self.is_main:
            return None
        self.model.eval()
        images, attrs = self.preview
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        with self._secondary(f"sample grid {path.name}"):
            training_grid(self.model, images, attrs, path, seed=self.settings.seed)
        self.model.train()
        if self.tensorboard is not None and path.is_file():
            with self._secondary("TensorBoard events"):
                self.tensorboard.add_image("samples", read_image(str(path)), self.step)
                self.tensorboard.flush()
        return path


def resume_settings(run_dir: Path, **overrides: Any) -> TrainSettings:
    """The settings a run was started with, with step budgets optionally extended.

    The model fields the run's recorded config predates keep the value it was built with
    (`ModelConfig.SAVED_BEFORE`), so a run started before a default changed resumes the same
    network."""
    settings = stored_settings(run_dir, TrainSettings, **overrides)
    try:  # stored_settings has read it: a second read fails only if it changed meanwhile
        recorded = json.loads((Path(run_dir) / SETTINGS_FILE).read_bytes()).get("model_config")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict):
        config_class = get_model_class(settings.model).config_class
        fields = {f.name for f in dataclasses.fields(config_class)}
        for name, value in config_class.SAVED_BEFORE.items():
            if name in fields and name not in recorded:
                settings.model_config.setdefault(name, value)
    return settings
