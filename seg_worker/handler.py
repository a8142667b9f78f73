"""The segmenter stage: image-ready event -> one mask-ready and one asset-ready event.

The asset-ready event is the terminal event of the image: it is always
published, with ``status: "no_match"`` and no assets when nothing passed the
filters. Failures are returned per image (the runtime retries or dead-letters
them): a reference outside the store, a blob that is missing, too large or whose
bytes do not match its sha256, or an image that does not decode or has more than
``Settings.max_image_pixels`` pixels are permanent; a store that cannot be reached
is transient.

Blob errors are permanent or transient by their class (:mod:`plumbing.errors`), and
out-of-memory is retried by the runtime, like any transient failure.

Batching: every image-ready event may share a batch (:meth:`SegStage.batch_key`
returns one key). SAM pads every input to the same ``img_size`` square, so any
images stack into one encoder pass; on a GPU that raises encoder throughput, and
the per-image steps after it are independent. The embedding cache sits in front,
so repeated images are not encoded at all.

Backends (``GENSEG_SEGMENTER``, :mod:`seg_worker.backends`): segment-anything (``sam``),
SAM 2.1 (``sam2``) or SAM 3 (``sam3``); a mode the worker's backend does not serve is
a dead letter (``unsupported_mode``) naming the setting to change. Both events name
the backend and checkpoint in ``segmenter``.

Scene views (``event.scene`` set): after the masks, when ``scene.outputs`` asks, the
depth model runs (``depth``: a 16-bit depth PNG and each object's ``depth_median``;
see :mod:`seg_worker.depth`) and the view is exported as one textured ``.glb``
(``mesh``; see :mod:`plumbing.mesh`). Every scene view also gets a "view done"
record on ``{prefix}.scene-views`` for the scene stage (:mod:`scene_worker`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from consumers.stage import ItemResult, Output, Stage, StageContext
from plumbing.blobstore import blob_key
from plumbing.images import PNG, decode_heatmap, decode_image, png_byte_limit
from plumbing.mesh import GLB_MEDIA_TYPE, MeshPart, view_glb
from plumbing.revisions import model_revision, revision_of
from plumbing.settings import Settings
from schemas import (
    RLE,
    AssetItem,
    AssetReadyEvent,
    BlobRef,
    DeletionEvent,
    ImageReadyEvent,
    MaskObject,
    MasksReadyEvent,
    SceneViewRecord,
    parse_event,
)
from seg_worker.backend import SegBackend
from seg_worker.backends import backend_name, check_profile, load_backend
from seg_worker.config import SegConfig
from seg_worker.depth import (
    DEPTH_MEDIA_TYPE,
    DepthEstimator,
    DepthUnits,
    depth_model_of,
    encode_depth_png,
    load_depth,
)
from seg_worker.depth import median_depth as object_depth
from seg_worker.finishing import SegObject, encode_rle, mask_png, rgba_png
from seg_worker.profiles import seg_profile
from seg_worker.segment import Plan, Segmenter

log = logging.getLogger(__name__)


class _Item:
    """Per-image state between the steps of :meth:`SegStage.handle`."""

    def __init__(self, index: int, event: ImageReadyEvent) -> None:
        self.index = index
        self.event = event
        self.image: np.ndarray | None = None
        self.plan: Plan | None = None


@dataclass
class _SceneWork:
    """Depth and 3D outputs of one scene view (what ``scene.outputs`` asked for)."""

    normalised: np.ndarray  # [H, W] depth in 0..1, 0 = nearest (what the mesh displaces by)
    units: DepthUnits
    want_mesh: bool
    medians: list[float | None] = field(default_factory=list)  # per object, in ``units``
    depth: BlobRef | None = None
    mesh: BlobRef | None = None


class SegStage(Stage[ImageReadyEvent]):
    """Segment Anything (1, 2.1 or 3) on every image-ready event.

    Construct from settings: ``SegStage(Settings())``: the backend is
    ``GENSEG_SEGMENTER``, the model profile ``Settings.models`` (``SAM_MODEL``,
    ``SAM_CHECKPOINT``, ``SAM2_MODEL``, ``SAM3_MODEL``, ``GENSEG_DEVICE``); ``config``
    tunes the worker (cache size, automatic grid...). The model is built in
    :meth:`setup` (or on the first :meth:`handle`); an unknown backend, or one the
    profile cannot run, fails there with a one-line ValueError (the worker's start).
    """

    name = "seg"
    input_topic = "images"
    per_image = True
    #: An image whose request was deleted meanwhile ends as a ``deleted`` dead letter.
    on_deleted = "dead_letter"

    def __init__(self, settings: Settings, config: SegConfig | None = None) -> None:
        self.settings = settings
        self.config = config or SegConfig.for_profile(settings.models)
        self._segmenter: Segmenter | None = None
        #: Backend and checkpoint, as the events' ``segmenter`` field says (after setup).
        self.segmenter_id: str | None = None
        #: Revisions of the segmenter's and the depth model's weights (plumbing.revisions).
        self.segmenter_revision: str | None = None
        self.depth_revision: str | None = None
        self._depth: DepthEstimator | None = None
        self._setup_lock = threading.Lock()

    # --- Stage interface -----------------------------------------------------------

    def setup(self) -> None:
        """Build or load the backend for ``GENSEG_SEGMENTER`` and ``Settings.models``."""
        with self._setup_lock:
            if self._segmenter is not None:
                return
            check_profile(backend_name(self.settings), self.settings.models)
            loaded = load_backend(self.settings, self.config)
            self._segmenter = Segmenter(loaded.backend, self.config)
            self.segmenter_id = loaded.segmenter
            self.segmenter_revision = segmenter_revision(self.settings, self.config)
            log.info(
                "seg worker ready: profile %s, %s, input %d px, device %s, segmenter %s, modes %s",
                self.settings.models,
                loaded.model,
                loaded.input_size,
                getattr(loaded.backend, "device", "?"),
                loaded.segmenter,
                ", ".join(sorted(loaded.backend.modes)),
            )

    @property
    def segmenter(self) -> Segmenter:
        """The model-holding segmenter (built on first use)."""
        if self._segmenter is None:
            self.setup()
        assert self._segmenter is not None
        return self._segmenter

    @property
    def predictor(self) -> SegBackend:
        """The backend (for ``sam``, a :class:`~seg_worker.predictor.CachedPredictor`)."""
        return self.segmenter.predictor

    @property
    def depth(self) -> DepthEstimator:
        """The depth model, built on the first scene view that needs it (workers that
        never see a scene never load it)."""
        with self._setup_lock:
            if self._depth is None:
                s = self.settings
                source = depth_model_of(s)
                self._depth = load_depth(s.models, source, device=s.device, seed=self.config.seed)
                log.info("depth model ready: profile %s, %s units", s.models, self._depth.units)
                seeded = seg_profile(s.models).depth_arch is not None  # as load_depth builds it
                self.depth_revision = f"seed:{self.config.seed}" if seeded else revision_of(source)
        return self._depth

    def parse(self, raw: bytes) -> ImageReadyEvent:
        return parse_event(raw, ImageReadyEvent)

    def forget_request(self, request_id: str) -> None:
        """Drop the SAM embeddings of ``request_id``'s images from the cache."""
        cache = getattr(self._segmenter.predictor, "cache", None) if self._segmenter else None
        if cache is not None and (dropped := cache.drop_request(request_id)):
            log.info("dropped %d embeddings of deleted request %s", dropped, request_id)

    def batch_key(self, event: ImageReadyEvent) -> Hashable | None:
        """One key for all: any images can share an encoder batch (see module doc)."""
        return "sam"

    def handle(self, events: list[ImageReadyEvent], ctx: StageContext) -> list[ItemResult]:
        """Per event ``[Output(masks, MasksReadyEvent), Output(assets, AssetReadyEvent)]``,
        or the exception that event met (the others still complete)."""
        segmenter = self.segmenter
        results: list[ItemResult | None] = [None] * len(events)
        items = [_Item(i, event) for i, event in enumerate(events)]

        for item in items:
            try:
                with ctx.phase("decode_image", item=item.index):
                    image, heatmaps = self._load(item, ctx)
                with ctx.phase("prompts", item=item.index):
                    item.plan = self.segmenter.plan(
                        image,
                        item.event.image.sha256,
                        item.event.segmentation,
                        targets=item.event.targets,
                        heatmaps=heatmaps,
                        missing_targets=item.event.missing_targets,
                    )
            except Exception as exc:
                results[item.index] = exc

        ready = [item for item in items if results[item.index] is None]
        plans = [item.plan for item in ready if item.plan is not None]
        if plans:
            try:
                # one phase for the batch: its encoder pass serves every image in it
                only = ready[0].index if len(ready) == 1 else None
                with ctx.phase("embed", item=only, images=len(plans)):
                    segmenter.embed(plans)
                cache = getattr(segmenter.predictor, "cache", None)
                for item in ready if cache is not None else []:
                    cache.tag(item.event.image.sha256, item.event.id)  # forgotten on deletion
            except Exception as exc:
                for item in ready:
                    results[item.index] = exc
                ready = []

        for item in ready:
            try:
                results[item.index] = self._finish(item, ctx)
            except Exception as exc:
                results[item.index] = exc
        return [r if r is not None else RuntimeError("unhandled item") for r in results]

    # --- steps -----------------------------------------------------------------------

    def _load(self, item: _Item, ctx: StageContext) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Read and decode the image ``[H, W, 3]`` uint8 and the heat maps it needs."""
        event = item.event
        max_pixels = self.settings.max_image_pixels
        max_bytes = png_byte_limit(max_pixels)
        data = ctx.blob.get(event.image, max_bytes=max_bytes)
        item.image = np.asarray(decode_image(data, max_pixels=max_pixels, mode="RGB"))
        heatmaps: dict[str, np.ndarray] = {}
        if event.segmentation.mode in ("attention", "attention+concept"):
            for target, ref in event.heatmaps.items():
                raw = ctx.blob.get(ref, max_bytes=max_bytes)
                heatmaps[target] = decode_heatmap(raw, max_pixels=max_pixels)
        return item.image, heatmaps

    def _finish(self, item: _Item, ctx: StageContext) -> list[Output]:
        """Predict, then write masks and assets and build the two events."""
        assert item.plan is not None and item.image is not None
        event, i = item.event, item.index
        with ctx.phase("predict", item=i):
            objects = self.segmenter.run(item.plan)
        with ctx.phase("assets", item=i):
            encoded = [_encode(item.image, obj, crop=event.asset.crop) for obj in objects]
        scene = self._scene_depth(item, objects, ctx)
        mask_objects: list[MaskObject] = []
        assets: list[AssetItem] = []
        with ctx.phase("blob_write", item=i):
            for k, (obj, (mask_bytes, rle, asset_bytes)) in enumerate(
                zip(objects, encoded, strict=True)
            ):
                mask_ref = _write_blob(ctx, event, f"mask-{k}.png", mask_bytes)
                asset_ref = _write_blob(ctx, event, f"asset-{k}.png", asset_bytes)
                bbox = [float(v) for v in obj.bbox]
                mask_objects.append(
                    MaskObject(
                        label=obj.label,
                        score=obj.score,
                        bbox=bbox,
                        area=obj.area,
                        mask=mask_ref,
                        rle=RLE(size=rle["size"], counts=rle["counts"]),
                    )
                )
                assets.append(
                    AssetItem(
                        label=obj.label,
                        score=obj.score,
                        bbox=bbox,
                        asset=asset_ref,
                        depth_median=scene.medians[k] if scene else None,
                    )
                )
        if scene is not None and scene.want_mesh:
            with ctx.phase("mesh", item=i):
                parts = [
                    MeshPart(
                        name=f"object-{k}-{_slug(a.label)}",
                        mask=obj.mask,
                        extras={"label": a.label, "score": a.score, "bbox": a.bbox}
                        | ({"depth_median": a.depth_median} if a.depth_median is not None else {}),
                    )
                    for k, (obj, a) in enumerate(zip(objects, assets, strict=True))
                ]
                glb = view_glb(item.image, scene.normalised, parts)
                scene.mesh = _write_blob(ctx, event, "view.glb", glb, GLB_MEDIA_TYPE)
        seg_timings = {f"seg.{name}": ms for name, ms in ctx.timings_ms(i).items()}
        gen_timings = {
            name if name.startswith("gen.") else f"gen.{name}": ms
            for name, ms in event.timings_ms.items()
        }
        masks_event = MasksReadyEvent(
            id=event.id,
            image_index=event.image_index,
            image=event.image,
            objects=mask_objects,
            timings_ms=seg_timings,
            tenant=event.tenant,
            segmenter=self.segmenter_id,
            segmenter_revision=self.segmenter_revision,
        )
        asset_event = AssetReadyEvent(
            id=event.id,
            image_index=event.image_index,
            status="ok" if assets else "no_match",
            assets=assets,
            image=event.image,
            masks=[obj.mask for obj in mask_objects],
            timings_ms={**gen_timings, **seg_timings},
            tenant=event.tenant,
            scene=event.scene,
            callback_url=event.callback_url,
            depth=scene.depth if scene else None,
            mesh=scene.mesh if scene else None,
            depth_units=scene.units if scene else None,
            segmenter=self.segmenter_id,
            segmenter_revision=self.segmenter_revision,
            depth_revision=self.depth_revision if scene else None,
            model_revision=event.model_revision,
        )
        if not assets:
            log.info("%s/%d: no object passed the filters", event.id, event.image_index)
        outputs = [Output(ctx.topics.masks, masks_event)]
        if event.scene is not None:  # keyed by scene: one partition, one owner per scene
            record = SceneViewRecord.of(asset_event, num_images=event.params.num_images)
            outputs.append(Output(ctx.topics.scene_views, record, key=event.scene.scene_id))
        # Last, and sent once the others are acknowledged: the image's terminal outcome.
        outputs.append(Output(ctx.topics.assets, asset_event, terminal=True))
        return outputs

    def _scene_depth(
        self, item: _Item, objects: list[SegObject], ctx: StageContext
    ) -> _SceneWork | None:
        """Depth of a scene view that asks for depth or a mesh (None otherwise): each
        object's median depth, and the depth PNG when ``depth`` is asked for."""
        scene = item.event.scene
        if scene is None or not scene.outputs:
            return None
        assert item.image is not None
        with ctx.phase("depth", item=item.index):
            depth = self.depth.estimate(item.image)
            work = _SceneWork(
                normalised=depth.normalised(),
                units=depth.units,
                want_mesh="mesh" in scene.outputs,
                medians=[object_depth(depth, obj.mask) for obj in objects],
            )
            if "depth" in scene.outputs:
                png = encode_depth_png(depth)
                work.depth = _write_blob(ctx, item.event, "depth.png", png, DEPTH_MEDIA_TYPE)
        return work


class ForgetDeleted(Stage[DeletionEvent]):
    """Deletion events in, the deleted requests' embeddings out of ``seg``'s cache.

    Runs beside the seg stage in each seg process (``genseg.workers``), in a consumer
    group of its own per process that starts at the latest offset: every process sees
    every deletion (a broadcast), from when it started (its cache was empty before).
    """

    name = "seg-forget"
    input_topic = "deletions"
    runtime_defaults: ClassVar[dict[str, Any]] = {
        "auto_offset_reset": "latest", "max_batch": 64, "max_wait_ms": 0,
    }  # fmt: skip

    def __init__(self, seg: SegStage) -> None:
        self.seg = seg
        #: Deletion events handled so far (this process).
        self.handled = 0

    def parse(self, raw: bytes) -> DeletionEvent:
        try:
            return parse_event(raw, DeletionEvent)
        except ValueError:  # InvalidEvent: not a deletion to act on, and nothing to report
            return _NOT_A_DELETION

    def handle(self, events: list[DeletionEvent], ctx: StageContext) -> list[ItemResult]:
        for event in events:
            if event.id:
                self.seg.forget_request(event.id)
        self.handled += len(events)
        return [[] for _ in events]


#: What an unreadable record of the deletions topic parses to: nothing to forget (a
#: dead letter would be one per seg process, on a topic that ends requests).
_NOT_A_DELETION = DeletionEvent.model_construct(id="", blobs_deleted=0, bytes_deleted=0)


def segmenter_revision(settings: Settings, config: SegConfig) -> str:
    """The revision of the segmenter's weights (:mod:`plumbing.revisions`): the
    checkpoint's (a file, directory or hub id), or ``seed:<n>`` for seeded weights."""
    backend, profile = backend_name(settings), settings.models
    if backend == "sam":
        spec = seg_profile(profile)
        if spec.weights != "checkpoint":
            return f"seed:{config.seed}"
        return revision_of(settings.sam_checkpoint or spec.default_checkpoint or profile)
    source = str(getattr(settings, f"{backend}_model", ""))
    return model_revision(profile, source, seed=config.seed, modules=list)


def _encode(
    image: np.ndarray, obj: SegObject, *, crop: bool
) -> tuple[bytes, dict[str, object], bytes]:
    """Mask PNG, COCO RLE and RGBA PNG of one object."""
    return (
        mask_png(obj.mask),
        encode_rle(obj.mask),
        rgba_png(image, obj.mask, obj.bbox if crop else None),
    )


def _write_blob(
    ctx: StageContext, event: ImageReadyEvent, name: str, data: bytes, media_type: str = PNG
) -> BlobRef:
    """Write one output under its deterministic key (a redelivery overwrites)."""
    key = blob_key(event.id, event.image_index, "seg", name, tenant=event.tenant)
    return ctx.blob.put(key, data, media_type)


def _slug(text: str) -> str:
    """A mesh and node name part: letters, digits and dashes."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "object"
