"""The events of the public contract (DESIGN.md Part 1) as pydantic v2 models.

Every model ignores unknown fields (forward compatibility) and carries a ``schema``
field naming its type and version. Units: sizes and boxes are in pixels of the
generated image, boxes are ``[x, y, w, h]`` with the origin at the top-left
corner, times are milliseconds.

Fields marked *addition* extend the contract additively; they are listed in
docs/contract.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_PROMPT = "genseg.prompt/v1"
SCHEMA_INPAINT = "genseg.inpaint/v1"
SCHEMA_IMAGE = "genseg.image/v1"
SCHEMA_MASKS = "genseg.masks/v1"
SCHEMA_ASSET = "genseg.asset/v1"
SCHEMA_PROGRESS = "genseg.progress/v1"
SCHEMA_DEAD_LETTER = "genseg.dead_letter/v1"
SCHEMA_SCENE = "genseg.scene/v1"
SCHEMA_DELETION = "genseg.deletion/v1"

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_PROMPT_CHARS = 2000
MAX_TARGETS = 10
DEAD_LETTER_VALUE_LIMIT = 64 * 1024

RequestId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
TenantId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
ViewName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
PromptPart = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)
]
#: *Addition.* Where the webhook dispatcher POSTs each image's terminal outcome. Only the
#: scheme is checked here; which hosts are allowed is the deployment's policy (SSRF
#: rules, checked by the gateway at submit time and by the dispatcher at delivery).
CallbackUrl = Annotated[
    str, StringConstraints(max_length=2048, pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s]+$")
]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
#: *Addition.* The exact weights a model ran with: ``sha256:<hex>`` (content hash of a
#: local checkpoint's weight files), ``commit:<hex>`` (a hub id's resolved commit),
#: ``seed:<n>`` (seeded random weights), ``weights-sha256:<hex>`` (hash of the loaded
#: tensors, for plug-in profiles).
Revision = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TargetName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Sampler = Literal["dpmpp_2m", "dpmpp_2m_karras", "euler_a", "ddim", "unipc"]
#: ``concept`` and ``attention+concept`` are *additions* (text-concept instance masks,
#: served by a segmenter running SAM 3; see docs/contract.md).
SegmentationMode = Literal["attention", "boxes", "points", "auto", "concept", "attention+concept"]
#: A LoRA adapter's name: one file or directory in the worker's ``GENSEG_LORA_DIR``.
LoraName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
MAX_LORAS = 10


class Event(BaseModel):
    """Base of every contract model: unknown fields are ignored, never fatal."""

    # allow_inf_nan=False: JSON has no NaN or Infinity (Python's json reads them, and
    # pydantic would write them back as null, which no longer validates).
    model_config = ConfigDict(
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        allow_inf_nan=False,
    )

    def to_json_bytes(self) -> bytes:
        """The record value: UTF-8 JSON without null-valued optional fields."""
        return self.model_dump_json(exclude_none=True).encode("utf-8")


class BlobRef(Event):
    """Claim-check reference to bytes in the blob store."""

    uri: str = Field(min_length=1, max_length=2048)
    sha256: Sha256Hex
    media_type: str = Field(min_length=1, max_length=255)
    bytes: int = Field(ge=0)


# --- request options ------------------------------------------------------------


class Point(Event):
    """A SAM point prompt in pixels; ``label`` 1 = foreground, 0 = background."""

    x: float = Field(ge=0)
    y: float = Field(ge=0)
    label: Literal[0, 1] = 1


BBox = Annotated[list[float], Field(min_length=4, max_length=4)]


class SegmentationOptions(Event):
    """How the segmenter finds objects. Defaults are the source article's."""

    mode: SegmentationMode = "attention"
    min_confidence: float = Field(default=0.8, ge=0.0, le=1.0)
    max_objects: int = Field(default=5, ge=1, le=100)
    smooth_px: int = Field(default=2, ge=0, le=32)
    scales: list[Annotated[float, Field(gt=0.0, le=2.0)]] = Field(
        default_factory=lambda: [1.0], min_length=1, max_length=5
    )
    boxes: list[BBox] | None = Field(default=None, max_length=100)
    points: list[Point] | None = Field(default=None, max_length=100)

    @field_validator("boxes")
    @classmethod
    def _positive_boxes(cls, boxes: list[list[float]] | None) -> list[list[float]] | None:
        for box in boxes or []:
            x, y, w, h = box
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError("a box is [x, y, w, h] with x, y >= 0 and w, h > 0")
        return boxes

    @model_validator(mode="after")
    def _explicit_prompts_present(self) -> SegmentationOptions:
        if self.mode == "boxes" and not self.boxes:
            raise ValueError("segmentation.mode 'boxes' needs segmentation.boxes")
        if self.mode == "points" and not self.points:
            raise ValueError("segmentation.mode 'points' needs segmentation.points")
        return self


