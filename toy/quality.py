"""Does "text -> heat map -> SAM -> cut-out" find the right object? Measured on the toy world.

For each evaluation prompt (a caption of an evaluation-seed scene, never a training
seed, and one of its objects as the target) the ``toy`` generator makes an image and
the target's heat map; the heat map goes through the same 16-bit PNG as in a
``masks`` event; then the segmenter runs in three modes on that image:

- ``attention``: the heat map's prompts (the default mode of a request);
- ``auto``: SAM's automatic mask generator; its best-scored object counts (what a
  client that takes the first asset gets: auto mode does not know the target), and
  ``auto_any`` is the best IoU among all the objects it returns;
- ``oracle``: a ``boxes`` request with the box of the true object (the best a
  prompt can do; what SAM itself is worth).

The truth is the object the generated image actually contains, found by colour
(:func:`toy.world.find_object`; of two regions of the asked colour, the one of the
asked shape): the generator may put it anywhere. A target is
*generated* when that region exists and :func:`toy.world.classify_shape` names the
asked shape. IoU figures are over generated targets (a mode that returns nothing
scores 0 there, and counts as a no-match); the attention mode is also scored over
*all* targets, where one that was not generated counts 0. Means come with a 95 %
confidence interval (normal approximation) and the number of prompts they are over.

Duplicates: within one mode's result for one image, two objects whose masks overlap
with IoU above :data:`seg_worker.finishing.DUPLICATE_IOU` (the segmenter's
non-maximum suppression should leave none).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from gen_worker.generate import BatchSpec, Generator, Sample, SampleResult
from plumbing.images import decode_heatmap, encode_heatmap
from schemas import SegmentationOptions
from seg_worker.finishing import DUPLICATE_IOU
from seg_worker.prompts import resize_heatmap
from seg_worker.segment import Segmenter
from toy.gen_data import to_pixels
from toy.gen_losses import shape_swap_table
from toy.world import (
    EVAL_SEED_BASE,
    SHAPES,
    classify_shape,
    find_object,
    iou,
    make_scene,
    mask_box,
    parse_target,
)

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("attention", "auto", "auto_any", "oracle")


@dataclass(frozen=True)
class Prompt:
    """One evaluation request: the caption of scene ``seed`` and one of its objects."""

    seed: int
    caption: str
    target: str


def eval_prompts(count: int, *, seed_base: int = EVAL_SEED_BASE) -> list[Prompt]:
    """``count`` fixed prompts from evaluation seeds; targets cycle over object positions."""
    prompts = []
    for i in range(count):
        scene = make_scene(seed_base + i)
        obj = scene.objects[i % len(scene.objects)]
        prompts.append(Prompt(scene.seed, scene.caption, obj.name))
    return prompts


@dataclass
class Outcome:
    """What happened to one prompt. ``ious[mode]``: None when the target was not generated."""

    prompt: Prompt
    colour_found: bool
    shape: str | None
    generated: bool
    ious: dict[str, float | None] = field(default_factory=dict)
    matched: dict[str, bool] = field(default_factory=dict)
    heat_peak_inside: bool | None = None
    #: Per mode, pairs of returned objects overlapping with IoU > DUPLICATE_IOU.
    duplicates: dict[str, int] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    masks: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class GenParams:
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    size: int = 64
    batch: int = 8


def generate(
    generator: Generator, prompts: Sequence[Prompt], params: GenParams
) -> list[SampleResult]:
    """The images and heat maps of ``prompts``, in order.

    Each sample's seed is its prompt's scene seed: distinct for every prompt, and the
    same whatever the batch size or the chunk the prompt falls in.
    """
    spec = BatchSpec(
        mode="txt2img",
        width=params.size,
        height=params.size,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        sampler=params.sampler,
    )
    results: list[SampleResult] = []
    for start in range(0, len(prompts), params.batch):
        chunk = prompts[start : start + params.batch]
        samples = [Sample(prompt=p.caption, seed=p.seed, targets=(p.target,)) for p in chunk]
        results += generator.generate(spec, samples)
    return results


def _first(objects: Sequence[Any], label: str | None = None) -> np.ndarray | None:
    for obj in objects:
        if label is None or obj.label == label:
            return obj.mask
    return None


def duplicate_pairs(masks: Sequence[np.ndarray], max_iou: float = DUPLICATE_IOU) -> int:
    """Pairs among ``masks`` (bool ``[H, W]``) overlapping with IoU above ``max_iou``."""
    return sum(iou(a, b) > max_iou for i, a in enumerate(masks) for b in masks[i + 1 :])


def evaluate(
    prompt: Prompt,
    result: SampleResult,
    segmenter: Segmenter | None,
    options: SegmentationOptions,
) -> Outcome:
    """Score one generated image; ``segmenter`` None: generation figures only."""
    image = np.asarray(result.image.convert("RGB"))
    colour, shape = parse_target(prompt.target)
    truth = find_object(image, colour, shape)
    found_shape = classify_shape(truth)[0] if truth is not None else None
    generated = truth is not None and found_shape == shape
    heat = None
    if prompt.target in result.heatmaps:
        heat = decode_heatmap(encode_heatmap(result.heatmaps[prompt.target]))
    outcome = Outcome(prompt, truth is not None, found_shape, generated, image=image, heatmap=heat)
    if heat is not None and truth is not None:
        big = resize_heatmap(heat, *image.shape[:2])
        py, px = np.unravel_index(int(np.argmax(big)), big.shape)
        outcome.heat_peak_inside = bool(truth[py, px])
    if segmenter is None:
        return outcome
    sha = hashlib.sha256(image.tobytes()).hexdigest()
    requests: dict[str, SegmentationOptions] = {
        "attention": options.model_copy(update={"mode": "attention"}),
        "auto": options.model_copy(update={"mode": "auto"}),
    }
    if truth is not None:
        x0, y0, x1, y1 = mask_box(truth)
        requests["oracle"] = options.model_copy(
            update={"mode": "boxes", "boxes": [[x0, y0, x1 - x0, y1 - y0]]}
        )
    heatmaps = {prompt.target: heat} if heat is not None else {}
    for mode, opts in requests.items():
        objects = segmenter.segment(
            image,
            sha,
            opts,
            targets=[prompt.target],
            heatmaps=heatmaps if mode == "attention" else None,
            missing_targets=list(result.missing_targets),
        )
        mask = _first(objects, prompt.target if mode == "attention" else None)
        outcome.masks[mode] = mask
        outcome.duplicates[mode] = duplicate_pairs([o.mask for o in objects])
        outcome.matched[mode] = mask is not None
        if generated:
            outcome.ious[mode] = iou(mask, truth) if mask is not None else 0.0
            if mode == "auto":
                outcome.matched["auto_any"] = mask is not None
                outcome.ious["auto_any"] = max((iou(o.mask, truth) for o in objects), default=0.0)
    return outcome


@dataclass(frozen=True)
class Mean:
    """A mean over ``n`` values with the half-width of its 95 % confidence interval
    (normal approximation: 1.96 standard errors)."""

    value: float
    n: int
    ci95: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Mean:
        v = np.asarray(values, np.float64)
        if len(v) == 0:
            return cls(float("nan"), 0, float("nan"))
        half = 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        return cls(float(v.mean()), len(v), half)


@dataclass
class Report:
    """Figures over all prompts (rates in 0..1).

    ``modes[mode]``: over generated targets. ``attention_all``: the attention IoU over
    every prompt (0 where the target was not generated); ``attention_drawn`` and
    ``oracle_drawn``: over generated targets; ``oracle_gap``: oracle minus attention,
    paired per generated target. ``duplicates``: duplicate pairs per mode, all prompts.
    """

    prompts: int
    generation_accuracy: float
    colour_found_rate: float
    heat_peak_inside_rate: float | None
    modes: dict[str, dict[str, float]]
    attention_all: Mean
    attention_drawn: Mean
    oracle_drawn: Mean
    oracle_gap: Mean
    duplicates: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompts": self.prompts,
            "generated": self.attention_drawn.n,
            "generation_accuracy": round(self.generation_accuracy, 4),
            "colour_found_rate": round(self.colour_found_rate, 4),
            "heat_peak_inside_rate": (
                None if self.heat_peak_inside_rate is None else round(self.heat_peak_inside_rate, 4)
            ),
        }
        for mode, figures in self.modes.items():
            for key, value in figures.items():
                out[f"{mode}_{key}"] = round(value, 4)
        for name in ("attention_all", "attention_drawn", "oracle_drawn", "oracle_gap"):
            mean: Mean = getattr(self, name)
            out[f"{name}_miou" if name != "oracle_gap" else name] = _rounded(mean.value)
            out[f"{name}_ci95"] = _rounded(mean.ci95)
            out[f"{name}_n"] = mean.n
        out["duplicate_pairs"] = sum(self.duplicates.values())
        for mode, count in self.duplicates.items():
            out[f"{mode}_duplicate_pairs"] = count
        return out


def _rounded(value: float) -> float | None:
    """``value`` to 4 places; None for NaN (no value, or no interval from one value),
    which JSON cannot hold."""
    return round(value, 4) if np.isfinite(value) else None


def summarise(outcomes: Sequence[Outcome]) -> Report:
    n = len(outcomes)
    generated = [o for o in outcomes if o.generated]
    inside = [o.heat_peak_inside for o in outcomes if o.heat_peak_inside is not None]
    modes: dict[str, dict[str, float]] = {}
    for mode in MODES:
        ious = [o.ious[mode] for o in generated if o.ious.get(mode) is not None]
        if not ious:
            continue
        values = np.asarray(ious, np.float64)
        modes[mode] = {
            "mean_iou": float(values.mean()),
            "success_rate": float((values >= 0.5).mean()),
            "no_match_rate": float(np.mean([not o.matched.get(mode, False) for o in generated])),
        }
    scored = [o for o in generated if "attention" in o.ious and "oracle" in o.ious]
    attention = [float(o.ious["attention"] or 0.0) for o in scored]
    oracle = [float(o.ious["oracle"] or 0.0) for o in scored]
    # Over every prompt the segmenter ran on (not in a generation-only run).
    segmented = [o for o in outcomes if "attention" in o.matched]
    every = [float(o.ious.get("attention") or 0.0) if o.generated else 0.0 for o in segmented]
    duplicates: dict[str, int] = {}
    for o in outcomes:
        for mode, count in o.duplicates.items():
            duplicates[mode] = duplicates.get(mode, 0) + count
    return Report(
        prompts=n,
        generation_accuracy=len(generated) / n if n else 0.0,
        colour_found_rate=sum(o.colour_found for o in outcomes) / n if n else 0.0,
        heat_peak_inside_rate=(sum(inside) / len(inside)) if inside else None,
        modes=modes,
        attention_all=Mean.of(every),
        attention_drawn=Mean.of(attention),
        oracle_drawn=Mean.of(oracle),
        oracle_gap=Mean.of([b - a for a, b in zip(attention, oracle, strict=True)]),
        duplicates=duplicates,
    )


def run(
    generator: Generator,
    segmenter: Segmenter | None,
    prompts: Sequence[Prompt],
    params: GenParams,
    options: SegmentationOptions | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Report, list[Outcome]]:
    """Generate and score every prompt; ``on_progress(done, total)`` after each batch."""
    options = options or SegmentationOptions()
    outcomes: list[Outcome] = []
    for start in range(0, len(prompts), params.batch):
        chunk = list(prompts[start : start + params.batch])
        results = generate(generator, chunk, params)
        outcomes += [
            evaluate(p, r, segmenter, options) for p, r in zip(chunk, results, strict=True)
        ]
        if on_progress is not None:
            on_progress(len(outcomes), len(prompts))
    return summarise(outcomes), outcomes


def vae_shape_ceiling(vae: AutoencoderKL, count: int = 200) -> float:
    """Share of the objects of ``count`` evaluation scenes whose shape survives the VAE's
    round trip (encode to the latent mean, decode; named by :func:`classify_shape`).

    The generator draws through this decoder, so its accuracy cannot be expected above
    this figure: a decoder that turns stars into circles caps it whatever the UNet does.
    """
    device, dtype = vae.device, vae.dtype
    right = total = 0
    for i in range(count):
        scene = make_scene(EVAL_SEED_BASE + i)
        pixels = to_pixels(scene.image[None])
        with torch.no_grad():
            latent = vae.encode(pixels.to(device, dtype)).latent_dist.mean
            decoded = vae.decode(latent).sample[0].float().clamp(-1, 1)
        image = ((decoded.permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy()
        for obj in scene.objects:
            found = find_object(image, obj.colour, obj.shape)
            right += found is not None and classify_shape(found)[0] == obj.shape
            total += 1
    return right / total if total else 0.0


@torch.no_grad()
def caption_sensitivity(
    pipe: StableDiffusionPipeline,
    count: int = 64,
    timesteps: Sequence[int] = (100, 300, 500, 700, 900),
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """How much the denoiser uses its caption: per timestep, its mean squared error on
    ``count`` evaluation scenes with the true caption (``right``), with every shape word
    swapped for another (``swapped``) and with the empty caption (``empty``).

    A model that draws the asked shapes does clearly worse on ``swapped`` than on
    ``right``; one that only reads colours and places does not. The target is what the
    pipeline's scheduler trains (``prediction_type``).
    """
    scenes = [make_scene(EVAL_SEED_BASE + i) for i in range(count)]
    vae, unet, tokenizer = pipe.vae, pipe.unet, pipe.tokenizer
    device, dtype = unet.device, unet.dtype
    # The training-time noise arithmetic (the pipeline may hold a sampler without it).
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pixels = to_pixels(np.stack([s.image for s in scenes])).to(device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean.float().cpu() * vae.config.scaling_factor
    ids = tokenizer(
        [s.caption for s in scenes], padding="max_length",
        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    empty = tokenizer([""] * count, padding="max_length", return_tensors="pt").input_ids
    variants = {"right": ids, "swapped": shape_swap_table(tokenizer, SHAPES)[ids], "empty": empty}
    embeds = {name: pipe.text_encoder(v.to(device))[0] for name, v in variants.items()}
    rng = torch.Generator().manual_seed(seed)
    out: dict[int, dict[str, float]] = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=rng)
        steps = torch.full((count,), t)
        noisy = scheduler.add_noise(latents, noise, steps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        noisy, steps = noisy.to(device, dtype), steps.to(device)
        out[t] = {
            name: float(
                (
                    (unet(noisy, steps, encoder_hidden_states=e).sample.float().cpu() - target) ** 2
                ).mean()
            )
            for name, e in embeds.items()
        }
    return out


def contact_sheet(outcomes: Sequence[Outcome], *, scale: int = 2, columns: int = 4) -> Image.Image:
    """Per outcome: image | heat map | attention mask | oracle mask, each ``64*scale`` px."""
    tiles: list[list[Image.Image]] = []
    for o in outcomes:
        assert o.image is not None
        h, w = o.image.shape[:2]
        row = [Image.fromarray(o.image)]
        heat = o.heatmap if o.heatmap is not None else np.zeros((h // 4, w // 4), np.float32)
        row.append(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h)).convert("RGB"))
        for mode in ("attention", "oracle"):
            mask = o.masks.get(mode)
            pixels = np.zeros((h, w), np.uint8) if mask is None else mask.astype(np.uint8) * 255
            row.append(Image.fromarray(pixels).convert("RGB"))
        tiles.append(row)
    tw = 64 * scale
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * 4 * tw + (columns - 1) * 8, max(rows, 1) * tw), "white")
    for k, row in enumerate(tiles):
        r, c = divmod(k, columns)
        for j, tile in enumerate(row):
            x = c * (4 * tw + 8) + j * tw
            sheet.paste(tile.resize((tw, tw), Image.Resampling.NEAREST), (x, r * tw))
    return sheet


__all__ = [
    "MODES",
    "GenParams",
    "Mean",
    "Outcome",
    "Prompt",
    "Report",
    "contact_sheet",
    "duplicate_pairs",
    "eval_prompts",
    "evaluate",
    "generate",
    "run",
    "summarise",
]
