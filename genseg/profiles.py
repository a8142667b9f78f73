"""What a request gets, per model profile (``GENSEG_MODELS``), when the user does not say.

One table for the application: ``genseg submit`` takes the image size from it, the
demos take size, steps and the mask filter. The workers know nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import PromptEvent

#: The contract's image side when a request does not give one (512).
CONTRACT_SIZE: int = PromptEvent.model_fields["width"].default


@dataclass(frozen=True)
class ProfileDefaults:
    #: The only side the profile's models draw (they were trained at it); None: any.
    native_size: int | None
    #: The demo's image side: tiny models are random, so small is honest and fast.
    demo_size: int
    #: The demo's denoising steps.
    demo_steps: int
    #: The demo's mask filter. Random SAM weights never predict an IoU near the
    #: contract's 0.8, so their demo keeps every mask (each kind of output is shown, and
    #: the demo says so); trained models keep the contract's default.
    demo_min_confidence: float


PROFILES: dict[str, ProfileDefaults] = {
    "tiny": ProfileDefaults(native_size=None, demo_size=128, demo_steps=20, demo_min_confidence=0),
    "toy": ProfileDefaults(native_size=64, demo_size=64, demo_steps=25, demo_min_confidence=0.8),
    "random": ProfileDefaults(None, demo_size=512, demo_steps=25, demo_min_confidence=0),
    "pretrained": ProfileDefaults(None, demo_size=512, demo_steps=25, demo_min_confidence=0.8),
}


#: A profile this table does not know (a plug-in's): the contract's defaults.
UNKNOWN = ProfileDefaults(None, demo_size=CONTRACT_SIZE, demo_steps=25, demo_min_confidence=0.8)


def profile_defaults(profile: str) -> ProfileDefaults:
    return PROFILES.get(profile, UNKNOWN)


def request_size(profile: str) -> int:
    """The image side ``genseg submit`` asks for: the profile's native size if it has
    one (the toy draws 64x64 only), else the contract's default."""
    return profile_defaults(profile).native_size or CONTRACT_SIZE
