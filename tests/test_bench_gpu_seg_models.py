"""bench/gpu_models.py's segmenter families run end to end at tiny size on the CPU.

The GPU run (full-size SAM ViT-H, SAM 2.1 large and tiny, SAM 3, bf16) waits for a
device machine; this checks the script's code paths and its JSON, as a process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.rel_utils import REPO

SEG_MODELS = {
    ("sam", "sam-tiny"),
    ("sam2", "sam2.1-hiera-large (tiny config)"),
    ("sam2", "sam2.1-hiera-tiny (tiny config)"),
    ("sam3", "sam3 (tiny config)"),
}


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/gpu_models.py", "--device", "cpu", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_seg_family_reports_every_segmenter_at_batches_1_and_8() -> None:
    done = run_bench("--tiny", "--only", "seg", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "gpu_models" and report["tiny"] is True
    assert list(report["results"]) == ["seg"]  # --only: the generator's families did not run
    seg = report["results"]["seg"]
    assert seg["device"] == "cpu" and seg["dtype"] == "float32" and seg["batches"] == [1, 8]
    rows = seg["rows"]
    assert sorted((r["family"], r["model"], r["batch"]) for r in rows) == sorted(
        (family, model, batch) for family, model in SEG_MODELS for batch in (1, 8)
    )
    for row in rows:
        assert row["input_px"] == (224 if row["family"] == "sam3" else 256)
        assert len(row["encoder"]["runs_s"]) == 1 and len(row["decode"]["runs_s"]) == 3
        encoder, decode = row["encoder"]["best_s"], row["decode"]["best_s"]
        assert encoder > 0 and decode > 0
        assert abs(row["s_per_image"] - (encoder + row["batch"] * decode) / row["batch"]) < 1e-4
        assert 0 < row["params_m"] < 1  # tiny configurations


def test_an_unknown_family_is_refused() -> None:
    done = run_bench("--tiny", "--only", "sam4")
    assert done.returncode != 0 and "sam4" in done.stderr and "seg" in done.stderr
