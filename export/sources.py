"""Where a model comes from, checked before anything is loaded: one clear line for a hub id the hub cannot
be reached for, or a model folder of a kind ti2i does not export (instead of minutes of retries or a
traceback from inside diffusers)."""

from __future__ import annotations

from pathlib import Path

from ti2i.errors import InvalidInputError, ModelNotFoundError

HUB_TIMEOUT_S = 10.0


def check_reachable(model: str, probe_file: str = "model_index.json") -> None:
    """A local folder, a hub id already in the local cache (`probe_file` is there), or a hub id the hub
    answers for."""
    folder = Path(model).expanduser()
    if folder.exists():
        if probe_file == "model_index.json" and not (folder / probe_file).is_file():
            raise ModelNotFoundError(f"model {model!r} is not a diffusers model folder: it has no model_index.json")
        return
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r}: no such folder (and not a hub id of the form owner/name)")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(model, probe_file), str):
        return
    try:
        huggingface_hub.model_info(model, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelNotFoundError(f"model {model!r} is gated on the Hugging Face hub: accept its terms there and "
                                 f"set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {model!r} on the Hugging Face hub (or it is private: set HF_TOKEN)") \
            from None
    except Exception as err:  # no network, DNS, a proxy, offline mode: the hub is out of reach
        raise ModelNotFoundError(
            f"model {model!r} is not a local folder and the Hugging Face hub cannot be reached "
            f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'no answer'}): download it "
            f"where there is a network (`hf download {model} --local-dir DIR`) and pass DIR") from None


def check_exportable(model: str, index: dict, unet: dict | None) -> None:
    """A UNet pipeline of the SD 1.x/2.x, SDXL or SVD families (`index`: model_index.json; `unet`: its UNet's
    config, None when it has none)."""
    pipeline = index.get("_class_name", "an unknown pipeline")
    if unet is None:
        raise InvalidInputError(f"model {model!r} is a {pipeline} without a UNet: ti2i exports SD 1.x/2.x (text-to-"
                                f"image, InstructPix2Pix, inpainting, with a motion adapter), SDXL and Stable "
                                f"Video Diffusion models")
    if unet.get("addition_embed_type") == "text_time":
        if not (index.get("text_encoder") or [None])[0]:  # a refiner: the second text encoder only
            if unet.get("in_channels") != 4 or not index.get("text_encoder_2"):
                raise InvalidInputError(f"model {model!r} ({pipeline}) has no first text encoder, but is not an SDXL "
                                        f"refiner (4 channels, the second encoder)")
            return
        if index.get("requires_aesthetics_score"):
            raise InvalidInputError(f"model {model!r} conditions on aesthetic scores ({pipeline}), as SDXL refiners "
                                    f"do: ti2i exports SDXL base models (and Turbo, InstructPix2Pix, inpainting) only")
