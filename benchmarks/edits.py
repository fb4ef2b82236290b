"""Attribute-edit accuracy by the AttGAN / STGAN protocol.

For every image and every evaluated attribute, flip the attribute (the label swap
for conditional models, the concept vector for unconditional ones), decode, and
ask the attribute classifier. Edit accuracy is how often it reads the flipped
value; preservation is how often the other evaluated attributes, except those the edit
clears, keep the value it reads on the unedited reconstruction; the pixel distance says how
much the image had to change. As in AttGAN, setting an attribute also clears the ones CelebA
says cannot hold with it (another hair colour, No_Beard for Mustache, ...), and the label
change can be scaled by an edit intensity.

The classifier's own balanced accuracy on the same split is reported beside every
attribute, and the mean edit accuracy is given twice: over all edited attributes,
and over those the ruler reads reliably (balanced accuracy >= `TRUSTED_RULER`), so
readers know which numbers to trust. Conditional models also get a picture: a few
images with each attribute flipped alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from benchmarks.metric import BenchContext, Metric, register_metric
from zoo.data import checkpoint_data
from zoo.data.cache import image_progress
from zoo.errors import ZooError
from zoo.figures import flip_figure
from zoo.latent import (
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

log = logging.getLogger(__name__)

# The 13 attributes of the AttGAN / STGAN edit benchmarks on CelebA.
ATTGAN_ATTRIBUTES = (
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
    "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young",
)  # fmt: skip
TRUSTED_RULER = 0.8  # ruler balanced accuracy from which an attribute's edit score is trusted
FIGURE_FACES = 6  # images in the picture of single-attribute edits


def edited_attributes(context: BenchContext, classifier_names: list[str]) -> list[str]:
    """The 13 AttGAN attributes the data, model and classifier share (all, on synthetic faces)."""
    available = [
        name
        for name in context.data.attr_names
        if name in classifier_names
        and (name in context.info.attr_names or not context.model.conditional)
    ]
    if context.data.name == "synthetic-faces":
        return available
    chosen = [name for name in ATTGAN_ATTRIBUTES if name in available]
    if not chosen:
        raise ZooError(
            f"none of the AttGAN edit attributes ({', '.join(ATTGAN_ATTRIBUTES[:4])}, ...) is "
            f"shared by the data at {context.data.root}, the model and the classifier"
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
    train = context.shared(
        f"train-split:{context.checkpoint}",
        lambda: checkpoint_data(context.info, "train", source=context.data.source),
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


def _mean(values: dict[str, float], names: list[str]) -> float:
    return sum(values[name] for name in names) / len(names)


def score_edits(
    context: BenchContext,
    classifier: Any,
    names: list[str],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    truth: torch.Tensor,
    vectors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per attribute: summed (edit success, preservation, pixel L1) over one batch of images.

    ``truth`` holds the data's labels of ``names``. Preservation is read over the other
    attributes the edit keeps: one that setting the attribute clears (Black_Hair when a face
    is made blond) is meant to change, so it does not count against the edit.
    """
    model, settings = context.model, context.settings
    columns = [classifier.attr_names.index(name) for name in names]
    flipped = 1.0 - truth
    z = encode_means(model, images, labels)
    reconstruction = decode(model, z, labels)
    before = classifier.predict(reconstruction)
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    for i, name in enumerate(names):
        if model.conditional:
            attr_names = context.info.attr_names
            new_labels = with_attribute(labels, name, flipped[:, i].to(labels), attr_names)
            edited = decode(model, z, scale_edit(labels, new_labels, settings.edit_intensity))
        else:
            scale = settings.edit_strength * settings.edit_intensity
            direction = (2 * flipped[:, i] - 1)[:, None] * scale * vectors[name]
            edited = decode(model, z + direction, None)
        after = classifier.predict(edited)
        kept = with_attribute(truth, name, flipped[:, i], names) == truth
        kept[:, i] = False
        unchanged = (after[:, columns] == before[:, columns]) & kept
        sums[i, 0] = (after[:, columns[i]] == flipped[:, i]).sum()
        sums[i, 1] = (unchanged.sum(dim=1) / kept.sum(dim=1).clamp(min=1)).sum()
        sums[i, 2] = (edited - reconstruction).abs().mean(dim=(1, 2, 3)).sum()
    return sums


