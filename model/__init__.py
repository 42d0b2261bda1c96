"""Bora model core: STDiT, samplers, T5 text encoder, SD VAE and the pipeline, in PyTorch and diffusers.

Public API: `from model import STDiT, IDDPM, BoraPipeline, load_state_dict, clean_caption`. Names resolve on
first use, so importing a light submodule (`model.errors`, `model.presets`) does not load torch.
"""

from importlib import import_module

_PUBLIC = {
    "STDiT": "model.stdit",
    "IDDPM": "model.schedulers.iddpm",
    "BoraPipeline": "model.pipeline",
    "load_state_dict": "model.loading",
    "clean_caption": "model.text_preprocessing",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
