"""The `zoo` command: parses options, calls the library, prints with rich. No logic lives here."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_origin


def _ctrl_c_in_one_line(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A `sys.excepthook` for a Ctrl-C that reaches Python itself: pressed while zoo starts
    (importing torch takes a second or two), before any command runs or writes, so one line
    says it instead of an import traceback. Inside a command Typer and zoo handle it."""

    def hook_with_ctrl_c(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.stderr.write("stopped by Ctrl-C while zoo was starting; nothing was written\n")
        else:
            hook(kind, error, trace)

    return hook_with_ctrl_c


sys.excepthook = _ctrl_c_in_one_line(sys.excepthook)

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import zoo
from benchmarks.classifier_settings import ClassifierSettings
from benchmarks.metric import BenchSettings
from zoo.errors import ZooError
from zoo.model import ModelConfig
from zoo.names import printable
from zoo.nets import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from zoo.settings import IMAGE_SIZE, MNIST_IMAGE_SIZE, TrainSettings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Train, edit and benchmark conditional generative models (VAE, CVAE, ...) on faces.",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare CelebA caches and synthetic faces.")
app.add_typer(data_app, name="data")
study_app = typer.Typer(
    no_args_is_help=True,
    help="Studies: models x settings x seeds from a TOML file, with error bars (docs/studies.md).",
)
app.add_typer(study_app, name="study")


class PlainConsole(Console):
    """A console for text that comes from files (names, paths, plugin messages): no rich
    markup or emoji codes are read in it, and control characters print as escapes, so a
    name like ``[/]`` or one holding a terminal escape prints as itself and cannot restyle,
    move or rewrite the terminal. Style is given explicitly (`styled`)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(highlight=False, markup=False, emoji=False, **options)

    def print(self, *objects: Any, **options: Any) -> None:
        shown = [printable(item) if isinstance(item, str) else item for item in objects]
        super().print(*shown, **options)


def styled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style``, then the message as plain text ("error: ...")."""
    return Text.assemble((label, style), " ", printable(message))


def plain_table(title: str, **options: Any) -> Table:
    """A table whose title and cells are shown as plain text (see `PlainConsole`)."""
    return Table(title=Text(printable(title), style="italic"), **options)


def cells(*values: Any) -> list[Text]:
    return [Text(printable(str(value))) for value in values]


