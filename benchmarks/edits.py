"""Attribute-edit accuracy by the AttGAN / STGAN protocol.

For every image and every evaluated attribute, flip the attribute (the label swap
for conditional models, the concept vector for unconditional ones), decode, and
ask the attribute classifier. Edit accuracy is how often it reads the flipped
value; preservation is how often the other evaluated attributes, except those the edit
clears, keep the value it reads on the unedited reconstruction; the pixel distance says how
much the image had to change. As in AttGAN, setting an attribute also clears the ones CelebA
says cannot hold with it (another hair colour, No_Beard for Mustache, ...), and the label
change can be scaled by an edit intensity.

A panel of rulers scores every edit, not one: classifiers that differ in architecture,
seed, class weighting or augmentation (`zoo train-classifier`). Each ruler's edit accuracy
and preservation are reported, with their mean over the panel and the **agreement**: the
share of edits that every ruler reads as done. Agreement is the headline edit accuracy
because it is the one statistic a change that only one ruler family reads (a faint texture
one architecture is sensitive to) cannot raise; the mean can be raised by one lenient ruler.
Preservation is the mean over the panel. Each ruler's balanced accuracy on the same split is
reported beside every attribute, and the agreed accuracy is also given over the attributes
every ruler reads reliably (balanced accuracy >= `TRUSTED_RULER`).

The edit intensity is the option ``edit.intensity`` (alias ``--edit-intensity``) when
given, else the per-attribute intensities `zoo tune-edits` chose on a validation split
(``edit_intensity.json`` beside the checkpoint), else 1. Intensities tuned with a ruler were
chosen against it, so that ruler never scores them (nor a copy of it: rulers are identified
by the sha256 of their weights), and they are never scored on the split they were tuned on.
Conditional models also get a picture: a few images with each attribute flipped alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.metric import BenchContext, Metric, option, register_metric
from zoo.data import checkpoint_data
from zoo.errors import ZooError
from zoo.figures import flip_figure
from zoo.files import atomic_write_text
from zoo.latent import (
    ATTGAN_ATTRIBUTES,
    Concept,
    compute_concept,
    concept_path,
    decode,
    encode_means,
    faces_from_split,
    file_digest,
    load_concept,
    save_concept,
    scale_edit,
    with_attribute,
)
from zoo.progress import image_progress

log = logging.getLogger(__name__)

TRUSTED_RULER = 0.8  # ruler balanced accuracy from which an attribute's edit score is trusted
FIGURE_FACES = 6  # images in the picture of single-attribute edits
INTENSITY_FILE = "edit_intensity.json"  # per-attribute intensities from `zoo tune-edits`
INTENSITY_FORMAT = "zoo-edit-intensity/1"
MAX_INTENSITY = 10.0
MAX_INTENSITY_BYTES = 1024 * 1024  # a tuned file is a few kB; anything larger is not zoo's


def edited_attributes(context: BenchContext, rulers: list[tuple[Any, Any]]) -> list[str]:
    """The 13 AttGAN attributes the data, model and every ruler share (all, on synthetic
    faces)."""
    available = [
        name
        for name in context.data.attr_names
        if all(name in classifier.attr_names for classifier, _ in rulers)
        and (name in context.info.attr_names or not context.model.conditional)
    ]
    if context.data.name == "synthetic-faces":
        return available
    chosen = [name for name in ATTGAN_ATTRIBUTES if name in available]
    if not chosen:
        raise ZooError(
            f"none of the AttGAN edit attributes ({', '.join(ATTGAN_ATTRIBUTES[:4])}, ...) is "
            f"shared by the data at {context.data.root}, the model and every classifier"
        )
    return chosen


def bench_concept(context: BenchContext, attribute: str) -> Concept:
    """The stored concept vector if it was computed on the training split of this checkpoint,
    else one computed on the training split.

    A vector averaged over valid, test or all has seen the images the benchmark edits, so it
    is not used (nor is one whose file records no split); it is left in place for ``zoo edit``
    and the benchmark says so. A missing or outdated vector is replaced by the new one.
    """
    path = concept_path(context.checkpoint, attribute)
    stored = load_concept(context.checkpoint, attribute, context.model) if path.is_file() else None
    current = stored is not None and stored.checkpoint_digest == file_digest(context.checkpoint)
    if current and stored.split == "train":
        return stored
    train = context.memo.get(
        "train-split",
        str(context.checkpoint),
        build=lambda: checkpoint_data(context.info, "train", source=context.data.source),
    )
    concept = compute_concept(context.model, train, attribute, context.info)
    if current:
        made_on = (
            f"was computed on the {stored.split} split" if stored.split else "records no split"
        )
        log.warning(
            "%s %s, so it may hold images the benchmark edits: using one computed on the "
            "train split instead (not stored; zoo concept %s --attr %s stores one)",
            path,
            made_on,
            context.checkpoint,
            attribute,
        )
    else:
        save_concept(path, concept)
    return concept


# -- edit intensities --------------------------------------------------------------------------


@dataclass
class Intensities:
    """The scale of each attribute's edit, and where it came from."""

    values: dict[str, float]
    source: str  # "--edit-intensity", "default" or the tuned file's path
    tuned: dict[str, Any] | None = None  # the tuned file's record