class AssetOptions(Event):
    """How cut-outs are written: cropped to the object's box, or the full canvas."""

    crop: bool = True


class ProgressiveOptions(Event):
    """*Addition.* Draft small, upscale, refine with an img2img pass.

    The draft is generated at ``draft_scale`` times the requested size (rounded to
    multiples of 8), upscaled, then refined with ``strength`` of the steps.
    """

    draft_scale: float = Field(default=0.5, ge=0.25, lt=1.0)
    strength: float = Field(default=0.5, gt=0.0, le=1.0)


# multiple_of (not a validator) so that the exported JSON Schema says it too.
Dimension = Annotated[int, Field(ge=64, le=2048, multiple_of=8)]


class SceneOptions(Event):
    """*Addition.* One view of a multi-view scene (issue: scene assets)."""

    scene_id: RequestId
    view: ViewName
    #: How many views the scene has: the scene-ready event follows the last one.
    views_total: int = Field(ge=1, le=64)
    #: Viewing angle in degrees, when the views are angles (the article's 0/45/90/135).
    angle: float | None = None
    outputs: list[Literal["depth", "mesh"]] = Field(default_factory=list, max_length=2)


class LoraSpec(Event):
    """*Addition.* One LoRA adapter applied to this request's generation."""

    name: LoraName
    #: Adapter weight: 1.0 as trained, 0 off, negative pushes away from its style.
    scale: float = Field(default=1.0, ge=-2.0, le=2.0)


class GenerationOptions(Event):
    """Options shared by prompt and inpaint events.

    The prompt is either ``prompt`` or, structured (*addition*), ``subject`` with
    optional ``details`` and ``style``, built in that order as
    ``"{subject}, {details}, {style}"``; ``negative`` is the structured
    ``negative_prompt``. Giving both forms is an error.
    """

    id: RequestId
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    subject: PromptPart | None = None
    details: PromptPart | None = None
    style: PromptPart | None = None
    negative: PromptPart | None = None
    #: *Addition.* Who asked; carried through every event and used as a metrics label.
    tenant: TenantId | None = None
    scene: SceneOptions | None = None
    #: *Addition.* A webhook for each image's terminal outcome (docs/contract.md).
    callback_url: CallbackUrl | None = None
    targets: list[TargetName] = Field(default_factory=list, max_length=MAX_TARGETS)
    width: Dimension = 512
    height: Dimension = 512
    steps: int = Field(default=25, ge=1, le=150)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0)
    sampler: Sampler = "dpmpp_2m"
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    num_images: int = Field(default=1, ge=1, le=8)
    segmentation: SegmentationOptions = Field(default_factory=SegmentationOptions)
    asset: AssetOptions = Field(default_factory=AssetOptions)
    progressive: ProgressiveOptions | None = None
    #: *Addition.* LoRA adapters from the generator's ``GENSEG_LORA_DIR`` (distinct names;
    #: a worker may accept fewer than this limit: its dead letter says so).
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS)

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, loras: list[LoraSpec]) -> list[LoraSpec]:
        names = [lora.name for lora in loras]
        if len(set(names)) != len(names):
            raise ValueError("each LoRA adapter may be named once")
        return loras

    @model_validator(mode="after")
    def _one_prompt_form(self) -> GenerationOptions:
        structured = [self.subject, self.details, self.style, self.negative]
        if self.prompt is not None and any(part is not None for part in structured):
            raise ValueError(
                "give either 'prompt' or 'subject' (with 'details', 'style', 'negative'), not both"
            )
        if self.prompt is None and self.subject is None:
            raise ValueError("'prompt' is required (or a structured prompt with 'subject')")
        if self.negative is not None and self.negative_prompt is not None:
            raise ValueError("give either 'negative' or 'negative_prompt', not both")
        if len(self.prompt_text()) > MAX_PROMPT_CHARS:
            raise ValueError(f"the built prompt is longer than {MAX_PROMPT_CHARS} characters")
        return self

    def prompt_text(self) -> str:
        """The prompt to generate from: ``prompt``, or the structured parts in order."""
        if self.prompt is not None:
            return self.prompt
        return ", ".join(p for p in (self.subject, self.details, self.style) if p)

    def negative_text(self) -> str | None:
        return self.negative_prompt if self.negative_prompt is not None else self.negative