console = PlainConsole()
err_console = PlainConsole(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class _OneLineHandler(logging.Handler):
    """Library notices as single coloured lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        style = "yellow" if record.levelno >= logging.WARNING else "cyan"
        label = "warning" if record.levelno >= logging.WARNING else "note"
        err_console.print(styled(f"{label}:", style, record.getMessage()), soft_wrap=True)


def _setup_logging() -> None:
    """The library's and the benchmarks' notices, as one line each."""
    for name in ("zoo", "benchmarks"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _OneLineHandler) for h in logger.handlers):
            logger.addHandler(_OneLineHandler())
        logger.setLevel(logging.INFO)


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric option, declared beside it: ``Annotated[int, typer.Option(
    ...), Bounds(1)]``. `user_errors` checks every bounded option before the command runs, so
    a value outside it (NaN and infinities included) is one line naming the option and range.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is outside (a learning rate must be > 0)
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        low, high = _plain(self.low), _plain(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        if self.low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {low}"
        if self.high is not None:
            return f"{'less than' if self.high_open else 'at most'} {high}"
        return "a finite number"

    def check(self, option: str, value: Any, default: Any) -> None:
        for number in value if isinstance(value, list) else [value]:
            if number is not None and not self.holds(number):
                raise ZooError(f"{option} must be {self.describe()}, got {number}")


def _plain(number: float | None) -> str:
    """A bound as people write it: 4294967295 and 0.5, not 4.29497e+09."""
    return str(int(number)) if number is not None and float(number).is_integer() else str(number)


@dataclass(frozen=True)
class Writable:
    """An output path option that must be a file or a folder (beside ``typer.Option``), so a
    path of the wrong kind is one line before any work, not a traceback after it."""

    kind: Literal["file", "folder"]

    def check(self, option: str, value: Path | None, default: Any) -> None:
        if value is None:
            return
        if self.kind == "file" and value.is_dir():
            example = value / Path(default).name
            raise ZooError(f"{option} {value} is a folder, not a file; name a file, e.g. {example}")
        if self.kind == "folder" and value.exists() and not value.is_dir():
            raise ZooError(f"{option} {value} is a file; name a folder (it is created if missing)")
        existing = next((parent for parent in value.parents if parent.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ZooError(
                f"{option} {value}: {existing} is a file, so nothing can be written there"
            )


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint argument (beside ``typer.Argument``): a model.safetensors file, a run or
    exported folder, or hf-hub:ORG/NAME, turned into the file before the command runs, so
    every command reads, and writes beside, the same file (`zoo.hub.checkpoint_file`)."""

    def resolve(self, value: Path | list[Path] | None) -> Path | list[Path] | None:
        from zoo.hub import checkpoint_file

        if isinstance(value, list):
            return [checkpoint_file(path) for path in value]
        return None if value is None else checkpoint_file(value)


CHECKPOINT_HELP = "A model.safetensors file, a run or exported folder, or hf-hub:ORG/NAME."
CheckpointArg = Annotated[Path, typer.Argument(help=CHECKPOINT_HELP), Checkpoint()]


def default_of(settings: type, name: str) -> Any:
    """A settings dataclass's default for `name`, so a help text quotes it from its one home."""
    found = {field.name: field for field in dataclasses.fields(settings)}[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    return found.default_factory()  # type: ignore[misc]


def _default(settings: type, name: str) -> str:
    return f"default {default_of(settings, name)}"


def _train_default(name: str) -> str:
    return _default(TrainSettings, name)


def _classifier_default(name: str) -> str:
    return _default(ClassifierSettings, name)


def _option_name(name: str, metadata: tuple[Any, ...]) -> str:
    """How the user spells an option: its first declared name (``-n``), else ``--the-name``.
    In ``Annotated``, Typer takes ``typer.Option("-n")``'s first argument as a declaration."""
    for info in metadata:
        if isinstance(info, typer.models.OptionInfo):
            declared = [info.default, *(info.param_decls or ())]
            names = [d for d in declared if isinstance(d, str) and d.startswith("-")]
            if names:
                return names[0]
    return f"--{name.replace('_', '-')}"


def _check_options(func: Callable[..., Any], values: dict[str, Any]) -> dict[str, Any]:
    """Apply the `Bounds` and `Writable` declared in the command's option annotations; returns
    the values with every `Checkpoint` argument resolved to its file."""
    values = dict(values)
    for parameter in inspect.signature(func, eval_str=True).parameters.values():
        if get_origin(parameter.annotation) is not Annotated:
            continue
        metadata = parameter.annotation.__metadata__
        option = _option_name(parameter.name, metadata)
        for check in metadata:
            if isinstance(check, (Bounds, Writable)):
                check.check(option, values.get(parameter.name), parameter.default)
            if isinstance(check, Checkpoint) and parameter.name in values:
                values[parameter.name] = check.resolve(values[parameter.name])
    return values


def user_errors(func: F) -> F:
    """Turn a `ZooError` into one red line and exit code 1, never a traceback; options are
    checked against their declared `Bounds` and `Writable` kinds first."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return func(*args, **_check_options(func, kwargs))
        except ZooError as error:
            err_console.print(styled("error:", "red", str(error)), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _parse_options(options: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for model config fields; values are read as JSON when they parse."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ZooError(f"option {option!r} is not KEY=VALUE (for example -o latent_dim=64)")
        try:
            parsed[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip().replace("-", "_")] = value
    return parsed


DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="CelebA folder (official layout) or mnist:DIR. Default: $ZOO_DATA, ./data/celeba, "
        "else the built-in synthetic faces.",
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto (cuda, mps, cpu), cpu, cuda, cuda:N.")]
RunsOutOption = Annotated[
    Path, typer.Option(help="Folder that receives the run folder."), Writable("folder")
]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars.")]


def device_option(settings: type) -> Any:
    """``--device`` of a command whose settings dataclass holds its default (None: that one)."""
    help_text = f"auto (cuda, mps, cpu), cpu, cuda, cuda:N ({_default(settings, 'device')})."
    return Annotated[str | None, typer.Option(help=help_text)]


def runs_out_option(settings: type) -> Any:
    """``--out`` of a trainer: the folder that receives its run folder."""
    help_text = f"Folder that receives the run folder ({_default(settings, 'out')})."
    return Annotated[Path | None, typer.Option(help=help_text), Writable("folder")]


def save_every_option(settings: type) -> Any:
    help_text = f"Steps between checkpoints ({_default(settings, 'save_every')})."
    return Annotated[int | None, typer.Option(help=help_text), COUNT]


def on_nan_option(settings: type) -> Any:
    help_text = f"On a non-finite loss: stop or skip ({_default(settings, 'on_nan')})."
    return Annotated[str | None, typer.Option(help=help_text)]


NprocOption = Annotated[
    int,
    typer.Option(help="Processes on this machine: one DDP run, as torchrun starts it."),
    Bounds(1, 256),
]
IMAGE_SIZES = Bounds(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)  # what the conv backbones can build
BATCH_SIZES = Bounds(1, 65536)
SEEDS = Bounds(0, 2**32 - 1)
COUNT = Bounds(1)  # steps, epochs, images: at least one


@app.command()
@user_errors
def train(
    model: Annotated[
        str | None, typer.Argument(help="Registered model name (see `zoo list`).")
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="KL weight; 1 is the plain ELBO."), Bounds(0)
    ] = None,
    latent_dim: Annotated[
        int | None,
        typer.Option(help=f"Latent dimensions (default {default_of(ModelConfig, 'latent_dim')})."),
        Bounds(1, 16384),
    ] = None,
    likelihood: Annotated[
        str | None, typer.Option(help="gaussian (MSE) or bernoulli (BCE).")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help=f"Square image side (default {IMAGE_SIZE}; {MNIST_IMAGE_SIZE} for MNIST)."
        ),
        IMAGE_SIZES,
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"Passes over the split ({_train_default('epochs')}; a resumed run keeps its own)."
        ),
        COUNT,
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps."), COUNT
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help=f"Images per step ({_train_default('batch_size')})."),
        BATCH_SIZES,
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help=f"Adam learning rate ({_train_default('lr')})."),
        Bounds(0, low_open=True),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help=f"Seed for initialisation, data order and noise ({_train_default('seed')})."
        ),
        SEEDS,
    ] = None,
    data: DataOption = None,
    split: Annotated[
        str | None, typer.Option(help=f"train, valid, test or all ({_train_default('split')}).")
    ] = None,
    attributes: Annotated[
        str | None, typer.Option(help="Comma-separated attribute subset, e.g. Smiling,Male.")
    ] = None,
    device: device_option(TrainSettings) = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto (bf16 where measured clearly faster), fp32, bf16 "
            f"({_train_default('precision')})."
        ),
    ] = None,
    kl_warmup: Annotated[
        int | None,
        typer.Option(
            help=f"Steps of linear KL warm-up, 0 for none ({_train_default('kl_warmup_steps')})."
        ),
        Bounds(0),
    ] = None,
    out: runs_out_option(TrainSettings) = None,
    sample_every: Annotated[
        int | None, typer.Option(help="Steps between sample grids (default: every epoch)."), COUNT
    ] = None,
    save_every: save_every_option(TrainSettings) = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder from its last save.")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Model config field KEY=VALUE.")
    ] = None,
    on_nan: on_nan_option(TrainSettings) = None,
    strict: Annotated[
        bool | None,
        typer.Option(
            "--strict/--no-strict",
            help=f"Fail on any unreadable image ({_train_default('strict')}).",
        ),
    ] = None,
    flip: Annotated[
        bool | None,
        typer.Option(
            "--flip/--no-flip",
            help=f"Random horizontal flips of training images ({_train_default('flip')}).",
        ),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic algorithms only (bit-reproducible, slower; "
            f"{_train_default('deterministic')}).",
        ),
    ] = None,
    compile_model: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help=f"torch.compile the training step ({_train_default('compile')}).",
        ),
    ] = None,
    nproc: NprocOption = 1,
    tensorboard: Annotated[
        bool | None,
        typer.Option(
            "--tensorboard/--no-tensorboard",
            help="Also write TensorBoard event files (the tensorboard extra; "
            f"{_train_default('tensorboard')}).",
        ),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Train a registered model; writes runs/<model>-<time>/ with weights, samples and logs."""
    from zoo.config import with_overrides
    from zoo.distributed import launched_ranks, run_local_world
    from zoo.train import Trainer, TrainSettings, resume_settings

    if nproc > 1 and launched_ranks().solo:
        raise typer.Exit(run_local_world(nproc, Path(__file__), sys.argv[1:]))
    if resume is not None:
        settings = resume_settings(
            resume, epochs=epochs, max_steps=max_steps, tensorboard=tensorboard or None
        )
    else:
        if model is None:
            raise ZooError("name a model to train (see `zoo list`), or pass --resume RUN_DIR")
        model_config = _parse_options(option or [])
        model_config.update(
            with_overrides(dict, beta=beta, latent_dim=latent_dim, likelihood=likelihood)
        )
        settings = with_overrides(
            TrainSettings,
            model=model,
            model_config=model_config,
            data=data,
            split=split,
            image_size=image_size,
            attributes=attributes.split(",") if attributes else None,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            precision=precision,
            out=str(out) if out is not None else None,
            sample_every=sample_every,
            save_every=save_every,
            kl_warmup_steps=kl_warmup,
            compile=compile_model,
            flip=flip,
            deterministic=deterministic,
            strict=strict,
            on_nan=on_nan,
            tensorboard=tensorboard,
        )
    trainer = Trainer(settings, resume=resume, progress=progress)
    if not trainer.is_main:  # under DDP only rank 0 reports
        trainer.run()
        return
    data_used, parameters = trainer.data, sum(p.numel() for p in trainer.model.parameters())
    console.print(
        f"training {settings.model} ({parameters:,} parameters) on {data_used.name} "
        f"{data_used.split} ({len(data_used):,} images, {data_used.preprocess.image_size}px) "
        f"on {trainer.device}, precision {trainer.precision_choice}, "
        f"steps {trainer.step}->{trainer.total_steps}; "
        f"run {trainer.run_dir}",
        soft_wrap=True,
    )
    result = trainer.run()
    summary = result.summary
    losses = {"loss": float("nan"), "recon": float("nan"), "kl": float("nan")}
    losses.update(summary["final_losses"])
    status = "interrupted" if result.interrupted else "done"
    console.print(
        f"{status} at step {result.step}/{result.total_steps} in {summary['wall_time_s']:.1f} s "
        f"({summary['images_per_s']:.0f} img/s); loss {losses['loss']:.2f} "
        f"recon {losses['recon']:.2f} KL {losses['kl']:.2f}",
        soft_wrap=True,
    )
    console.print(f"weights  {result.run_dir / 'model.safetensors'}", soft_wrap=True)
    samples = sorted((result.run_dir / "samples").glob("*.png"))
    if samples:
        console.print(f"samples  {samples[-1]}", soft_wrap=True)
    for label, name in (("curves", "curves.png"), ("card", "README.md")):
        if (result.run_dir / name).is_file():
            console.print(f"{label:<8} {result.run_dir / name}", soft_wrap=True)
    if result.interrupted:
        console.print(f"continue with: {trainer.resume_command()}", soft_wrap=True)
        raise typer.Exit(130)


@app.command()
@user_errors
def curves(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (with metrics.jsonl).")],
    out: Annotated[Path, typer.Option(help="The PNG to write."), Writable("file")] = Path(
        "curves.png"
    ),
) -> None:
    """Overlay the loss curves of several runs, one panel per loss term, with a legend."""
    from zoo.curves import draw_curves, read_records

    records = {f"{run.name}": read_records(run) for run in runs}
    console.print(f"wrote {draw_curves(records, out)}", soft_wrap=True)


@app.command("list")
@user_errors
def list_command(
    pattern: Annotated[str, typer.Argument(help="Wildcard, e.g. 'beta-*'.")] = "*",
) -> None:
    """List registered models (built-in and plugins) and any plugin that failed to load."""
    from zoo.registry import MODELS

    table = plain_table("registered models")
    for column in ("name", "family", "conditional", "source", "description"):
        table.add_column(column, no_wrap=column in ("name", "source"))  # names stay copyable
    shown = set(MODELS.names(pattern))
    for entry in MODELS.all_entries():
        if entry.name in shown:
            table.add_row(
                *cells(
                    entry.name,
                    entry.cls.family or entry.cls.__name__,
                    "yes" if entry.cls.conditional else "no",
                    entry.source,
                    entry.description,
                )
            )
    console.print(table)
    broken = MODELS.all_broken()
    if broken:
        failed = plain_table("plugins that failed to load", title_style="red")
        for column in ("name", "package", "error"):
            failed.add_column(column)
        for plugin in broken:
            failed.add_row(*cells(plugin.name, plugin.source, plugin.error))
        console.print(failed)


@app.command("check-plugin")
@user_errors
def check_plugin(
    name: Annotated[str, typer.Argument(help="Registered model name, built-in or plugin.")],
) -> None:
    """Run the interface conformance suite on a model; exits 1 if any check fails."""
    from zoo.conformance import check_model
    from zoo.registry import MODELS

    results = check_model(name)
    source = MODELS.entry(name).source
    table = plain_table(f"conformance of {name} (from {source})")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for result in results:
        verdict = Text("pass", style="green") if result.passed else Text("FAIL", style="red")
        name_cell, detail_cell = cells(result.name, result.detail)
        table.add_row(name_cell, verdict, detail_cell)
    console.print(table)
    failed = [result.name for result in results if not result.passed]
    if failed:
        err_console.print(
            Text(printable(f"{name} fails {len(failed)} of {len(results)} checks"), style="red")
        )
        raise typer.Exit(1)
    console.print(f"{name} passes all {len(results)} checks")


@app.command()
@user_errors
def info(checkpoint: CheckpointArg) -> None:
    """Show what a checkpoint holds: model, paper, config, data, training, benchmark results,
    and where its model card and loss curves are."""
    from zoo.card import about, card_path, read_bench_results
    from zoo.curves import CURVES_FILE

    details = zoo.read_info(checkpoint)
    table = plain_table(str(checkpoint), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    training = details.training
    described = about(details)
    rows = {
        "model": f"{details.model_name} (from {described.source})",
        "family": described.family or "-",
        "paper": described.paper or "-",
        "config": json.dumps(details.config),
        "attributes": f"{len(details.attr_names)}: {', '.join(details.attr_names)}",
        "data": json.dumps({k: v for k, v in details.data.items() if k != "attr_names"}),
        "preprocess": json.dumps(details.preprocess),
        "training": json.dumps({k: v for k, v in training.items() if k != "final_losses"}),
        "final losses": json.dumps(training.get("final_losses", {})),
    }
    for entry in read_bench_results(checkpoint).values():
        numbers = ", ".join(f"{k} {v}" for k, v in entry["headline"].items())
        rows[f"bench {entry['metric']}"] = f"{numbers} ({entry['date']})"
    for label, path in (
        ("card", card_path(checkpoint)),
        ("curves", checkpoint.with_name(CURVES_FILE)),
    ):
        rows[label] = str(path) if path.is_file() else "not written"
    for key, value in rows.items():
        table.add_row(*cells(key, value))
    console.print(table)


@data_app.command("prepare")
@user_errors
def data_prepare(
    data: DataOption = None,
    size: Annotated[int, typer.Option(help="Square image side of the cache."), IMAGE_SIZES] = 64,
    strict: Annotated[bool, typer.Option(help="Fail on any unreadable image.")] = False,
) -> None:
    """Decode every image once into a memory-mapped uint8 cache for training and benchmarks."""
    from zoo.data import load_data

    prepared = load_data(data, "all", size, strict=strict)
    console.print(
        f"{prepared.name} at {prepared.root}: {len(prepared):,} images of "
        f"{prepared.preprocess.channels}x{size}x{size}, {len(prepared.attr_names)} attributes, "
        f"fingerprint {prepared.fingerprint[:16]}",
        soft_wrap=True,
    )


@data_app.command("synth")
@user_errors
def data_synth(
    out: Annotated[
        Path,
        typer.Option(help="Folder to write the CelebA-layout dataset into."),
        Writable("folder"),
    ],
    n: Annotated[int, typer.Option("-n", help="Number of images."), Bounds(1, 1_000_000)] = 12000,
    size: Annotated[
        int, typer.Option(help="Face size in pixels after the CelebA crop."), Bounds(8, 1024)
    ] = 64,
    seed: Annotated[
        int, typer.Option(help="Seed; the same seed gives identical files."), SEEDS
    ] = 0,
    independent: Annotated[
        bool,
        typer.Option(
            help="Draw the factors (hair and 12 binary attributes) independently and uniformly, "
            "skipping undrawable faces: the ground truth of the disentanglement metrics."
        ),
    ] = False,
) -> None:
    """Write the built-in synthetic faces (with CelebA attribute names) in CelebA's layout."""
    from zoo.data.synth import write_synthetic

    path = write_synthetic(out, n, size, seed, independent=independent)
    kind = "synthetic faces with independent factors" if independent else "synthetic faces"
    console.print(f"wrote {n:,} {kind} to {path}", soft_wrap=True)


OutOption = Annotated[Path, typer.Option(help="PNG file to write."), Writable("file")]
SeedOption = Annotated[int, typer.Option(help="Seed: the same seed gives the same picture."), SEEDS]
StrengthOption = Annotated[
    float, typer.Option(help="Concept-vector multiplier s in z + s*v."), Bounds()
]


def _load(checkpoint: Path, device: str) -> zoo.GenerativeModel:
    from zoo.device import pick_device

    return zoo.load(checkpoint, device=pick_device(device))


def _wrote(path: Path, what: str) -> None:
    console.print(f"wrote {what} to {path}", soft_wrap=True)


@app.command()
@user_errors
def generate(
    checkpoint: CheckpointArg,
    n: Annotated[int, typer.Option("-n", help="Number of samples."), Bounds(1, 1024)] = 64,
    attr: Annotated[
        list[str] | None, typer.Option(help="Attribute to fix, NAME=0|1 (repeatable).")
    ] = None,
    base: Annotated[
        str, typer.Option(help="Other attributes: prior (drawn from data rates) or zero.")
    ] = "prior",
    sweep: Annotated[str | None, typer.Option(help="Show each z with NAME off and on.")] = None,
    seed: SeedOption = 0,
    temperature: Annotated[float, typer.Option(help="Scale of the prior draws."), Bounds(0)] = 1.0,
    strength: StrengthOption = 1.5,
    out: OutOption = Path("generated.png"),
    device: DeviceOption = "auto",
) -> None:
    """Sample faces, with chosen attributes (labels for conditional models, concept vectors
    for unconditional ones)."""
    from zoo.figures import generation_figure
    from zoo.latent import parse_assignments

    model = _load(checkpoint, device)
    assignments = parse_assignments(attr or [], model.checkpoint_info.attr_names)
    figure = generation_figure(
        model,
        n=n,
        assignments=assignments,
        base=base,
        sweep=sweep,
        seed=seed,
        temperature=temperature,
        strength=strength,
    )
    _wrote(figure.save(out), f"{n} samples")


def _faces(
    model: zoo.GenerativeModel,
    files: list[Path],
    indices: list[int],
    data: str | None,
    split: str,
    count: int,
    seed: int,
):
    from zoo.data import checkpoint_data
    from zoo.latent import faces_from_files, faces_from_split

    info = model.checkpoint_info
    if files:
        return faces_from_files(files, info)
    return faces_from_split(
        info, checkpoint_data(info, split, data), indices=indices or None, count=count, seed=seed
    )


@app.command()
@user_errors
def interpolate(
    checkpoint: CheckpointArg,
    from_image: Annotated[
        list[Path] | None, typer.Option("--from", help="Start image file (repeat for more rows).")
    ] = None,
    to_image: Annotated[
        list[Path] | None, typer.Option("--to", help="End image file, paired with --from.")
    ] = None,
    from_index: Annotated[
        list[int] | None,
        typer.Option(help="Start image by index into --split (repeatable)."),
        Bounds(0),
    ] = None,
    to_index: Annotated[
        list[int] | None, typer.Option(help="End image index, paired."), Bounds(0)
    ] = None,
    steps: Annotated[int, typer.Option(help="Images per row, ends included."), Bounds(2, 100)] = 8,
    slerp: Annotated[bool, typer.Option("--slerp", help="Spherical interpolation.")] = False,
    attr: Annotated[
        list[str] | None, typer.Option(help="Labels for image files, NAME=0|1 (repeatable).")
    ] = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split for --from-index/--to-index.")] = "valid",
    out: OutOption = Path("interpolation.png"),
    device: DeviceOption = "auto",
) -> None:
    """Walk the latent space between two encoded faces; the ends are their reconstructions."""
    from zoo.figures import interpolation_figure
    from zoo.latent import interpolation_endpoints, parse_assignments

    model = _load(checkpoint, device)
    info = model.checkpoint_info
    first, last = interpolation_endpoints(
        info,
        from_image or [],
        to_image or [],
        from_index or [],
        to_index or [],
        data=data,
        split=split,
    )
    assignments = parse_assignments(attr or [], info.attr_names)
    figure = interpolation_figure(
        model, first, last, steps=steps, spherical=slerp, assignments=assignments
    )
    _wrote(figure.save(out), f"{first.images.shape[0]} interpolation row(s)")


@app.command()
@user_errors
def edit(
    checkpoint: CheckpointArg,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Label edit NAME=0|1, one grid row each (repeatable)."),
    ] = None,
    concept: Annotated[
        list[str] | None, typer.Option(help="Concept-vector edit by attribute (repeatable).")
    ] = None,
    strength: StrengthOption = 1.5,
    intensity: Annotated[
        float,
        typer.Option(help="Scale of each --set change (AttGAN's test intensity; 1: swap)."),
        Bounds(),
    ] = 1.0,
    images: Annotated[
        list[Path] | None, typer.Option(help="Image files to edit (default: from --split).")
    ] = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split to take images from.")] = "valid",
    n: Annotated[int, typer.Option("-n", help="Images taken from the split."), Bounds(1, 256)] = 8,
    seed: SeedOption = 0,
    out: OutOption = Path("edits.png"),
    device: DeviceOption = "auto",
) -> None:
    """Edit faces: encode, change labels (or add a concept vector), decode."""
    from zoo.figures import edit_figure
    from zoo.latent import parse_assignment_list

    model = _load(checkpoint, device)
    label_edits = parse_assignment_list(set_ or [], model.checkpoint_info.attr_names)
    faces = _faces(model, images or [], [], data, split, n, seed)
    figure = edit_figure(
        model,
        faces,
        label_edits=label_edits,
        concepts=concept or [],
        strength=strength,
        intensity=intensity,
    )
    _wrote(figure.save(out), f"edits of {faces.images.shape[0]} images")


@app.command("concept")
@user_errors
def concept_command(
    checkpoint: CheckpointArg,
    attr: Annotated[list[str], typer.Option(help="Attribute(s) to compute vectors for.")],
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split to average over.")] = "train",
    device: DeviceOption = "auto",
) -> None:
    """Compute concept vectors (mean latent with the attribute minus without) beside the model."""
    from zoo.data import checkpoint_data
    from zoo.latent import compute_concept, concept_path, save_concept

    model = _load(checkpoint, device)
    info = model.checkpoint_info
    split_data = checkpoint_data(info, split, data)
    for name in attr:
        vector = compute_concept(model, split_data, name, info)
        path = concept_path(checkpoint, name)
        save_concept(path, vector)
        console.print(
            f"{name}: |v| = {vector.vector.norm():.3f} from {vector.count_with} images with and "
            f"{vector.count_without} without ({split}); wrote {path}",
            soft_wrap=True,
        )


@app.command()
@user_errors
def grid(
    checkpoint: CheckpointArg,
    n: Annotated[int, typer.Option("--n", help="Grid side."), Bounds(2, 50)] = 15,
    attr: Annotated[
        list[str] | None, typer.Option(help="Labels for a conditional model, NAME=0|1.")
    ] = None,
    out: OutOption = Path("latent_grid.png"),
    device: DeviceOption = "auto",
) -> None:
    """Decode an n x n grid over a 2-d latent (the Keras VAE manifold)."""
    from zoo.figures import latent_grid_figure
    from zoo.latent import parse_assignments

    model = _load(checkpoint, device)
    assignments = parse_assignments(attr or [], model.checkpoint_info.attr_names)
    _wrote(latent_grid_figure(model, n=n, assignments=assignments).save(out), f"{n}x{n} grid")


@app.command()
@user_errors
def animate(
    checkpoint: CheckpointArg,
    attr: Annotated[
        str | None, typer.Option(help="Attribute to sweep off -> on -> off (e.g. Smiling).")
    ] = None,
    traverse: Annotated[
        int | None,
        typer.Option(help="Latent dimension to sweep -span -> +span instead."),
        Bounds(0),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per loop (even)."), Bounds(4, 400)] = 24,
    intensity: Annotated[
        float, typer.Option(help="How far on the label goes (conditional models)."), Bounds()
    ] = 1.0,
    strength: StrengthOption = 1.5,
    span: Annotated[
        float, typer.Option(help="Largest |z[dim]| of a traversal."), Bounds(0, low_open=True)
    ] = 3.0,
    prior: Annotated[
        bool, typer.Option("--prior", help="Traverse prior draws instead of encoded faces.")
    ] = False,
    images: Annotated[
        list[Path] | None, typer.Option(help="Image files to animate (default: from --split).")
    ] = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split to take images from.")] = "valid",
    n: Annotated[int, typer.Option("-n", help="Faces in the row."), Bounds(1, 16)] = 6,
    seed: SeedOption = 0,
    frame_ms: Annotated[int, typer.Option(help="Milliseconds per frame."), Bounds(20, 5000)] = 80,
    out: Annotated[Path, typer.Option(help="GIF file to write."), Writable("file")] = Path(
        "animation.gif"
    ),
    device: DeviceOption = "auto",
) -> None:
    """An animated GIF of faces: one attribute swept off to on and back (--attr: the label
    for conditional models, the concept vector for unconditional ones), or one latent
    dimension traversed (--traverse DIM)."""
    from zoo.animation import animation_rows, save_gif

    if (attr is None) == (traverse is None):
        raise ZooError("give one of --attr NAME (an edit) or --traverse DIM (a latent traversal)")
    model = _load(checkpoint, device)
    faces = _faces(model, images or [], [], data, split, n, seed)
    rows, what = animation_rows(
        model,
        faces,
        attr=attr,
        traverse=traverse,
        prior_seed=seed if prior else None,
        frames=frames,
        intensity=intensity,
        strength=strength,
        span=span,
    )
    out = save_gif(rows, out, title=model.model_name, frame_ms=frame_ms)
    _wrote(out, f"{len(rows)} frames of {what}")


@app.command()
@user_errors
def export(
    checkpoint: CheckpointArg,
    folder: Annotated[
        Path | None,
        typer.Argument(help="Hub-ready folder to write (model.safetensors, config.json, card)."),
        Writable("folder"),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(help="Also write encoder.onnx and decoder.onnx to this folder."),
        Writable("folder"),
    ] = None,
) -> None:
    """Export a checkpoint as a folder the Hugging Face hub takes as a model repo (and zoo.load
    reads offline), and/or as ONNX graphs of its encoder and decoder."""
    if folder is None and onnx is None:
        raise ZooError("nothing to export: give a FOLDER and/or --onnx FOLDER")
    if folder is not None:
        from zoo.export import export_folder

        export_folder(checkpoint, folder)
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        _wrote(folder, f"a hub-ready folder of {size / 1e6:.1f} MB (zoo.load reads it)")
    if onnx is not None:
        from zoo.onnx_export import export_onnx

        for path in export_onnx(zoo.load(checkpoint), onnx):
            _wrote(path, f"{path.stem} graph ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
@user_errors
def demo(
    checkpoint: CheckpointArg,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split to offer faces from.")] = "valid",
    n: Annotated[int, typer.Option("-n", help="Faces to pick from."), Bounds(1, 1000)] = 32,
    seed: SeedOption = 0,
    all_attributes: Annotated[
        bool, typer.Option("--all-attributes", help="A slider for every attribute, not 13.")
    ] = False,
    port: Annotated[
        int, typer.Option(help="Port on 127.0.0.1 (0: a free one)."), Bounds(0, 65535)
    ] = 7860,
    device: DeviceOption = "auto",
) -> None:
    """Serve a face-editing web page on 127.0.0.1: sliders per attribute edit a face of the
    data (or an upload); a second tab generates faces with chosen attributes."""
    from zoo.demo import Editor, demo_attributes, serve

    model = _load(checkpoint, device)
    try:
        faces = _faces(model, [], [], data, split, n, seed)
    except ZooError as error:  # the page still edits uploads
        console.print(f"no faces to pick from ({error}); upload one on the page", soft_wrap=True)
        faces = None
    editor = Editor(model, faces, demo_attributes(model, all_attributes))
    app = serve(editor, port, block=False)
    console.print(f"zoo demo of {model.model_name} at {app.local_url} (Ctrl-C stops it)")
    try:
        app.block_thread()
    finally:
        app.close()


BENCH = BenchSettings()  # the defaults the help of `zoo bench` and `zoo tune-edits` names
EvalBatchSizeOption = Annotated[
    int | None,
    typer.Option(help=f"Batch size for evaluation (default: {BENCH.batch_size})."),
    BATCH_SIZES,
]
BenchProgressOption = Annotated[
    bool | None,
    typer.Option(help=f"Show progress bars (default: {'on' if BENCH.progress else 'off'})."),
]


def _alias(key: str) -> str:
    """The help of a flag kept as an alias of a metric option."""
    return f"Same as --option {key}=VALUE (see --help-metric {key.partition('.')[0]})."


def _print_metric_options(name: str) -> None:
    from benchmarks.metric import METRICS, option_rows

    rows = option_rows(name)
    entry = METRICS.entry(name)
    summary = " ".join((inspect.getdoc(entry.cls) or "").split("\n\n")[0].split())
    console.print(f"{name} ({entry.source}): {summary}", soft_wrap=True)
    if not rows:
        console.print(f"{name} has no options of its own.", soft_wrap=True)
        return
    console.print(f"options, set with --option {name}.NAME=VALUE:", soft_wrap=True)
    for option, takes, default, help_text in rows:
        console.print(f"  {name}.{option}: {takes}; default {default}", soft_wrap=True)
        console.print(f"      {help_text}", soft_wrap=True)


@app.command()
@user_errors
def bench(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(
            help="model.safetensors files, run or exported folders, or hf-hub:ORG/NAME "
            "(default: the latest run of each model)."
        ),
        Checkpoint(),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            help="fid, recon, edit, throughput, kid, prdc, leakage, mig, sap, dci, factorvae, "
            "betavae or a plugin metric (default: all but kid to betavae)."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            metavar="METRIC.NAME=VALUE",
            help="A metric's own option, repeatable (see --help-metric METRIC).",
        ),
    ] = None,
    help_metric: Annotated[
        str | None,
        typer.Option(metavar="METRIC", help="List a metric's options with their defaults, exit."),
    ] = None,
    data: DataOption = None,
    split: Annotated[
        str | None,
        typer.Option(help="Split to measure on (default: test if the data has one, else valid)."),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Images of the split (default: all)."), COUNT
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help=f"Seed of the generated images (default: {BENCH.seed})."),
        SEEDS,
    ] = None,
    batch_size: EvalBatchSizeOption = None,
    classifier: Annotated[
        list[str] | None,
        typer.Option(
            help="Attribute classifier file, repeatable: the ruler panel (default: all found)."
        ),
    ] = None,
    fid_features: Annotated[
        str | None, typer.Option(metavar="TEXT", help=_alias("fid.features"))
    ] = None,
    fid_weights: Annotated[
        str | None, typer.Option(metavar="PATH", help=_alias("fid.weights"))
    ] = None,
    edit_strength: Annotated[
        str | None, typer.Option(metavar="FLOAT", help=_alias("edit.strength"))
    ] = None,
    edit_intensity: Annotated[
        str | None, typer.Option(metavar="FLOAT", help=_alias("edit.intensity"))
    ] = None,
    throughput_batch_size: Annotated[
        str | None, typer.Option(metavar="INTEGER", help=_alias("throughput.batch_size"))
    ] = None,
    precision: Annotated[
        str | None, typer.Option(metavar="TEXT", help=_alias("throughput.precision"))
    ] = None,
    runs: Annotated[
        Path | None, typer.Option(help=f"Folder of runs to search (default: {BENCH.runs_dir}).")
    ] = None,
    out: Annotated[
        Path,
        typer.Option(help="JSON report; a Markdown table is written beside it."),
        Writable("file"),
    ] = Path("results.json"),
    device: device_option(BenchSettings) = None,
    progress: BenchProgressOption = None,
) -> None:
    """Benchmark checkpoints: FID, reconstruction, attribute-edit accuracy and throughput."""
    from benchmarks.metric import OptionValue, resolve_options, select_metrics
    from benchmarks.report import leaderboard, update_model_cards, write_report
    from benchmarks.runner import latest_runs, run_bench
    from zoo.config import with_overrides

    if help_metric is not None:
        _print_metric_options(help_metric)
        return
    aliases = {
        "--fid-features": ("fid", "features", fid_features),
        "--fid-weights": ("fid", "weights", fid_weights),
        "--edit-strength": ("edit", "strength", edit_strength),
        "--edit-intensity": ("edit", "intensity", edit_intensity),
        "--throughput-batch-size": ("throughput", "batch_size", throughput_batch_size),
        "--precision": ("throughput", "precision", precision),
    }
    given = [OptionValue.parse(text) for text in option or []]
    given += [
        OptionValue(metric_name, name, value, flag)
        for flag, (metric_name, name, value) in aliases.items()
        if value is not None
    ]
    options = resolve_options(given)
    settings = with_overrides(
        BenchSettings,
        split=split,
        n=n,
        seed=seed,
        batch_size=batch_size,
        device=device,
        data=data,
        classifiers=classifier,
        runs_dir=None if runs is None else str(runs),
        progress=progress,
    )
    metrics = select_metrics(metric)
    report = run_bench(checkpoints or latest_runs(settings.runs_dir), metrics, settings, options)
    header, rows = leaderboard(report)
    table = plain_table(f"zoo bench on {report.splits} (device {report.device})")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*cells(*row))
    # piped output has no width: do not squeeze a leaderboard into 80 columns
    (console if console.is_terminal else PlainConsole(width=160)).print(table)
    for result in report.results:
        if result.data_note:
            err_console.print(
                styled(
                    "warning:",
                    "yellow",
                    f"{result.info.model_name} ({result.checkpoint}) was {result.data_note}",
                ),
                soft_wrap=True,
            )
        for name, message in result.errors.items():
            err_console.print(
                styled("not computed:", "red", f"{result.info.model_name} {name}: {message}"),
                soft_wrap=True,
            )
    json_path, markdown_path = write_report(report, out)
    console.print(f"wrote {json_path} and {markdown_path}", soft_wrap=True)
    for card in update_model_cards(report):
        console.print(f"updated {card}", soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@app.command("tune-edits")
@user_errors
def tune_edits(
    checkpoint: CheckpointArg,
    classifier: Annotated[
        list[str],
        typer.Option(
            help="Ruler that chooses the intensities (repeatable); it can then never score them."
        ),
    ],
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split to tune on (never the one you report).")] = (
        "valid"
    ),
    n: Annotated[
        int | None, typer.Option("--n", help="Images of the split (default: all)."), COUNT
    ] = None,
    intensities: Annotated[
        str, typer.Option(help="Comma-separated intensities to try.")
    ] = "1,1.25,1.5,2,2.5,3",
    min_preservation: Annotated[
        float,
        typer.Option(help="Least mean preservation an attribute's intensity may cost."),
        Bounds(0, 1),
    ] = 0.9,
    batch_size: EvalBatchSizeOption = None,
    device: device_option(BenchSettings) = None,
    progress: BenchProgressOption = None,
) -> None:
    """Choose each attribute's edit intensity on a validation split with a panel of rulers,
    and store it beside the checkpoint for zoo bench."""
    from benchmarks.edits import save_tuned_intensities, tune_intensities
    from benchmarks.metric import BenchContext, Memo
    from benchmarks.runner import benchmark_split
    from zoo.config import with_overrides
    from zoo.device import pick_device

    try:
        grid = [float(value) for value in intensities.split(",")]
    except ValueError:
        raise ZooError(
            f"--intensities {intensities!r} is not a comma-separated list of numbers"
        ) from None
    settings = with_overrides(
        BenchSettings,
        split=split,
        n=n,
        batch_size=batch_size,
        device=device,
        data=data,
        classifiers=classifier,
        progress=progress,
    )
    model = _load(checkpoint, settings.device)
    info = model.checkpoint_info
    data_split = benchmark_split(Memo(), info, settings)
    context = BenchContext(
        model, checkpoint, info, data_split, settings, pick_device(settings.device)
    )
    record = tune_intensities(context, grid, min_preservation)
    table = plain_table(
        f"edit intensities for {checkpoint} on {split} ({len(classifier)} ruler(s) agreeing)"
    )
    for column in ("attribute", "intensity", "edit acc at 1", "edit acc", "preserve"):
        table.add_column(column)
    for name, chosen in record["chosen"].items():
        at_one = [row for row in record["table"][name] if row["intensity"] == 1.0]
        table.add_row(
            name,
            f"{chosen['intensity']:g}",
            f"{at_one[0]['accuracy']:.3f}" if at_one else "-",
            f"{chosen['accuracy']:.3f}",
            f"{chosen['preservation']:.3f}",
        )
    console.print(table)
    console.print(f"wrote {save_tuned_intensities(checkpoint, record)}", soft_wrap=True)


