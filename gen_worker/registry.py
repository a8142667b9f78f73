"""What a generator model profile is, and how plug-in profiles are found.

A :class:`GenProfile` names a profile (``GENSEG_MODELS``), the function that builds or
loads its pipelines, and the image size its models were trained at, if they only draw
that one. The built-in profiles (``tiny``, ``random``, ``pretrained``) are in
:mod:`gen_worker.profiles`; any installed package may add more through the entry-point
group :data:`ENTRY_POINT_GROUP`, each entry a :class:`GenProfile` object named like
the profile, e.g. in its ``pyproject.toml``::

    [project.entry-points."genseg.gen_profiles"]
    mine = "my_package.profiles:GEN_PROFILE"

This module imports no model library (torch, diffusers): a plug-in module that
defines both a generator and a segmenter profile imports it in the segmenter worker
too, which should not pay for diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plumbing import plugins

if TYPE_CHECKING:
    import torch

    from gen_worker.profiles import RuntimeOptions
    from plumbing.settings import Settings

#: The entry-point group of generator profile plug-ins.
ENTRY_POINT_GROUP = "genseg.gen_profiles"


@dataclass(frozen=True)
class GenPipelines:
    """What a profile's loader returns: the text-to-image pipeline (on the CPU, in the
    asked dtype) and how to get the inpainting one, with the names events report."""

    #: ``image-ready.model`` of text-to-image results.
    name: str
    #: A ``StableDiffusionPipeline`` (typed loosely to keep diffusers out of this module).
    txt2img: Any
    #: ``image-ready.model`` of inpainting results.
    inpaint_name: str
    #: Builds the ``StableDiffusionInpaintPipeline`` on the first inpaint request.
    inpaint_loader: Callable[[], Any]
    #: The pipelines that draw the views of multi-view scene requests (text-to-image
    #: events with a ``scene`` block), when the profile has a generator of its own for
    #: them (the toy profile's, trained on its 3D world); None: ``txt2img`` draws them.
    scene: GenPipelines | None = None


#: ``load(settings, options, dtype)``: build or load a profile's pipelines.
Loader = Callable[["Settings", "RuntimeOptions", "torch.dtype"], GenPipelines]


@dataclass(frozen=True)
class GenProfile:
    """A generator model profile."""

    name: str
    load: Loader
    #: ``(width, height)`` in pixels when the models draw only that size (trained at it);
    #: the worker refuses other sizes. None: any size the contract allows.
    native_size: tuple[int, int] | None = None


def plugin_names() -> list[str]:
    """Names of the profiles installed packages declare (none is imported)."""
    return plugins.plugin_names(ENTRY_POINT_GROUP)


def load_plugin(name: str) -> GenProfile | None:
    """The plug-in profile ``name`` (its module imported now), or None if none is declared."""
    return plugins.load_plugin(ENTRY_POINT_GROUP, name, GenProfile, "generator profile")


__all__ = [
    "ENTRY_POINT_GROUP",
    "GenPipelines",
    "GenProfile",
    "Loader",
    "load_plugin",
    "plugin_names",
]
