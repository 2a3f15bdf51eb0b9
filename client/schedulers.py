"""The scheduler names users may ask for: light, so the method records can list them without importing torch."""

from __future__ import annotations

from typing import Any

MODEL_SCHEDULER = "model"  # the scheduler the model folder ships
# Short names -> (diffusers class, settings over the model folder's config), as diffusers' docs map the names
# users know from other UIs; any diffusers scheduler class name is taken as well.
SCHEDULER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++sde-karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def scheduler_help() -> str:
    return (f"{MODEL_SCHEDULER} (the model folder's), {', '.join(SCHEDULER_NAMES)}, or a diffusers scheduler "
            f"class name")