def intensity_path(checkpoint: Path) -> Path:
    return Path(checkpoint).parent / INTENSITY_FILE


def _valid_intensity(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_INTENSITY
    )


def read_tuned_intensities(checkpoint: Path) -> dict[str, Any] | None:
    """The record `zoo tune-edits` wrote beside ``checkpoint``, or None without one; a file
    that is not one is refused in one line (delete it or run zoo tune-edits again)."""
    path = intensity_path(checkpoint)
    fix = f"delete it or run zoo tune-edits {checkpoint} again"
    try:
        if path.stat().st_size > MAX_INTENSITY_BYTES:
            raise ZooError(f"{path} is far larger than a tuned-intensity file; {fix}")
        record = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ZooError(f"{path} is not readable JSON ({type(error).__name__}); {fix}") from None
    if not isinstance(record, dict):
        record = {}
    rulers, intensities = record.get("rulers"), record.get("intensities")
    if (
        record.get("format") != INTENSITY_FORMAT
        or not isinstance(record.get("split"), str)
        or not isinstance(record.get("checkpoint_sha256"), str)
        or not isinstance(rulers, list)
        or not all(isinstance(r, dict) and isinstance(r.get("weights_sha256"), str) for r in rulers)
        or not isinstance(intensities, dict)
        or not all(isinstance(k, str) and _valid_intensity(v) for k, v in intensities.items())
    ):
        raise ZooError(
            f"{path} is not a {INTENSITY_FORMAT} file (intensities must be numbers in "
            f"(0, {MAX_INTENSITY:g}], and the rulers that chose them must be listed); {fix}"
        )
    return record


def edit_intensities(context: BenchContext, names: list[str]) -> Intensities:
    """The option ``edit.intensity`` (alias ``--edit-intensity``) for every attribute when
    given; else the tuned intensities beside the checkpoint if they were tuned for this very
    file (an attribute it lacks gets 1); else 1 everywhere."""
    value = context.options(EditAccuracy).intensity
    if value is not None:
        return Intensities(dict.fromkeys(names, value), "--edit-intensity")
    record = read_tuned_intensities(context.checkpoint)
    if record is None:
        return Intensities(dict.fromkeys(names, 1.0), "default")
    path = intensity_path(context.checkpoint)
    if record["checkpoint_sha256"] != file_digest(context.checkpoint):
        log.warning(
            "%s was tuned for an earlier version of %s: using intensity 1; run zoo tune-edits "
            "again to tune this one",
            path,
            context.checkpoint,
        )
        return Intensities(dict.fromkeys(names, 1.0), "default")
    tuned = record["intensities"]
    return Intensities({name: float(tuned.get(name, 1.0)) for name in names}, str(path), record)


