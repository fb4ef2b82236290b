"""`zoo demo`: a face-editing web page for one checkpoint, served on the loopback address.

Two tabs. **Edit**: pick a face of the checkpoint's data (or upload one), then one slider per
edit attribute (the 13 of the AttGAN protocol that the model has, or all of them), starting
at the face's own labels; the edited face follows the sliders (a label swap for conditional
models, the concept vectors beside the checkpoint for unconditional ones). **Generate**: new
faces from the prior with the attributes ticked on and the rest at the training data's most
common values. Gradio (the ``demo`` extra) serves it; nothing is fetched from the network:
analytics are off (``analytics_enabled=False`` and ``GRADIO_ANALYTICS_ENABLED``), the theme
uses Gradio's own bundled fonts, there is no share link, and the server listens on
127.0.0.1 only. The functions behind the page are its API too (``/edit``, ``/face``,
``/generate``), which ``gradio_client`` calls.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from zoo.errors import ZooError
from zoo.latent import (
    ATTGAN_ATTRIBUTES,
    Faces,
    decode,
    encode_means,
    faces_from_files,
    labels_for,
    load_concept,
)
from zoo.model import GenerativeModel

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GALLERY = 8  # faces per "generate"
SHOWN = 256  # least side of a face on the page, in screen pixels
SLIDER_RANGE = (-1.0, 2.0)  # 0 off, 1 on; beyond pushes the edit further (AttGAN's intensity)
EXTRA_ADVICE = "install the demo extra: pip install 'zoo[demo]'"


def _picture(image: torch.Tensor) -> np.ndarray:
    """C x H x W in [0, 1] -> H x W x 3 uint8, what Gradio shows: enlarged (each pixel a
    block) to at least ``SHOWN`` px, so a 64 px face is not a thumbnail."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    scale = max(1, -(-SHOWN // pixels.shape[-1]))
    pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return pixels.permute(1, 2, 0).contiguous().numpy()


@dataclass
class Editor:
    """What the page computes, without Gradio: so it is tested and timed on its own."""

    model: GenerativeModel
    faces: Faces | None  # the data's faces to pick from; None when the data is not on disk
    attributes: list[str]

    def face(self, choice: str | None, upload: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, labels) of the uploaded file if any, else of the chosen data face."""
        info = self.model.checkpoint_info
        if upload:
            faces = faces_from_files([upload], info)
        elif self.faces is not None and choice in self.faces.names:
            i = self.faces.names.index(choice)
            attrs = None if self.faces.attrs is None else self.faces.attrs[i : i + 1]
            faces = Faces(self.faces.images[i : i + 1], attrs, [choice])
        else:
            raise ZooError("pick a face from the list or upload an image")
        labels = labels_for(faces, info, {}) if info.attr_names else torch.zeros(1, 0)
        return faces.images, labels

    def start(self, choice: str | None, upload: str | None) -> list[Any]:
        """The face, its reconstruction and the sliders set to its own labels."""
        if not upload and self.faces is None:  # nothing to show until a face is uploaded
            return [None, None, *[0.0] * len(self.attributes)]
        image, y = self.face(choice, upload)
        names = self.model.checkpoint_info.attr_names
        values = [float(y[0, names.index(name)]) for name in self.attributes]
        return [_picture(image[0]), self.edit(choice, upload, *values), *values]

    def edit(self, choice: str | None, upload: str | None, *values: float) -> np.ndarray:
        """The face decoded with the sliders' labels (or concept vectors) in place of its own."""
        image, y = self.face(choice, upload)
        info = self.model.checkpoint_info
        names = info.attr_names
        if self.model.conditional:
            z = encode_means(self.model, image, y)
            new_y = y.clone()
            for name, value in zip(self.attributes, values, strict=True):
                new_y[0, names.index(name)] = float(value)
            return _picture(decode(self.model, z, new_y)[0])
        z = encode_means(self.model, image, None)
        for name, value in zip(self.attributes, values, strict=True):
            own = float(y[0, names.index(name)])
            if float(value) != own:  # slide from the face's own value, along the concept
                vector = load_concept(info.path, name, self.model).vector
                z = z + (float(value) - own) * vector.to(z)
        return _picture(decode(self.model, z, None)[0])

    def generate(self, ticked: list[str], seed: float) -> list[np.ndarray]:
        """New faces from the prior, with the ticked attributes on (conditional models)."""
        info = self.model.checkpoint_info
        generator = torch.Generator().manual_seed(int(seed))
        z = torch.randn(GALLERY, self.model.latent_dim, generator=generator)
        y = None
        if self.model.conditional:
            empty = Faces(torch.zeros(GALLERY, 1, 1, 1), None, [""] * GALLERY)
            y = labels_for(empty, info, dict.fromkeys(ticked, 1.0))
        return [_picture(image) for image in decode(self.model, z, y)]