@app.command("train-classifier")
@user_errors
def train_classifier_command(
    data: DataOption = None,
    split: Annotated[
        str | None, typer.Option(help=f"Split to train on ({_classifier_default('split')}).")
    ] = None,
    eval_split: Annotated[
        str | None,
        typer.Option(help=f"Split to report accuracy on ({_classifier_default('eval_split')})."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help=f"Square image side; match the models ({_classifier_default('image_size')})."
        ),
        IMAGE_SIZES,
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help=f"timm backbone, trained from scratch ({_classifier_default('backbone')})."
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"Passes over the split ({_classifier_default('epochs')}; a resumed run keeps "
            "its own)."
        ),
        COUNT,
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps."), COUNT
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help=f"Images per step ({_classifier_default('batch_size')})."),
        BATCH_SIZES,
    ] = None,
    shift: Annotated[
        float | None,
        typer.Option(
            help="Random translation, a fraction of the side, 0 for none "
            f"(default {default_of(ClassifierSettings, 'shift'):g})."
        ),
        Bounds(0, 0.5, high_open=True),
    ] = None,
    balanced: Annotated[
        bool | None,
        typer.Option(
            "--balanced/--no-balanced",
            help="Weight each attribute's positives by negatives/positives "
            f"({_classifier_default('balanced')}).",
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(help=f"AdamW weight decay ({_classifier_default('weight_decay')})."),
        Bounds(0),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help=f"auto, fp32 or bf16 ({_classifier_default('precision')})."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help=f"Seed of initialisation and data order ({_classifier_default('seed')})."
        ),
        SEEDS,
    ] = None,
    device: device_option(ClassifierSettings) = None,
    out: runs_out_option(ClassifierSettings) = None,
    save_every: save_every_option(ClassifierSettings) = None,
    on_nan: on_nan_option(ClassifierSettings) = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder from its last save.")
    ] = None,
    nproc: NprocOption = 1,
    progress: ProgressOption = True,
) -> None:
    """Train the attribute classifier that scores edits (and gives FD-attr features)."""
    from benchmarks.classifier_training import (
        ClassifierRun,
        classifier_resume_settings,
        finished_classifier,
    )
    from zoo.config import with_overrides
    from zoo.distributed import launched_ranks, run_local_world

    if nproc > 1 and launched_ranks().solo:
        raise typer.Exit(run_local_world(nproc, Path(__file__), sys.argv[1:]))
    if resume is not None:
        settings = classifier_resume_settings(
            resume, epochs=epochs, max_steps=max_steps, progress=progress
        )
    else:
        settings = with_overrides(
            ClassifierSettings,
            data=data,
            split=split,
            eval_split=eval_split,
            image_size=image_size,
            backbone=backbone,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            shift=shift,
            balanced=balanced,
            weight_decay=weight_decay,
            precision=precision,
            seed=seed,
            device=device,
            out=str(out) if out is not None else None,
            save_every=save_every,
            on_nan=on_nan,
            progress=progress,
        )
    run = ClassifierRun(settings, resume=resume)
    result = run.run()
    if not run.is_main:  # under DDP only rank 0 reports
        return
    if result.interrupted:
        console.print(
            f"interrupted at step {result.step}/{result.total_steps}; continue with: "
            f"{run.resume_command()}",
            soft_wrap=True,
        )
        raise typer.Exit(130)
    path, details = finished_classifier(result)
    evaluation = details.evaluation
    console.print(
        f"classifier {details.backbone} on {len(details.attr_names)} attributes: mean accuracy "
        f"{evaluation['mean_accuracy']:.3f}, mean balanced accuracy "
        f"{evaluation['mean_balanced_accuracy']:.3f} on {evaluation['split']} "
        f"({evaluation['n']} images); wrote {path}",
        soft_wrap=True,
    )