class PromptEvent(GenerationOptions):
    """Text-to-image request on ``{prefix}.prompts``."""

    schema_: Literal["genseg.prompt/v1"] = Field(default=SCHEMA_PROMPT, alias="schema")


class InpaintEvent(GenerationOptions):
    """Mask-guided regeneration on ``{prefix}.prompts``: white mask pixels are regenerated."""

    schema_: Literal["genseg.inpaint/v1"] = Field(default=SCHEMA_INPAINT, alias="schema")
    image: BlobRef
    mask: BlobRef
    strength: float = Field(default=1.0, gt=0.0, le=1.0)  # addition: img2img strength


# --- downstream events ------------------------------------------------------------


class ResolvedParams(Event):
    """The generation parameters actually used for one image (``seed`` included)."""

    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: Sampler
    seed: int
    num_images: int = 1
    mode: Literal["txt2img", "inpaint"] = "txt2img"
    progressive: ProgressiveOptions | None = None
    strength: float | None = None  # addition: inpaint strength
    loras: list[LoraSpec] | None = None  # addition: the adapters applied, when any


class ImageReadyEvent(Event):
    """A generated image on ``{prefix}.images``, one per (``id``, ``image_index``)."""

    schema_: Literal["genseg.image/v1"] = Field(default=SCHEMA_IMAGE, alias="schema")
    id: RequestId
    image_index: int = Field(default=0, ge=0)
    image: BlobRef
    params: ResolvedParams
    model: str
    heatmaps: dict[str, BlobRef] = Field(default_factory=dict)
    targets: list[str] = Field(default_factory=list)
    # addition: targets whose words were not found in the prompt (no heat map)
    missing_targets: list[str] = Field(default_factory=list)
    segmentation: SegmentationOptions = Field(default_factory=SegmentationOptions)
    asset: AssetOptions = Field(default_factory=AssetOptions)  # addition: passed on
    timings_ms: dict[str, float] = Field(default_factory=dict)
    tenant: TenantId | None = None  # addition: passed on
    scene: SceneOptions | None = None  # addition: passed on
    callback_url: CallbackUrl | None = None  # addition: passed on
    #: *Addition.* What the image check found (``["nsfw"]``); ``[]`` checked and clean;
    #: absent when no check ran (see docs/policy.md).
    flags: list[str] | None = None
    #: *Addition.* The revision of the generator's weights that made the image.
    model_revision: Revision | None = None


class RLE(Event):
    """COCO run-length encoding (compressed ``counts`` string), ``size`` = [h, w]."""

    size: Annotated[list[int], Field(min_length=2, max_length=2)]
    counts: str


class MaskObject(Event):
    label: str
    score: float  # SAM predicted IoU
    bbox: BBox
    area: int = Field(ge=0)
    mask: BlobRef
    rle: RLE


class MasksReadyEvent(Event):
    """Masks of one image on ``{prefix}.masks``."""

    schema_: Literal["genseg.masks/v1"] = Field(default=SCHEMA_MASKS, alias="schema")
    id: RequestId
    image_index: int = Field(default=0, ge=0)
    image: BlobRef
    objects: list[MaskObject] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)  # addition
    tenant: TenantId | None = None  # addition
    #: *Addition.* Which segmenter made the masks: backend (``sam``, ``sam2``, ``sam3``)
    #: and checkpoint, e.g. ``sam:vit_h:sam_vit_h_4b8939.pth``.
    segmenter: str | None = None
    segmenter_revision: Revision | None = None  # addition: the segmenter's weights


class AssetItem(Event):
    label: str
    score: float
    bbox: BBox
    asset: BlobRef
    depth_median: float | None = None  # addition: the object's median depth (scenes)


class AssetReadyEvent(Event):
    """Terminal event of a request that did not fail, on ``{prefix}.assets``."""

    schema_: Literal["genseg.asset/v1"] = Field(default=SCHEMA_ASSET, alias="schema")
    id: RequestId
    image_index: int = Field(default=0, ge=0)
    status: Literal["ok", "no_match"]
    assets: list[AssetItem] = Field(default_factory=list)
    image: BlobRef
    masks: list[BlobRef] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    tenant: TenantId | None = None  # addition
    scene: SceneOptions | None = None  # addition
    callback_url: CallbackUrl | None = None  # addition: passed on, for the webhook dispatcher
    depth: BlobRef | None = None  # addition: 16-bit depth PNG, when the scene asks for it
    mesh: BlobRef | None = None  # addition: textured .glb, when the scene asks for it
    #: *Addition.* Units of ``depth`` and ``assets[].depth_median``: ``relative`` (0 = nearest,
    #: 1 = farthest in this image) or ``metres``; set when depth was estimated.
    depth_units: Literal["relative", "metres"] | None = None
    segmenter: str | None = None  # addition: as in mask-ready
    segmenter_revision: Revision | None = None  # addition: as in mask-ready
    #: *Addition.* The depth model's revision, when depth was estimated.
    depth_revision: Revision | None = None
    model_revision: Revision | None = None  # addition: the generator's, passed on


