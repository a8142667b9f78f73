"""The generator stage: prompt and inpaint events -> image-ready events (and progress).

``GenStage(settings)`` plugs into :class:`consumers.runtime.StageRuntime`. Per batch it
resolves seeds, reads inpaint inputs from the blob store, generates through
:class:`gen_worker.generate.Generator` under the out-of-memory ladder, writes the
image and heat-map PNGs to deterministic blob keys and returns one list of outputs
(or one error) per event, in order.

A profile that draws one size only (:attr:`GenModels.native_size`, e.g. ``toy``'s
64x64) refuses an event of another size with a dead letter (``unsupported_size``)
rather than spend minutes on an image its models never learnt to draw.

LoRA adapters (``loras``) are checked per event before any work (unknown name, too
many: a dead letter); requests with the same adapter set share batches (the batch key
holds names and scales); :mod:`gen_worker.lora` loads and applies them.

With a request policy (``GENSEG_POLICY``, :mod:`gen_worker.policy`), each event is
checked before any work: a refused one ends in a dead letter (``policy`` or
``rate_limited``) and is never generated. The policy's image check
(:mod:`gen_worker.safety`) runs after generation, before any blob is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from consumers.stage import ItemResult, Output, PermanentError, Stage, StageContext
from gen_worker.architectures import WEIGHTS_SEED
from gen_worker.generate import BatchSpec, Generator, Sample, SampleResult
from gen_worker.lora import LoraLibrary
from gen_worker.oom import run_with_oom_ladder
from gen_worker.policy import Policy, PolicyError, PolicyStore, RateLimiter
from gen_worker.profiles import GenModels, RuntimeOptions
from gen_worker.requests import GenEvent, ProgressEmitter, batch_spec, image_seeds
from gen_worker.safety import NSFW, SafetyChecker
from plumbing.blobstore import blob_key
from plumbing.images import (
    HEATMAP_MEDIA_TYPE,
    PNG,
    decode_image,
    encode_heatmap,
    encode_png,
    png_byte_limit,
)
from plumbing.revisions import model_revision
from plumbing.settings import Settings
from schemas import (
    ImageReadyEvent,
    InpaintEvent,
    ResolvedParams,
    parse_prompts_record,
)

log = logging.getLogger(__name__)

STAGE_BLOB_DIR = "gen"


@dataclass
class _Job:
    """One image to make: event ``item`` of the batch, its ``image_index``, its sample."""

    item: int
    image_index: int
    sample: Sample


class GenStage(Stage[GenEvent]):
    """Stable Diffusion generation as a stage of the runtime.

    Build with ``GenStage(settings)``: the models of ``settings.models`` load in
    :meth:`setup` (in the worker thread). Pass ``models`` (or ``generator``) to share
    loaded models, e.g. between tests. ``clock`` times progress events, the policy
    file's reload checks (every ``policy_reload_s``) and the tenants' rate limits.
    """

    name = "gen"
    input_topic = "prompts"
    #: Four compatible requests per batch: the article's four views on one card.
    runtime_defaults = {"max_batch": 4}  # noqa: RUF012 - read-only, like the other class settings
    #: A request deleted while it was generated ends as a ``deleted`` dead letter.
    on_deleted = "dead_letter"

    def __init__(
        self,
        settings: Settings,
        *,
        models: GenModels | None = None,
        generator: Generator | None = None,
        options: RuntimeOptions | None = None,
        progress_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        policy_reload_s: float = 1.0,
        safety: SafetyChecker | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.progress_interval_s = progress_interval_s
        self.clock = clock
        #: The adapters of ``GENSEG_LORA_DIR`` requests may name.
        self.loras = LoraLibrary.from_settings(settings)
        self._generator = generator
        self._scene_generator: Generator | None = None
        if generator is None and models is not None:
            self._use(Generator(models, loras=self.loras))
        elif generator is not None:
            if generator.loras is None:
                generator.loras = self.loras  # a shared generator applies this stage's adapters
            self._use(generator)
        self._safety = safety
        self._safety_lock = threading.Lock()
        if settings.safety_checker and settings.models != "pretrained" and safety is None:
            log.warning(
                "GENSEG_SAFETY_CHECKER is used with the pretrained profile only; "
                "the %s profile runs without the image check",
                settings.models,
            )
        #: The request policy of ``GENSEG_POLICY``; None: every request is admitted.
        self.policy: PolicyStore | None = None
        if settings.policy:
            self.policy = PolicyStore(
                settings.policy,
                reload_interval_s=policy_reload_s,
                validate=self._check_policy,
                clock=clock,
            )
        #: Token buckets per tenant, for the policy's rate limits (this process only).
        self.limiter = RateLimiter(clock=clock)
        #: The weights' revision (plumbing.revisions) per ``txt2img``, ``inpaint``, ``scene``.
        self._revisions: dict[str, str] = {}

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            self.setup()
        assert self._generator is not None
        return self._generator

    @property
    def models(self) -> GenModels:
        return self.generator.models

    def _use(self, generator: Generator) -> None:
        """Draw with ``generator``, and scene views with its models' scene models if any."""
        self._generator = generator
        scene = generator.models.scene
        self._scene_generator = (
            None
            if scene is None
            else Generator(scene, batch_invariant=generator.batch_invariant, loras=self.loras)
        )

    def generator_for(self, spec: BatchSpec) -> Generator:
        """The generator of a batch: the scene generator for views of scene requests when
        the profile has one (the toy profile's knows the 3D world), else the generator."""
        generator = self.generator  # loads the models on first use
        return (self._scene_generator or generator) if spec.scene else generator

    @property
    def safety(self) -> SafetyChecker | None:
        """The image checker of ``GENSEG_SAFETY_CHECKER`` (loaded on first use), if any."""
        if self._safety is None and self._safety_configured():
            with self._safety_lock:
                if self._safety is None:
                    assert self.settings.safety_checker is not None
                    self._safety = SafetyChecker.load(
                        self.settings.safety_checker,
                        device=self.models.device,
                        dtype=self.models.dtype,
                    )
        return self._safety

    def _safety_configured(self) -> bool:
        return self._safety is not None or (
            bool(self.settings.safety_checker) and self.settings.models == "pretrained"
        )

    def _check_policy(self, policy: Policy) -> None:
        """Refuse a policy this worker cannot apply: an image check without a checker
        would otherwise pass every image unchecked."""
        if policy.safety != "off" and not self._safety_configured():
            raise PolicyError(
                f'safety = "{policy.safety}" needs the image check: set GENSEG_SAFETY_CHECKER '
                "(pretrained profile)"
            )

    def setup(self) -> None:
        """Build or load the models of ``settings.models`` (once), and the image checker."""
        if self._generator is None:
            started = time.perf_counter()
            models = GenModels.from_settings(self.settings, self.options)
            self._use(Generator(models, loras=self.loras))
            log.info(
                "gen models %s loaded on %s (%s) in %.1f s",
                models.name,
                models.device,
                str(models.dtype).removeprefix("torch."),
                time.perf_counter() - started,
            )
        if self._safety_configured():
            _ = self.safety  # load now: not on the first batch
        self.revision(inpaint=False)  # hashed at load, not on the first batch
        if self._scene_generator is not None:
            self.revision(inpaint=False, scene=True)

    def revision(self, *, inpaint: bool, scene: bool = False) -> str:
        """The revision of the weights that make text-to-image (or inpainted) images, or
        (``scene``) the views of scene requests."""
        generator = self.generator  # loads the models on first use
        # Scene views without a scene generator are the generator's: its revision, once.
        scene_generator = self._scene_generator if scene and not inpaint else None
        key = "inpaint" if inpaint else "txt2img" if scene_generator is None else "scene"
        if key not in self._revisions:
            m = (scene_generator or generator).models
            own = inpaint and m.inpaint_name != m.name  # an SDXL model inpaints with its own
            pipe = (lambda: m.inpaint) if inpaint else (lambda: m.txt2img)  # only if hashed
            self._revisions[key] = model_revision(
                m.profile,
                self.settings.sd_inpaint_model if own else self.settings.sd_model,
                seed=WEIGHTS_SEED,
                modules=lambda: [pipe().unet, pipe().vae, pipe().text_encoder],
            )
            log.info("gen weights revision %s (%s)", self._revisions[key], key)
        return self._revisions[key]

    def parse(self, raw: bytes) -> GenEvent:
        return parse_prompts_record(raw)

    def batch_key(self, event: GenEvent) -> Hashable | None:
        return batch_spec(event)

    # --- handling ---------------------------------------------------------------------

    def handle(self, events: list[GenEvent], ctx: StageContext) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(events)
        policy = self.policy.current() if self.policy is not None else None
        groups: dict[BatchSpec, list[_Job]] = {}
        for i, event in enumerate(events):
            try:
                self._check_size(event)  # first: a refused size spends no rate-limit token
                self.loras.check(event.loras)  # so does an unknown adapter
                if policy is not None:
                    self._admit(policy, event, i, ctx)
                jobs = self._jobs(i, event, ctx)
            except Exception as exc:  # refusals, blob and input errors: this item only
                results[i] = exc
                continue
            groups.setdefault(batch_spec(event), []).extend(jobs)

        for spec, jobs in groups.items():
            outcomes = self._run_group(spec, jobs, events, ctx)
            screened = self._screen(policy, outcomes, ctx)
            for item, outcome in outcomes.items():
                flags = screened.get(item)
                if isinstance(outcome, BaseException) or isinstance(flags, BaseException):
                    results[item] = outcome if isinstance(outcome, BaseException) else flags
                    continue
                try:
                    results[item] = self._outputs(events[item], item, spec, outcome, ctx, flags)
                except Exception as exc:  # a failed blob write fails this item only
                    results[item] = exc
        return [r if r is not None else RuntimeError("no result") for r in results]

    def _check_size(self, event: GenEvent) -> None:
        """Raise :class:`PermanentError` when the profile draws another size only."""
        native = self.models.native_size
        if native is not None and (event.width, event.height) != native:
            width, height = native
            raise PermanentError(
                f"the {self.models.profile} profile draws {width}x{height} images only (its "
                f"models were trained at that size): send width={width} height={height}",
                error_type="unsupported_size",
            )

    def _admit(self, policy: Policy, event: GenEvent, item: int, ctx: StageContext) -> None:
        """Raise :class:`PermanentError` when the policy refuses ``event``."""
        with ctx.phase("policy", item=item):
            refusal = policy.check(event.prompt_text(), event.negative_text(), event.targets)
            if refusal is not None:
                raise PermanentError(refusal.message, error_type="policy")
            # A retry was admitted on its first attempt (retries run alone): no second token.
            if ctx.attempt == 1 and (refusal := self.limiter.admit(event.tenant, policy)):
                raise PermanentError(refusal.message, error_type="rate_limited")

    def _screen(
        self,
        policy: Policy | None,
        outcomes: dict[int, list[SampleResult] | BaseException],
        ctx: StageContext,
    ) -> dict[int, list[list[str]] | BaseException]:
        """The policy's image check on one group's images, before anything is written.

        Per event: the flags of each image, or (``safety = "refuse"`` and an image
        flagged) the refusal of the whole request. Empty when the check is off.
        """
        checker = self.safety if policy is not None and policy.safety != "off" else None
        if policy is None or checker is None:
            return {}
        done = {i: rs for i, rs in outcomes.items() if not isinstance(rs, BaseException)}
        try:
            with ctx.phase("safety_check"):
                verdicts = iter(checker.flagged([r.image for rs in done.values() for r in rs]))
        except Exception as exc:  # retried by the runtime, like a failed generation
            return {item: exc for item in done}
        screened: dict[int, list[list[str]] | BaseException] = {}
        for item, results in done.items():
            flags = [[NSFW] if next(verdicts) else [] for _ in results]
            flagged = [str(k) for k, f in enumerate(flags) if f]
            if policy.safety == "refuse" and flagged:
                images = ("image " if len(flagged) == 1 else "images ") + ", ".join(flagged)
                screened[item] = PermanentError(
                    f'{images} flagged "{NSFW}" by the safety checker (policy safety = "refuse")',
                    error_type="policy",
                )
            else:
                screened[item] = flags
        return screened

    def _jobs(self, item: int, event: GenEvent, ctx: StageContext) -> list[_Job]:
        image = mask = None
        if isinstance(event, InpaintEvent):
            image, mask = self._inpaint_inputs(event, item, ctx)
        return [
            _Job(
                item=item,
                image_index=k,
                sample=Sample(
                    prompt=event.prompt_text(),
                    seed=seed,
                    negative_prompt=event.negative_text(),
                    targets=tuple(event.targets),
                    image=image,
                    mask=mask,
                ),
            )
            for k, seed in enumerate(image_seeds(event))
        ]

    def _inpaint_inputs(self, event: InpaintEvent, item: int, ctx: StageContext) -> tuple[Any, Any]:
        """The RGB image and L mask of an inpaint event, checked against its size."""
        limit = self.settings.max_image_pixels
        with ctx.phase("blob_read", item=item):
            # Blob errors propagate: the runtime dead-letters them under their error_type.
            max_bytes = png_byte_limit(limit)
            image = decode_image(ctx.blob.get(event.image, max_bytes=max_bytes), max_pixels=limit)
            mask = decode_image(
                ctx.blob.get(event.mask, max_bytes=max_bytes), max_pixels=limit, mode="L"
            )
        wanted = (event.width, event.height)
        if image.size != wanted:
            raise PermanentError(
                f"inpaint image is {image.size[0]}x{image.size[1]} pixels but the request asks "
                f"for width={event.width} height={event.height}; send the image's size",
                error_type="invalid_request",
            )
        if mask.size != image.size:
            raise PermanentError(
                f"inpaint mask is {mask.size[0]}x{mask.size[1]} pixels, the image "
                f"{image.size[0]}x{image.size[1]}: they must match",
                error_type="invalid_request",
            )
        return image, mask

    def _run_group(
        self, spec: BatchSpec, jobs: list[_Job], events: Sequence[GenEvent], ctx: StageContext
    ) -> dict[int, list[SampleResult] | BaseException]:
        """Generate every job of one compatible group; per event its results or an error."""

        def run(batch: Sequence[_Job], low_memory: bool) -> list[SampleResult]:
            progress = ProgressEmitter(
                ctx, events, [j.item for j in batch], self.progress_interval_s, self.clock
            )
            return self.generator_for(spec).generate(
                spec,
                [j.sample for j in batch],
                on_step=progress,
                phase=ctx.phase,
                low_memory=low_memory,
            )

        out: dict[int, list[SampleResult] | BaseException] = {}
        try:
            outcomes = run_with_oom_ladder(jobs, run)
        except PermanentError as exc:  # refused (e.g. an invalid LoRA): said, no traceback
            log.warning("a batch of %d images refused: %s", len(jobs), exc)
            return {job.item: exc for job in jobs}
        except Exception as exc:  # never crash the worker: the runtime retries or dead-letters
            log.exception("generation failed for a batch of %d images", len(jobs))
            return {job.item: exc for job in jobs}
        for job, outcome in zip(jobs, outcomes, strict=True):
            current = out.get(job.item)
            if isinstance(current, BaseException):
                continue
            if isinstance(outcome, BaseException):
                out[job.item] = outcome
            else:
                out.setdefault(job.item, []).append(outcome)  # type: ignore[union-attr]
        return out

    def _outputs(
        self,
        event: GenEvent,
        item: int,
        spec: BatchSpec,
        results: list[SampleResult],
        ctx: StageContext,
        flags: list[list[str]] | None = None,
    ) -> list[Output]:
        """Write the PNGs of one event's images (made in a batch of ``spec``) and build its
        image-ready events (``flags``: what the image check found per image; None: no
        check ran)."""
        inpaint = isinstance(event, InpaintEvent)
        models = self.generator_for(spec).models
        model = models.inpaint_name if inpaint else models.name
        revision = self.revision(inpaint=inpaint, scene=spec.scene)
        built: list[tuple[int, SampleResult, Any, dict[str, Any]]] = []
        with ctx.phase("blob_write", item=item):
            for k, result in enumerate(results):
                image_ref = ctx.blob.put(
                    blob_key(event.id, k, STAGE_BLOB_DIR, "image.png", tenant=event.tenant),
                    encode_png(result.image),
                    PNG,
                )
                heatmaps = {}
                for j, target in enumerate(event.targets):
                    if target in result.heatmaps and target not in heatmaps:
                        heatmaps[target] = ctx.blob.put(
                            blob_key(
                                event.id, k, STAGE_BLOB_DIR, f"heatmap-{j}.png", tenant=event.tenant
                            ),
                            encode_heatmap(result.heatmaps[target]),
                            HEATMAP_MEDIA_TYPE,
                        )
                built.append((k, result, image_ref, heatmaps))
        timings = ctx.timings_ms(item)
        outputs = []
        for k, result, image_ref, heatmaps in built:
            params = ResolvedParams(
                prompt=event.prompt_text(),
                negative_prompt=event.negative_text(),
                width=event.width,
                height=event.height,
                steps=event.steps,
                guidance_scale=event.guidance_scale,
                sampler=event.sampler,
                seed=result.seed,
                num_images=event.num_images,
                mode="inpaint" if inpaint else "txt2img",
                progressive=None if inpaint else event.progressive,
                strength=event.strength if isinstance(event, InpaintEvent) else None,
                loras=list(event.loras) or None,
            )
            ready = ImageReadyEvent(
                id=event.id,
                image_index=k,
                image=image_ref,
                params=params,
                model=model,
                heatmaps=heatmaps,
                targets=list(event.targets),
                missing_targets=result.missing_targets,
                segmentation=event.segmentation,
                asset=event.asset,
                timings_ms=timings,
                tenant=event.tenant,
                callback_url=event.callback_url,
                scene=event.scene,
                flags=flags[k] if flags is not None else None,
                model_revision=revision,
            )
            outputs.append(Output(ctx.topics.images, ready))
        return outputs