def _command_options() -> dict[str, set[str]]:
    """Each zoo command's option names as a study file spells them (dashes as underscores),
    read from the commands themselves so a study can set exactly what a user can type."""
    group = typer.main.get_command(app)
    known = {}
    for name in ("train", "bench", "train-classifier"):
        command = group.commands[name]  # type: ignore[attr-defined]
        known[name] = {
            option.lstrip("-").replace("-", "_")
            for parameter in command.params
            for option in parameter.opts
            if option.startswith("--")
        }
    return known


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ZooError(f"{what} {item!r} is not KEY=VALUE (for example --sbatch account=lab)")
        pairs[key.strip()] = value.strip()
    return pairs


@study_app.command("run")
@user_errors
def study_run(
    study_file: Annotated[Path, typer.Argument(metavar="STUDY.toml", help="The study file.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Study folder (default studies/<the study's name>); run again to resume."
        ),
        Writable("folder"),
    ] = None,
    executor: Annotated[
        str, typer.Option(help="local (submitit, this machine), slurm (submitit) or inline.")
    ] = "local",
    jobs: Annotated[
        int,
        typer.Option(
            help="Cells at once on this machine (local); more than 1 only with cores "
            "(or GPUs) to spare."
        ),
        COUNT,
    ] = 1,
    retries: Annotated[
        int, typer.Option(help="Runs of a failed cell after the first (it resumes)."), Bounds(0)
    ] = 1,
    partition: Annotated[str | None, typer.Option(help="slurm: the partition.")] = None,
    time_min: Annotated[
        int, typer.Option("--time", help="slurm: time limit per cell, minutes."), COUNT
    ] = 60 * 24,
    gpus_per_node: Annotated[
        int | None,
        typer.Option(help="slurm: GPUs per cell (set nproc in the study for DDP)."),
        Bounds(0),
    ] = None,
    cpus_per_task: Annotated[int | None, typer.Option(help="slurm: CPUs per task."), COUNT] = None,
    mem_gb: Annotated[
        float | None, typer.Option(help="slurm: memory per cell, GB."), Bounds(0, low_open=True)
    ] = None,
    array_parallelism: Annotated[
        int, typer.Option(help="slurm: cells of the array running at once."), COUNT
    ] = 256,
    sbatch: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="slurm: an extra #SBATCH --KEY=VALUE line."),
    ] = None,
    setup: Annotated[
        list[str] | None,
        typer.Option(metavar="LINE", help="slurm: a shell line run before each cell."),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Run every cell of a study not done yet, then write its report."""
    from benchmarks.study.driver import (
        EXECUTORS,
        InlineExecutor,
        LocalExecutor,
        SlurmExecutor,
        SlurmOptions,
        run_study,
    )
    from benchmarks.study.report import write_report, write_study_record
    from benchmarks.study.spec import STUDY_COPY, load_study
    from zoo.files import atomic_write_bytes
    from zoo.progress import training_progress

    if executor not in EXECUTORS:
        raise ZooError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    study = load_study(study_file, _command_options())
    study_dir = out if out is not None else Path("studies") / study.name
    slurm = SlurmOptions(
        partition=partition,
        time_min=time_min,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        mem_gb=mem_gb,
        array_parallelism=array_parallelism,
        sbatch=_key_values(sbatch, "--sbatch"),
        setup=list(setup or []),
    )

    def make_executor(nproc: int) -> Any:
        if executor == "inline":
            return InlineExecutor()
        if executor == "local":
            return LocalExecutor(study_dir, jobs)
        return SlurmExecutor(study_dir, slurm, nproc)

    make_executor(1)  # a missing submitit is one line now, not after the folder is made
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(study_dir / STUDY_COPY, study_file.read_bytes())
    write_study_record(study_dir, study)
    program = [sys.executable, str(Path(__file__).resolve())]
    total = len(study.cells)
    console.print(
        f"study {study.name}: {total} cells ({len(study.model_cells())} trainings) in "
        f"{study_dir}, executor {executor}",
        soft_wrap=True,
    )
    with training_progress(progress) as bar:
        task = bar.add_task("cells", total=total, stats="")

        def on_change(done: int, total: int, running: int, failed: int) -> None:
            bar.update(task, completed=done, stats=f"running {running}  failed {failed}")

        outcome = run_study(study, study_dir, program, make_executor, retries, on_change)
    for name, line in outcome.failed.items():
        err_console.print(styled("failed:", "red", f"{name}: {line}"), soft_wrap=True)
    written, note = write_report(study_dir)
    console.print(
        f"{len(outcome.done)}/{total} cells done; wrote {', '.join(map(str, written))}",
        soft_wrap=True,
    )
    if note:
        err_console.print(styled("note:", "yellow", note), soft_wrap=True)
    if outcome.interrupted:
        console.print(
            f"interrupted; run `zoo study run {study_file} --out {study_dir}` again to resume",
            soft_wrap=True,
        )
        raise typer.Exit(130)
    if outcome.failed:
        raise typer.Exit(1)


@study_app.command("status")
@user_errors
def study_status(
    study_dir: Annotated[Path, typer.Argument(metavar="STUDY_DIR", help="A study folder.")],
) -> None:
    """A table of the study's cells: state, attempts, time used and, for failures, why."""
    from benchmarks.study.report import cell_views

    views = cell_views(study_dir)
    table = plain_table(f"study {study_dir}")
    for column in ("cell", "row", "seed", "state", "attempts", "time", "error"):
        table.add_column(column)
    counts: dict[str, int] = {}
    for view in views:
        counts[view.state] = counts.get(view.state, 0) + 1
        table.add_row(
            *cells(
                view.name,
                view.label,
                "-" if view.seed is None else view.seed,
                view.state,
                view.status.attempts,
                f"{view.status.seconds:.0f} s",
                view.status.error or "",
            )
        )
    (console if console.is_terminal else PlainConsole(width=200)).print(table)
    console.print(", ".join(f"{count} {state}" for state, count in sorted(counts.items())))


@study_app.command("report")
@user_errors
def study_report(
    study_dir: Annotated[Path, typer.Argument(metavar="STUDY_DIR", help="A study folder.")],
) -> None:
    """Write report.json, report.md and report.png: mean, sd, n and 95 % interval per row,
    and paired comparisons with the baseline row."""
    from benchmarks.study.report import write_report

    written, note = write_report(study_dir)
    console.print(f"wrote {', '.join(map(str, written))}", soft_wrap=True)
    if note:
        err_console.print(styled("note:", "yellow", note), soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
