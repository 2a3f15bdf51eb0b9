"""Which served models each method calls, so a deployment can load only what its methods need."""

from __future__ import annotations

from collections.abc import Iterable

from ti2i.engines.ensembles import ENSEMBLES
from ti2i.errors import InvalidInputError

_IMAGE_EDIT = ("encode_prompt", "encode_image", "decode_image")

METHOD_MODELS: dict[str, tuple[str, ...]] = {
    "txt2img": ("encode_prompt", "decode_image", "unet"),
    "sdedit": (*_IMAGE_EDIT, "unet"),
    "cyclediffusion": (*_IMAGE_EDIT, "unet"),
    "ddib": (*_IMAGE_EDIT, "unet"),
    # the masked image is edited in pixels, then encoded: the ensemble's two steps are called one by one
    "inpaint": ("encode_prompt", "image_preprocess", "vae_encoder", "decode_image", "unet_inpaint"),
    "pix2pix": (*_IMAGE_EDIT, "unet_pix2pix"),
    "videoldm": (*_IMAGE_EDIT, "unet_motion"),
    "svd": ("image_encoder", "image_preprocess", "vae_encoder", "unet_svd", "vae_decoder_temporal",
            "image_postprocess"),
}


def components_for(methods: Iterable[str]) -> list[str]:
    """The components (ensembles expanded into their steps) the given methods call."""
    chains = {e.name: e.steps for e in ENSEMBLES}
    names: list[str] = []
    for method in methods:
        if method not in METHOD_MODELS:
            raise InvalidInputError(f"unknown method {method!r} (known: {', '.join(METHOD_MODELS)})")
        for model in METHOD_MODELS[method]:
            for component in chains.get(model, (model,)):
                if component not in names:
                    names.append(component)
    return names