class ProgressEvent(Event):
    """Denoising progress on ``{prefix}.progress``: step ``step`` of ``steps``."""

    schema_: Literal["genseg.progress/v1"] = Field(default=SCHEMA_PROGRESS, alias="schema")
    id: RequestId
    image_index: int | None = None
    stage: str = "gen"
    step: int = Field(ge=0)
    steps: int = Field(ge=1)
    tenant: TenantId | None = None  # addition


class ErrorInfo(Event):
    type: str
    message: str


class SourceInfo(Event):
    topic: str
    partition: int
    offset: int


class DeadLetterEvent(Event):
    """Terminal event of a request that failed, on ``{prefix}.dlq``.

    ``image_index`` is absent when the failure covers every image of the request
    (for example a prompt the generator refused).
    """

    schema_: Literal["genseg.dead_letter/v1"] = Field(default=SCHEMA_DEAD_LETTER, alias="schema")
    id: str | None = None
    image_index: int | None = None
    stage: str
    error: ErrorInfo
    attempts: int = Field(ge=0)
    source: SourceInfo
    value: str = ""
    value_truncated: bool = False  # addition
    tenant: str | None = None  # addition, when the failed record named one

    @classmethod
    def build(
        cls,
        *,
        stage: str,
        error_type: str,
        message: str,
        attempts: int,
        source: SourceInfo,
        raw: bytes,
        request_id: str | None = None,
        image_index: int | None = None,
        tenant: str | None = None,
    ) -> DeadLetterEvent:
        """Build a dead-letter event, decoding and truncating the original value.

        The value is cut to at most 64 KiB of UTF-8 (never inside a character), so a
        dead-letter record stays far below Kafka's 1 MiB limit whatever the input.
        """
        text = raw.decode("utf-8", errors="replace")
        encoded = text.encode("utf-8")
        truncated = len(encoded) > DEAD_LETTER_VALUE_LIMIT
        if truncated:
            text = encoded[:DEAD_LETTER_VALUE_LIMIT].decode("utf-8", errors="ignore")
        return cls(
            id=request_id,
            image_index=image_index,
            stage=stage,
            error=ErrorInfo(type=error_type, message=message[:4096]),
            attempts=attempts,
            source=source,
            value=text,
            value_truncated=truncated,
            tenant=tenant,
        )


class SceneView(Event):
    """One finished view of a scene."""

    view: str
    angle: float | None = None
    id: RequestId
    image_index: int = 0
    status: Literal["ok", "no_match"]
    image: BlobRef
    depth: BlobRef | None = None
    mesh: BlobRef | None = None
    objects: list[str] = Field(default_factory=list)


class SceneReadyEvent(Event):
    """*Addition.* All views of a multi-view scene are done, on ``{prefix}.scenes``."""

    schema_: Literal["genseg.scene/v1"] = Field(default=SCHEMA_SCENE, alias="schema")
    scene_id: RequestId
    views: list[SceneView]
    tenant: TenantId | None = None
    #: *Addition.* The merged scene: one binary glTF with every object once, placed by
    #: its views' depth (see ``scene_worker.merge``); absent when no view had depth.
    mesh: BlobRef | None = None


class DeletionEvent(Event):
    """*Addition.* A request was deleted, on ``{prefix}.deletions`` keyed by its id:
    its blobs are gone (and its tombstone stops its outputs still in flight), so
    downstream systems should forget it too."""

    schema_: Literal["genseg.deletion/v1"] = Field(default=SCHEMA_DELETION, alias="schema")
    id: RequestId
    tenant: TenantId | None = None
    blobs_deleted: int = Field(ge=0)  # blobs removed by this deletion
    bytes_deleted: int = Field(ge=0)  # their total size
    deleted_at: str = Field(min_length=1, max_length=64)  # ISO 8601, UTC


PromptsTopicEvent = PromptEvent | InpaintEvent
