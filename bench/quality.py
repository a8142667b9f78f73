"""Benchmark: quality of the toy pipeline, text -> heat map -> SAM -> cut-out (issue 9).

A fixed set of evaluation prompts (captions of evaluation-seed scenes of
:mod:`toy.world`, never seen in training; one object of each as the target) runs
through the ``toy`` generator and segmenter (the workers' own classes, in process:
:class:`gen_worker.generate.Generator`, the heat map's PNG round trip,
:class:`seg_worker.segment.Segmenter`). See :mod:`toy.quality` for what is measured.

Prints the machine, one line per prompt (with ``--verbose``), a table, the attention
mode's mean IoU over all targets and over generated ones beside the oracle box's, each
with its 95 % confidence interval and number of prompts, and as the last line one JSON
object ``{"bench": "quality", ...}`` (``duplicate_pairs``: objects of one image's
result overlapping with IoU > 0.5, over all modes).

    python bench/quality.py                         # 300 prompts, shipped weights
    python bench/quality.py --prompts 5             # the CI smoke size
    python bench/quality.py --sd /tmp/sd --gen-only --sheet /tmp/sheet.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from gen_worker.generate import Generator
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.settings import Settings
from schemas import SegmentationOptions
from seg_worker.config import SegConfig
from seg_worker.predictor import CachedPredictor
from seg_worker.profiles import load_sam
from seg_worker.segment import Segmenter
from toy import quality

log = logging.getLogger("bench.quality")


def machine() -> dict[str, object]:
    return {
        **describe(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--sd", help="toy generator directory (default: the shipped weights)")
    parser.add_argument("--sam", help="toy SAM safetensors (default: the shipped weights)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-confidence", type=float, default=None)
    parser.add_argument("--smooth-px", type=int, default=None)
    parser.add_argument("--gen-only", action="store_true", help="skip the segmenter")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet of the first 32")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--probe", action="store_true",
        help="also measure how much the denoiser uses the caption's shape words",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    print(json.dumps({"machine": machine()}))
    settings = Settings(models="toy", toy_sd_model=args.sd, device=args.device)
    generator = Generator(GenModels.from_settings(settings, RuntimeOptions(device=args.device)))
    segmenter = None
    if not args.gen_only:
        sam = load_sam("toy", "toy", checkpoint=args.sam, device=args.device)
        segmenter = Segmenter(CachedPredictor(sam), SegConfig.for_profile("toy"))
    overrides = {
        k: v
        for k, v in {"min_confidence": args.min_confidence, "smooth_px": args.smooth_px}.items()
        if v is not None
    }
    options = SegmentationOptions(**overrides)
    params = quality.GenParams(
        steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, batch=args.batch
    )
    prompts = quality.eval_prompts(args.prompts)
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        rate = done / (time.monotonic() - started)
        print(f"{done}/{total} prompts ({rate:.2f}/s)", file=sys.stderr, flush=True)

    report, outcomes = quality.run(
        generator, segmenter, prompts, params, options, on_progress=progress
    )
    ceiling = quality.vae_shape_ceiling(generator.models.txt2img.vae)
    probe = quality.caption_sensitivity(generator.models.txt2img) if args.probe else None
    if args.verbose:
        for o in outcomes:
            ious = {m: None if v is None else round(v, 3) for m, v in o.ious.items()}
            print(
                json.dumps(
                    {
                        "caption": o.prompt.caption,
                        "target": o.prompt.target,
                        "generated": o.generated,
                        "shape": o.shape,
                        "heat_peak_inside": o.heat_peak_inside,
                        "duplicate_pairs": o.duplicates,
                        "iou": ious,
                    }
                )
            )
    if args.sheet:
        quality.contact_sheet(outcomes[:32]).save(args.sheet)
    figures = report.as_dict()
    print(
        f"prompts {report.prompts}  generation accuracy {report.generation_accuracy:.3f}  "
        f"colour found {report.colour_found_rate:.3f}  heat peak inside "
        f"{figures['heat_peak_inside_rate']}"
    )
    print(f"the VAE's round trip keeps {ceiling:.3f} of the evaluation objects' shapes (ceiling)")
    for t, losses in (probe or {}).items():
        print(f"denoising error at t={t}: " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print(f"{'mode':<10} {'mean IoU':>9} {'IoU>=0.5':>9} {'no match':>9} {'dup pairs':>9}")
    for mode, f in report.modes.items():
        print(
            f"{mode:<10} {f['mean_iou']:>9.3f} {f['success_rate']:>9.3f} "
            f"{f['no_match_rate']:>9.3f} {report.duplicates.get(mode, 0):>9d}"
        )
    for name, mean in (
        ("attention, all targets", report.attention_all),
        ("attention, generated", report.attention_drawn),
        ("oracle box, generated", report.oracle_drawn),
        ("oracle - attention", report.oracle_gap),
    ):
        if mean.n:
            print(f"{name:<24} {mean.value:.3f} +- {mean.ci95:.3f} (95 % CI, n={mean.n})")
    result: dict[str, object] = {
        "bench": "quality",
        **figures,
        "vae_shape_ceiling": round(ceiling, 4),
        **({"caption_sensitivity": probe} if probe is not None else {}),
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "sampler": args.sampler,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
