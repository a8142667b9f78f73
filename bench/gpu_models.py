"""Benchmark: the current models on one GPU, one function per model family.

- ``sdxl``: SDXL base with seeded random weights (the ``random`` profile with
  ``GENSEG_SD_ARCH=sdxl``: the full-size architecture, its compute, no download) at
  1024x1024, 30 steps, batches of 1 and 4, with and without heat maps (one target per
  prompt records the cross-attention), fp16 on CUDA: seconds per image.
- ``seg``: the segmenters side by side: segment-anything ViT-H, SAM 2.1 Hiera large and
  tiny, SAM 3, image latency at batches 1 and 8 (encoder pass over the batch, one prompt
  or text concept decoded per image), bf16 on CUDA (tiny: each one's tiny configuration).

Each family is a function ``(Options) -> dict`` in :data:`FAMILIES`; ``--only`` picks
some. The last line is one JSON object ``{"bench": "gpu_models", "machine": {...},
"results": {family: {...}}}``.

    python bench/gpu_models.py                          # on a device machine
    python bench/gpu_models.py --device cpu --tiny      # tiny models, seconds, any machine
    python bench/gpu_models.py --only sdxl --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe

log = logging.getLogger("bench.gpu_models")


@dataclass(frozen=True)
class Options:
    """What every family's bench gets: the device, tiny mode, timed repeats per row."""

    device: str = "auto"
    tiny: bool = False
    repeats: int = 2

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """One warm-up call (kernels, allocator), then ``repeats`` timed calls: the best and
    every run in seconds, and the peak GPU memory of the timed calls."""
    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        runs.append(time.perf_counter() - started)
    row: dict[str, Any] = {"best_s": round(min(runs), 4), "runs_s": [round(t, 4) for t in runs]}
    if device.type == "cuda":
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def machine(device: torch.device) -> dict[str, Any]:
    """bench/machine.py's facts, and the GPU's when one runs the bench."""
    info = describe()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


# --- families ----------------------------------------------------------------------------


def bench_sdxl(opts: Options) -> dict[str, Any]:
    """SDXL text-to-image: 1024x1024, 30 steps (tiny: 64x64, 2 steps), batches 1 and 4,
    heat maps off and on; seconds per image."""
    from gen_worker.generate import BatchSpec, Generator, Sample
    from gen_worker.profiles import GenModels, RuntimeOptions
    from plumbing.settings import Settings

    size, steps = (64, 2) if opts.tiny else (1024, 30)
    settings = Settings(models="tiny" if opts.tiny else "random", sd_arch="sdxl")
    started = time.perf_counter()
    models = GenModels.from_settings(settings, RuntimeOptions(device=opts.device))
    load_s = time.perf_counter() - started
    generator = Generator(models)
    log.info("%s on %s loaded in %.1f s", models.name, models.device, load_s)
    spec = BatchSpec(
        mode="txt2img", width=size, height=size, steps=steps, guidance_scale=7.5, sampler="dpmpp_2m"
    )
    rows = []
    for batch in (1, 4):
        for heatmaps in (False, True):
            samples = [
                Sample(
                    prompt=f"a modern minimalist coffee cup on a wooden table, photo {i}",
                    seed=1000 + i,
                    targets=("coffee cup",) if heatmaps else (),
                )
                for i in range(batch)
            ]
            timed = time_calls(
                lambda s=samples: generator.generate(spec, s), models.device, opts.repeats
            )
            row = {
                "batch": batch,
                "heatmaps": heatmaps,
                "s_per_image": round(timed["best_s"] / batch, 4),
                **timed,
            }
            log.info("sdxl batch %d heatmaps %s: %.4f s/image", batch, heatmaps, row["s_per_image"])
            rows.append(row)
    return {
        "model": models.name,
        "device": str(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
        "size": size,
        "steps": steps,
        "sampler": spec.sampler,
        "batch_invariant": generator.batch_invariant,
        "load_s": round(load_s, 2),
        "rows": rows,
    }


# --- segmenters (SAM ViT-H, SAM 2.1 large and tiny, SAM 3) ------------------------------

#: Segmenter batch sizes: images per encoder pass.
SEG_BATCHES = (1, 8)


def seg_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what a GPU segmenter would run); fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def seg_rows(
    opts: Options,
    family: str,
    model_name: str,
    model: torch.nn.Module,
    side: int,
    encode: Callable[[torch.Tensor], Any],
    decode: Callable[[Any], object],
) -> list[dict[str, Any]]:
    """Per batch size B: one encoder pass over B random images (``encoder``), one
    prompt decoded on image 0's embedding (``decode``), and ``s_per_image`` = (encoder
    + B decodes) / B: what an image costs the worker at that batch."""
    device = opts.torch_device()
    dtype = next(model.parameters()).dtype
    rows = []
    for batch in SEG_BATCHES:
        gen = torch.Generator().manual_seed(batch)
        pixels = torch.randn(batch, 3, side, side, generator=gen).to(device, dtype)
        encoder = time_calls(lambda p=pixels: encode(p), device, opts.repeats)
        embedding = encode(pixels)
        decoder = time_calls(lambda e=embedding: decode(e), device, opts.repeats * 3)
        per_image = (encoder["best_s"] + batch * decoder["best_s"]) / batch
        rows.append(
            {
                "family": family,
                "model": model_name,
                "batch": batch,
                "input_px": side,
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "s_per_image": round(per_image, 5),
                "encoder": encoder,
                "decode": decoder,
            }
        )
        log.info("%s batch %d: %.5f s/image", model_name, batch, per_image)
        del pixels, embedding
    return rows