@register_metric("edit")
class EditAccuracy(Metric):
    """Flip each attribute, decode, classify: accuracy, preservation and pixel distance."""

    title = "Edit accuracy"

    def compute(self, context: BenchContext) -> dict[str, Any]:
        from benchmarks.classifier import evaluate_classifier

        classifier, classifier_info = context.classifier()
        model, settings = context.model.eval(), context.settings
        names = edited_attributes(context, classifier.attr_names)
        targets = context.data.attrs[:, [context.data.attr_names.index(n) for n in names]]
        vectors = (
            {}
            if model.conditional
            else {name: bench_concept(context, name).vector for name in names}
        )
        totals = torch.zeros(len(names), 3, dtype=torch.float64)
        description = f"{model.model_name}: editing {len(names)} attributes"
        with image_progress(description, context.count, context.settings.progress) as advance:
            for index, images, labels in context.batches():
                totals += score_edits(
                    context, classifier, names, images, labels, targets[index], vectors
                )
                advance(len(index))
        means = totals / context.count
        per_attribute = {
            name: {"accuracy": acc, "preservation": keep, "pixel_l1": l1}
            for name, (acc, keep, l1) in zip(names, means.tolist(), strict=True)
        }
        ruler = context.shared(
            f"classifier-eval:{classifier_info.path}:{context.data.fingerprint}:{context.data.split}",
            lambda: evaluate_classifier(classifier, context.data),
        )
        trusted = [name for name in names if ruler["balanced_accuracy"][name] >= TRUSTED_RULER]
        if model.conditional:
            faces = faces_from_split(
                context.info, context.data, indices=list(range(min(FIGURE_FACES, context.count)))
            )
            figure = flip_figure(model, faces, names, intensity=settings.edit_intensity)
            context.figures.append(("edits", figure))
        method = (
            "label swap" if model.conditional else f"concept vector x{settings.edit_strength:g}"
        )
        return {
            "n": context.count,
            "attributes": names,
            "method": method,
            "intensity": settings.edit_intensity,
            "mean": dict(
                zip(("accuracy", "preservation", "pixel_l1"), means.mean(0).tolist(), strict=True)
            ),
            "trusted_ruler": {
                "threshold": TRUSTED_RULER,
                "attributes": trusted,
                **{
                    f"mean_{key}": _mean({n: per_attribute[n][key] for n in trusted}, trusted)
                    if trusted
                    else None
                    for key in ("accuracy", "preservation")
                },
            },
            "per_attribute": per_attribute,
            "classifier": {
                "path": str(classifier_info.path),
                "backbone": classifier_info.backbone,
                "image_size": classifier_info.image_size,
                "split": ruler["split"],
                "n": ruler["n"],
                "mean_accuracy_all": ruler["mean_accuracy"],
                "mean_balanced_accuracy_all": ruler["mean_balanced_accuracy"],
                "mean_accuracy": _mean(ruler["accuracy"], names),
                "mean_balanced_accuracy": _mean(ruler["balanced_accuracy"], names),
                "accuracy": {name: ruler["accuracy"][name] for name in names},
                "balanced_accuracy": {name: ruler["balanced_accuracy"][name] for name in names},
            },
        }

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        mean = result["mean"]
        return {"edit acc": mean["accuracy"], "preservation": mean["preservation"]}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        trusted = result["trusted_ruler"]
        return {
            "edit acc": f"{result['mean']['accuracy']:.3f}",
            f"edit acc (ruler >= {trusted['threshold']:g})": (
                f"{trusted['mean_accuracy']:.3f} ({len(trusted['attributes'])})"
                if trusted["attributes"]
                else "-"
            ),
            "preserve": f"{result['mean']['preservation']:.3f}",
            "clf bal acc": f"{result['classifier']['mean_balanced_accuracy']:.3f}",
        }
