"""``torch.compile`` of the UNet (heat-map recorder included) and of SAM's image encoder,
on the CPU with a backend that runs each captured graph as it is (no code generation):
what is compiled, how often, and that it computes what the eager modules compute."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from gen_worker.attention import CrossAttentionRecorder
from gen_worker.generate import BatchSpec, Generator, Sample, SampleResult
from gen_worker.profiles import GenModels, RuntimeOptions, compile_unet, fuse_projections
from plumbing.settings import Settings
from seg_worker.predictor import CachedPredictor
from seg_worker.profiles import compile_image_encoder, load_sam

SPEC = BatchSpec(
    mode="txt2img", width=64, height=64, steps=3, guidance_scale=7.5, sampler="dpmpp_2m"
)
SAMPLES = [
    Sample("a coffee cup on a wooden table", 3, None, ("cup",)),
    Sample("a red cup and a plate", 4, None, ("cup", "plate")),
]


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs each unchanged."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def generator(batch_invariant: bool) -> Generator:
    options = RuntimeOptions(device="cpu", batch_invariant=batch_invariant)
    return Generator(GenModels.from_settings(Settings(models="tiny"), options))


def assert_same(
    eager: list[SampleResult], compiled: list[SampleResult], pixels: int = 0, heat: float = 1e-6
) -> None:
    """Images within ``pixels`` levels of 255, heat maps within ``heat``."""
    for a, b in zip(eager, compiled, strict=True):
        diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
        assert diff.max() <= pixels
        assert a.heatmaps.keys() == b.heatmaps.keys() and a.heatmaps
        for target in a.heatmaps:
            np.testing.assert_allclose(a.heatmaps[target], b.heatmaps[target], atol=heat)


def test_the_recorder_compiles_into_the_unets_graph_once_per_request_shape() -> None:
    gen = generator(batch_invariant=False)
    eager = gen.generate(SPEC, SAMPLES)
    backend = CountingBackend()
    pipe = gen.models.txt2img
    # As GenModels does on CUDA, but whole-graph: a graph break would raise here.
    pipe.unet = compile_unet(pipe.unet, backend=backend, fullgraph=True)
    compiled = gen.generate(SPEC, SAMPLES)
    assert_same(eager, compiled)
    assert backend.graphs == 1, "one graph for every step of the request, recording included"
    assert_same(eager, gen.generate(SPEC, SAMPLES))
    assert backend.graphs == 1, "the same request shape again compiles nothing"


def test_a_compiled_unet_runs_per_sample_and_stays_compiled() -> None:
    """The CPU's batch-invariant evaluation wraps the compiled forward for a request,
    and gives it back afterwards (it used to delete it: the next call failed)."""
    gen = generator(batch_invariant=True)
    eager = gen.generate(SPEC, SAMPLES)
    backend = CountingBackend()
    pipe = gen.models.txt2img
    pipe.unet = compile_unet(pipe.unet, backend=backend, fullgraph=True)
    assert_same(eager, gen.generate(SPEC, SAMPLES))
    assert_same(eager, gen.generate(SPEC, SAMPLES))
    assert backend.graphs == 1, "one sample's shape, compiled once"


def test_fused_projections_compile_with_the_recorder_and_keep_its_maps() -> None:
    """The fast path as GenModels sets it up on CUDA: projections fused, then compiled.
    The recorder takes keys and values from the fused projection."""
    eager = generator(batch_invariant=False).generate(SPEC, SAMPLES)
    gen = generator(batch_invariant=False)
    pipe = gen.models.txt2img
    fuse_projections(pipe)
    calls: Counter[str] = Counter()
    hooks = [
        module.register_forward_hook(lambda *_, kind=name.rsplit(".", 1)[1]: calls.update([kind]))
        for name, module in pipe.unet.named_modules()
        if name.endswith(("attn2.to_k", "attn2.to_v", "attn2.to_kv"))
    ]
    fused = gen.generate(SPEC, SAMPLES)
    for hook in hooks:
        hook.remove()
    assert calls["to_kv"] > 0 and calls["to_k"] == calls["to_v"] == 0
    # One fused matrix product instead of two or three rounds differently on the CPU.
    assert_same(eager, fused, pixels=2, heat=1e-4)
    processors = pipe.unet.attn_processors
    assert {type(p).__name__ for n, p in processors.items() if n.endswith("attn1.processor")} == {
        "FusedAttnProcessor2_0"
    }
    assert all(isinstance(p, CrossAttentionRecorder) for n, p in processors.items() if "attn2" in n)
    backend = CountingBackend()
    pipe.unet = compile_unet(pipe.unet, backend=backend, fullgraph=True)
    assert_same(eager, gen.generate(SPEC, SAMPLES), pixels=2, heat=1e-4)
    assert backend.graphs == 1


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_sams_image_encoder_compiles_once_per_batch_size(dtype: torch.dtype | None) -> None:
    # bf16: the CUDA default (GENSEG_SEG_DTYPE=auto), the encoder compiled under autocast.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(5)]
    eager = CachedPredictor(load_sam("tiny", "tiny"), dtype=dtype)
    model = load_sam("tiny", "tiny")  # the same seeded weights
    backend = CountingBackend()
    compile_image_encoder(model, backend=backend, fullgraph=True)
    compiled = CachedPredictor(model, dtype=dtype)
    pair = [((f"b{i}", 1.0, None), image) for i, image in enumerate(images[:2])]
    batched = zip(
        eager.embed_many(pair, batch_size=2), compiled.embed_many(pair, batch_size=2), strict=True
    )
    for a, b in batched:
        torch.testing.assert_close(a.features, b.features)
    assert backend.graphs == 1
    for i, image in enumerate(images):
        a = eager.embed((f"x{i}", 1.0, None), image)
        b = compiled.embed((f"x{i}", 1.0, None), image)
        torch.testing.assert_close(a.features, b.features)
    assert backend.graphs == 2, "batches of 2 and of 1: one graph each"


@pytest.mark.parametrize(
    ("settings", "fused"),
    [
        ({"torch_compile": True}, True),
        ({"torch_compile": False}, False),
        ({"torch_compile": True, "xformers": True}, False),  # xFormers' processors stay
        ({"torch_compile": True, "lora_dir": "/loras"}, False),  # adapters patch to_q, ...
    ],
)
def test_the_fast_path_fuses_projections_unless_xformers_or_adapters(
    settings: dict[str, Any], fused: bool
) -> None:
    options = RuntimeOptions.from_settings(Settings(**settings))
    assert options.fuse_projections is fused