@torch.inference_mode()
def bench_sam(opts: Options) -> list[dict[str, Any]]:
    """segment-anything ViT-H, 1024 px (tiny: the worker's tiny SAM, 256 px): box + point
    prompt, three masks upsampled to the input size."""
    from seg_worker.profiles import build_sam

    device = opts.torch_device()
    dtype = seg_dtype(device)
    arch = "tiny" if opts.tiny else "vit_h"
    model = build_sam(arch).to(device, dtype)
    model.prompt_encoder.float()  # it casts point coordinates to fp32 itself
    side = model.image_encoder.img_size
    box = torch.tensor([[side * 0.25, side * 0.25, side * 0.6, side * 0.7]], device=device)
    point = torch.tensor([[[side * 0.4, side * 0.45]]], device=device)
    label = torch.ones((1, 1), dtype=torch.int, device=device)
    dense_pe = model.prompt_encoder.get_dense_pe().to(dtype)

    def decode(features: torch.Tensor) -> torch.Tensor:
        sparse, dense = model.prompt_encoder(points=(point, label), boxes=box, masks=None)
        low_res, _ = model.mask_decoder(
            image_embeddings=features[:1],
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
        )
        return model.postprocess_masks(low_res, (side, side), (side, side))

    return seg_rows(opts, "sam", f"sam-{arch}", model, side, model.image_encoder, decode)


@torch.inference_mode()
def bench_sam2(opts: Options, size: str) -> list[dict[str, Any]]:
    """SAM 2.1 (transformers ``Sam2Model``) Hiera ``size``, 1024 px (tiny: the tiny
    configuration, 256 px): box + point prompt, three masks upsampled to the input size."""
    from seg_worker.hf_sam2 import build_sam2

    device = opts.torch_device()
    dtype = seg_dtype(device)
    name = f"sam2.1-hiera-{size}"
    model, _ = build_sam2("tiny" if opts.tiny else f"facebook/{name}")
    model = model.to(device, dtype)
    side = int(model.config.prompt_encoder_config.image_size)
    points = torch.tensor([[[[side * 0.4, side * 0.45]]]], device=device, dtype=dtype)
    labels = torch.ones((1, 1, 1), dtype=torch.long, device=device)
    boxes = torch.tensor(
        [[[side * 0.25, side * 0.25, side * 0.6, side * 0.7]]], device=device, dtype=dtype
    )

    def decode(levels: list[torch.Tensor]) -> torch.Tensor:
        out = model(
            image_embeddings=[level[:1] for level in levels],
            input_points=points,
            input_labels=labels,
            input_boxes=boxes,
            multimask_output=True,
        )
        return torch.nn.functional.interpolate(out.pred_masks[0], (side, side), mode="bilinear")

    label = f"{name} (tiny config)" if opts.tiny else name
    return seg_rows(opts, "sam2", label, model, side, model.get_image_embeddings, decode)


@torch.inference_mode()
def bench_sam3(opts: Options) -> list[dict[str, Any]]:
    """SAM 3 (transformers ``Sam3Model``), 1008 px (tiny: 224 px): backbone and neck per
    image, then one text concept with its five best masks upsampled to the input size."""
    from seg_worker.hf_sam3 import build_sam3

    device = opts.torch_device()
    model, processor = build_sam3("tiny" if opts.tiny else "full")
    model = model.to(device, seg_dtype(device))
    side = int(model.config.vision_config.backbone_config.image_size)
    text = processor.tokenizer(
        ["red cup"], padding="max_length", max_length=32, return_tensors="pt"
    ).to(device)

    def decode(vision: Any) -> torch.Tensor:
        first = type(vision)(
            last_hidden_state=vision.last_hidden_state[:1],
            fpn_hidden_states=tuple(level[:1] for level in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p[:1] for p in vision.fpn_position_encoding),
        )
        out = model(vision_embeds=first, **text)
        scores = out.pred_logits[0].sigmoid() * out.presence_logits[0].sigmoid()
        best = scores.topk(min(5, scores.numel())).indices
        masks = out.pred_masks[0][best][None]
        return torch.nn.functional.interpolate(masks, (side, side), mode="bilinear")

    name = "sam3 (tiny config)" if opts.tiny else "sam3"
    return seg_rows(opts, "sam3", name, model, side, model.get_vision_features, decode)


def bench_seg(opts: Options) -> dict[str, Any]:
    """The segmenters side by side: SAM ViT-H, SAM 2.1 large and tiny, SAM 3, image
    latency at batches 1 and 8 (random weights; bf16 on a GPU)."""
    device = opts.torch_device()
    rows: list[dict[str, Any]] = []
    for bench in (
        bench_sam,
        lambda o: bench_sam2(o, "large"),
        lambda o: bench_sam2(o, "tiny"),
        bench_sam3,
    ):
        gc.collect()  # the previous model goes before this one's peak memory is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows += bench(opts)
    return {
        "device": str(device),
        "dtype": str(seg_dtype(device)).removeprefix("torch."),
        "batches": list(SEG_BATCHES),
        "rows": rows,
    }


#: Model family -> its bench. The segmenter's families (SAM 2.1, SAM 3, SAM ViT-H) join here.
FAMILIES: dict[str, Callable[[Options], dict[str, Any]]] = {"sdxl": bench_sdxl, "seg": bench_seg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models at tiny sizes")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row")
    parser.add_argument(
        "--only", default=",".join(FAMILIES), help=f"families to run, of {','.join(FAMILIES)}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown or not chosen:
        print(
            f"--only {args.only!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(FAMILIES)}",
            file=sys.stderr,
        )
        return 2
    opts = Options(device=args.device, tiny=args.tiny, repeats=args.repeats)
    results = {name: FAMILIES[name](opts) for name in chosen}
    print(
        json.dumps(
            {
                "bench": "gpu_models",
                "tiny": args.tiny,
                "repeats": args.repeats,
                "machine": machine(opts.torch_device()),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
