"""Attribute-edit accuracy by the AttGAN / STGAN protocol.

For every image and every evaluated attribute, flip the attribute (the label swap
for conditional models, the concept vector for unconditional ones), decode, and
ask the attribute classifier. Edit accuracy is how often it reads the flipped
value; preservation is how often the other evaluated attributes keep the value it
reads on the unedited reconstruction; the pixel distance says how much the image
had to change. The classifier's own accuracy on the real split is reported
beside it, so readers know the ruler.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.metric import BenchContext, Metric, register_metric
from zoo.data.cache import image_progress
from zoo.errors import ZooError
from zoo.latent import (
    Concept,
    compute_concept,
    concept_path,
    decode,
    encode_means,
    file_digest,
    load_concept,
    load_split,
    save_concept,
)

# The 13 attributes of the AttGAN / STGAN edit benchmarks on CelebA.
ATTGAN_ATTRIBUTES = (
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
    "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young",
)  # fmt: skip


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
    """The stored concept vector, or one computed on the model's training split and stored."""
    path = concept_path(context.checkpoint, attribute)
    if path.is_file():
        concept = load_concept(context.checkpoint, attribute, context.model)
        if concept.checkpoint_digest == file_digest(context.checkpoint):
            return concept
    train = context.shared(
        f"train-split:{context.checkpoint}",
        lambda: load_split(context.info, context.settings.data, "train"),
    )
    concept = compute_concept(context.model, train, attribute, context.info)
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
    flipped: torch.Tensor,
    vectors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per attribute: summed (edit success, preservation, pixel L1) over one batch of images."""
    model, strength = context.model, context.settings.edit_strength
    column = {name: classifier.attr_names.index(name) for name in names}
    z = encode_means(model, images, labels)
    reconstruction = decode(model, z, labels)
    before = classifier.predict(reconstruction)
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    for i, name in enumerate(names):
        if model.conditional:
            new_labels = labels.clone()
            new_labels[:, context.info.attr_names.index(name)] = flipped[:, i].to(labels)
            edited = decode(model, z, new_labels)
        else:
            direction = (2 * flipped[:, i] - 1)[:, None] * strength * vectors[name]
            edited = decode(model, z + direction, None)
        after = classifier.predict(edited)
        others = [column[other] for other in names if other != name]
        sums[i, 0] = (after[:, column[name]] == flipped[:, i]).sum()
        if others:
            sums[i, 1] = (after[:, others] == before[:, others]).float().mean(dim=1).sum()
        sums[i, 2] = (edited - reconstruction).abs().mean(dim=(1, 2, 3)).sum()
    return sums


@register_metric("edit")
class EditAccuracy(Metric):
    """Flip each attribute, decode, classify: accuracy, preservation and pixel distance."""

    title = "Edit accuracy"

    def compute(self, context: BenchContext) -> dict[str, Any]:
        from benchmarks.classifier import evaluate_classifier

        classifier, classifier_info = context.classifier()
        model, strength = context.model.eval(), context.settings.edit_strength
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
                flipped = 1.0 - targets[index]
                totals += score_edits(context, classifier, names, images, labels, flipped, vectors)
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
        return {
            "n": context.count,
            "attributes": names,
            "method": "label swap" if model.conditional else f"concept vector x{strength:g}",
            "mean": dict(
                zip(("accuracy", "preservation", "pixel_l1"), means.mean(0).tolist(), strict=True)
            ),
            "per_attribute": per_attribute,
            "classifier": {
                "path": str(classifier_info.path),
                "backbone": classifier_info.backbone,
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

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {
            "edit acc": f"{result['mean']['accuracy']:.3f}",
            "preserve": f"{result['mean']['preservation']:.3f}",
            "clf bal acc": f"{result['classifier']['mean_balanced_accuracy']:.3f}",
        }