def demo_attributes(model: GenerativeModel, all_attributes: bool) -> list[str]:
    """The sliders: the AttGAN 13 the model knows (all its attributes on request)."""
    names = model.checkpoint_info.attr_names
    chosen = list(names) if all_attributes else [a for a in ATTGAN_ATTRIBUTES if a in names]
    if not chosen:
        chosen = list(names)
    if not chosen:
        raise ZooError(f"{model.model_name}'s checkpoint names no attributes: nothing to edit")
    if not model.conditional:
        missing = [name for name in chosen if not _has_concept(model, name)]
        if missing:
            raise ZooError(
                f"{model.model_name} is unconditional, so its sliders need concept vectors; "
                f"compute them with: zoo concept {model.checkpoint_info.path} "
                + " ".join(f"--attr {name}" for name in missing)
            )
    return chosen


def _has_concept(model: GenerativeModel, name: str) -> bool:
    try:
        load_concept(model.checkpoint_info.path, name, model)
    except ZooError:
        return False
    return True


def build_app(editor: Editor) -> Any:
    """The Gradio Blocks of the page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ZooError(f"zoo demo needs Gradio; {EXTRA_ADVICE}") from None

    def shown(function: Any) -> Any:
        """The page shows a ZooError as its one line, not as Gradio's generic error."""

        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except ZooError as error:
                raise gr.Error(str(error)) from None

        return call

    model = editor.model
    choices = editor.faces.names if editor.faces is not None else []
    title = f"zoo: {model.model_name}"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nSliders: 0 off, 1 on; beyond pushes the edit further.")
        with gr.Tab("Edit"):
            with gr.Row():
                pick = gr.Dropdown(choices, value=choices[0] if choices else None, label="face")
                upload = gr.Image(type="filepath", label="or upload a face", sources=["upload"])
            with gr.Row():
                original = gr.Image(
                    label="original", interactive=False, height=256, elem_id="zoo-original"
                )
                edited = gr.Image(
                    label="edited", interactive=False, height=256, elem_id="zoo-edited"
                )
            sliders = [
                gr.Slider(*SLIDER_RANGE, value=0.0, step=0.05, label=name)
                for name in editor.attributes
            ]
        with gr.Tab("Generate"):
            ticked = gr.CheckboxGroup(editor.attributes, label="attributes on")
            seed = gr.Number(value=0, precision=0, label="seed")
            make = gr.Button("generate")
            gallery = gr.Gallery(label="samples", columns=GALLERY // 2, height=300)
        sources = [pick, upload]
        for trigger in (pick.change, upload.change, app.load):
            trigger(shown(editor.start), sources, [original, edited, *sliders], api_name=False)
        # `input`, not `change`: `change` also fires when `start` sets the sliders, and
        # that second, identical decode made Gradio rewrite the cached image in place
        # while the browser was still fetching it (a truncated image, never replaced)
        gr.on(
            [slider.input for slider in sliders],
            shown(editor.edit),
            [*sources, *sliders],
            edited,
            api_name="edit",
            trigger_mode="always_last",
        )
        make.click(shown(editor.generate), [ticked, seed], gallery, api_name="generate")
        gr.Button(visible=False).click(
            shown(editor.start), sources, [original, edited, *sliders], api_name="face"
        )
    return app


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def serve(editor: Editor, port: int, *, block: bool = True) -> Any:
    """Launch on 127.0.0.1:``port`` (0: a free one); with ``block=False`` return the app,
    whose ``local_url`` the caller reads and whose ``close()`` stops it."""
    app = build_app(editor)
    import gradio as gr

    app.launch(
        server_name=HOST,
        server_port=port or free_port(),
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        theme=gr.themes.Default(),  # its fonts are bundled with Gradio: no font CDN
    )
    return app