def check_independent(intensities: Intensities, rulers: list[tuple[Any, Any]], split: str) -> None:
    """Refuse to score tuned intensities with a ruler that chose them, or on their own split."""
    record = intensities.tuned
    if record is None:
        return
    tuners = {ruler["weights_sha256"] for ruler in record["rulers"]}
    for _, info in rulers:
        if info.weights_sha256 in tuners:
            raise ZooError(
                f"the ruler {info.path} (weights sha256 {info.weights_sha256[:12]}) chose this "
                f"model's edit intensities ({intensities.source}), so it cannot score them; pass "
                "--classifier files that did not tune it, or --edit-intensity 1"
            )
    if record["split"] == split:
        raise ZooError(
            f"the edit intensities in {intensities.source} were tuned on the {split} split, the "
            f"one being scored; benchmark another split (--split test) or pass --edit-intensity 1"
        )


# -- scoring -----------------------------------------------------------------------------------


def score_edits(
    context: BenchContext,
    rulers: list[Any],
    names: list[str],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    truth: torch.Tensor,
    intensities: dict[str, float],
    vectors: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Sums over one batch of images: per ruler and attribute, edit successes and preservation
    (R x A), edits every ruler read (A) and pixel L1 to the reconstruction (A).

    ``truth`` holds the data's labels of ``names``. Preservation is read over the other
    attributes the edit keeps: one that setting the attribute clears (Black_Hair when a face
    is made blond) is meant to change, so it does not count against the edit.
    """
    model = context.model
    strength = context.options(EditAccuracy).strength
    columns = [[ruler.attr_names.index(name) for name in names] for ruler in rulers]
    flipped = 1.0 - truth
    z = encode_means(model, images, labels)
    reconstruction = decode(model, z, labels)
    pairs = list(zip(rulers, columns, strict=True))
    before = [ruler.predict(reconstruction)[:, cols] for ruler, cols in pairs]
    sums = {
        "accuracy": torch.zeros(len(rulers), len(names), dtype=torch.float64),
        "preservation": torch.zeros(len(rulers), len(names), dtype=torch.float64),
        "agreed": torch.zeros(len(names), dtype=torch.float64),
        "pixel_l1": torch.zeros(len(names), dtype=torch.float64),
    }
    for i, name in enumerate(names):
        if model.conditional:
            attr_names = context.info.attr_names
            new_labels = with_attribute(labels, name, flipped[:, i].to(labels), attr_names)
            edited = decode(model, z, scale_edit(labels, new_labels, intensities[name]))
        else:
            scale = strength * intensities[name]
            direction = (2 * flipped[:, i] - 1)[:, None] * scale * vectors[name]
            edited = decode(model, z + direction, None)
        kept = with_attribute(truth, name, flipped[:, i], names) == truth
        kept[:, i] = False
        read_by_all = torch.ones(len(images), dtype=torch.bool)
        for r, (ruler, cols) in enumerate(pairs):
            after = ruler.predict(edited)[:, cols]
            done = after[:, i] == flipped[:, i]
            unchanged = (after == before[r]) & kept
            sums["accuracy"][r, i] = done.sum()
            sums["preservation"][r, i] = (unchanged.sum(1) / kept.sum(1).clamp(min=1)).sum()
            read_by_all &= done
        sums["agreed"][i] = read_by_all.sum()
        sums["pixel_l1"][i] = (edited - reconstruction).abs().mean(dim=(1, 2, 3)).sum()
    return sums


def panel_scores(
    context: BenchContext,
    rulers: list[Any],
    names: list[str],
    intensities: dict[str, float],
    vectors: dict[str, torch.Tensor],
    description: str,
) -> dict[str, torch.Tensor]:
    """`score_edits` over the benchmark's images, as means (each sum divided by the count)."""
    targets = context.data.attrs[:, [context.data.attr_names.index(n) for n in names]]
    totals: dict[str, torch.Tensor] = {}
    with image_progress(description, context.count, context.settings.progress) as advance:
        for index, images, labels in context.batches():
            sums = score_edits(
                context, rulers, names, images, labels, targets[index], intensities, vectors
            )
            for key, value in sums.items():
                totals[key] = totals.get(key, 0) + value
            advance(len(index))
    return {key: value / context.count for key, value in totals.items()}


def concept_vectors(context: BenchContext, names: list[str]) -> dict[str, torch.Tensor]:
    """The concept vector of each attribute for unconditional models (none for conditional)."""
    if context.model.conditional:
        return {}
    return {name: bench_concept(context, name).vector for name in names}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _ruler_evaluation(context: BenchContext, classifier: Any, info: Any) -> dict[str, Any]:
    from benchmarks.classifier import evaluate_classifier

    return context.memo.get(
        "classifier-evaluation",
        str(info.path),
        context.data.fingerprint,
        context.data.split,
        build=lambda: evaluate_classifier(classifier, context.data),
    )


@register_metric("edit")
class EditAccuracy(Metric):
    """Flip each attribute, decode, let a panel of rulers read it: agreed and per-ruler edit
    accuracy, preservation and pixel distance."""

    title = "Edit accuracy"

    @dataclass(frozen=True)
    class Options:
        strength: float = option(
            1.0, "Concept-vector multiplier of unconditional models' edits (z + s * v)."
        )
        intensity: float | None = option(
            None,
            "Scale of every edit: label change or concept shift (none: the zoo tune-edits "
            "intensities beside the checkpoint, else 1).",
        )

    def compute(self, context: BenchContext) -> dict[str, Any]:
        from benchmarks.classifier import ruler_record

        options = context.options(self)
        rulers = context.rulers()
        model = context.model.eval()
        names = edited_attributes(context, rulers)
        intensities = edit_intensities(context, names)
        check_independent(intensities, rulers, context.data.split)
        means = panel_scores(
            context,
            [classifier for classifier, _ in rulers],
            names,
            intensities.values,
            concept_vectors(context, names),
            f"{model.model_name}: editing {len(names)} attributes, {len(rulers)} ruler(s)",
        )
        evaluations = [_ruler_evaluation(context, *ruler) for ruler in rulers]
        per_attribute = {
            name: {
                "accuracy": means["agreed"][i].item(),
                "accuracy_mean": means["accuracy"][:, i].mean().item(),
                "accuracy_per_ruler": means["accuracy"][:, i].tolist(),
                "preservation": means["preservation"][:, i].mean().item(),
                "preservation_per_ruler": means["preservation"][:, i].tolist(),
                "pixel_l1": means["pixel_l1"][i].item(),
                "intensity": intensities.values[name],
                "ruler_balanced_accuracy": [e["balanced_accuracy"][name] for e in evaluations],
            }
            for i, name in enumerate(names)
        }
        trusted = [
            name
            for name in names
            if min(per_attribute[name]["ruler_balanced_accuracy"]) >= TRUSTED_RULER
        ]
        if model.conditional:
            faces = faces_from_split(
                context.info, context.data, indices=list(range(min(FIGURE_FACES, context.count)))
            )
            figure = flip_figure(model, faces, names, intensity=intensities.values)
            context.figures.append(("edits", figure))
        method = "label swap" if model.conditional else f"concept vector x{options.strength:g}"
        return {
            "n": context.count,
            "attributes": names,
            "method": method,
            "intensity": {
                "source": intensities.source,
                "tuned_on": intensities.tuned["split"] if intensities.tuned else None,
                "values": intensities.values,
            },
            "statistic": "accuracy: share of edits every ruler reads as done (agreement); "
            "accuracy_mean: mean over rulers; preservation: mean over rulers",
            "mean": {
                "accuracy": means["agreed"].mean().item(),
                "accuracy_mean": means["accuracy"].mean().item(),
                "accuracy_per_ruler": means["accuracy"].mean(1).tolist(),
                "preservation": means["preservation"].mean().item(),
                "preservation_per_ruler": means["preservation"].mean(1).tolist(),
                "pixel_l1": means["pixel_l1"].mean().item(),
            },
            "trusted_ruler": {
                "threshold": TRUSTED_RULER,
                "attributes": trusted,
                **{
                    f"mean_{key}": _mean([per_attribute[n][key] for n in trusted])
                    if trusted
                    else None
                    for key in ("accuracy", "preservation")
                },
            },
            "per_attribute": per_attribute,
            "rulers": [
                {
                    **ruler_record(info),
                    "split": evaluation["split"],
                    "n": evaluation["n"],
                    "mean_accuracy": _mean([evaluation["accuracy"][n] for n in names]),
                    "mean_balanced_accuracy": _mean(
                        [evaluation["balanced_accuracy"][n] for n in names]
                    ),
                    "accuracy": {n: evaluation["accuracy"][n] for n in names},
                    "balanced_accuracy": {n: evaluation["balanced_accuracy"][n] for n in names},
                }
                for (_, info), evaluation in zip(rulers, evaluations, strict=True)
            ],
        }

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        mean = result["mean"]
        return {"edit acc": mean["accuracy"], "preservation": mean["preservation"]}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        trusted, mean = result["trusted_ruler"], result["mean"]
        return {
            "edit acc": f"{mean['accuracy']:.3f}",
            "edit acc (ruler mean)": f"{mean['accuracy_mean']:.3f}",
            f"edit acc (rulers >= {trusted['threshold']:g})": (
                f"{trusted['mean_accuracy']:.3f} ({len(trusted['attributes'])})"
                if trusted["attributes"]
                else "-"
            ),
            "preserve": f"{mean['preservation']:.3f}",
            "rulers": str(len(result["rulers"])),
        }


# -- tuning ------------------------------------------------------------------------------------


def tune_intensities(
    context: BenchContext, grid: list[float], min_preservation: float
) -> dict[str, Any]:
    """Per attribute, the intensity of ``grid`` whose edits the panel agrees on most while the
    panel's mean preservation stays at least ``min_preservation`` (ties: the smaller one; when
    none keeps it, the smallest); the record `edit_intensities` reads, with every score."""
    from benchmarks.classifier import ruler_record

    if not grid or not all(_valid_intensity(value) for value in grid):
        raise ZooError(f"intensities must be numbers in (0, {MAX_INTENSITY:g}], got {grid}")
    grid = sorted(set(grid))
    rulers = context.rulers()
    names = edited_attributes(context, rulers)
    vectors = concept_vectors(context, names)
    classifiers = [classifier for classifier, _ in rulers]
    table: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for value in grid:
        means = panel_scores(
            context,
            classifiers,
            names,
            dict.fromkeys(names, value),
            vectors,
            f"{context.model.model_name}: intensity {value:g}, {len(rulers)} ruler(s)",
        )
        for i, name in enumerate(names):
            table[name].append(
                {
                    "intensity": value,
                    "accuracy": means["agreed"][i].item(),
                    "preservation": means["preservation"][:, i].mean().item(),
                }
            )
    chosen = {}
    for name, rows in table.items():
        keeping = [row for row in rows if row["preservation"] >= min_preservation] or rows[:1]
        chosen[name] = max(keeping, key=lambda row: (row["accuracy"], -row["intensity"]))
    return {
        "format": INTENSITY_FORMAT,
        "checkpoint": str(context.checkpoint),
        "checkpoint_sha256": file_digest(context.checkpoint),
        "split": context.data.split,
        "data": context.data_record(),
        "grid": grid,
        "min_preservation": min_preservation,
        "rule": "per attribute, the intensity the panel agrees on most with mean preservation "
        ">= min_preservation (ties: the smaller; none: the smallest)",
        "rulers": [ruler_record(info) for _, info in rulers],
        "intensities": {name: row["intensity"] for name, row in chosen.items()},
        "chosen": chosen,
        "table": table,
    }


def save_tuned_intensities(checkpoint: Path, record: dict[str, Any]) -> Path:
    path = intensity_path(checkpoint)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
