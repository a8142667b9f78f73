"""The GPU measurements of issue 17, Part 2, as one command for a lent device machine.

A device machine is lent for minutes (15 of device time per session, 10 a command,
the machine's start included), starts bare and cannot reach a package registry. This
driver runs the GPU benchmarks one after another inside one time budget, so that one
call measures everything and a step that overruns costs only itself:

1. ``check``: the GPU (``nvidia-smi -L``), the imports the benchmarks need and the tansu
   binary, in seconds, so that a missing package fails at once and says which;
2. ``pipeline``: ``bench/gpu_pipeline.py`` at its defaults (SD 1.5 fp16 512x512, 25
   steps, heat maps on, SAM ViT-H bf16: latency one request at a time, throughput at
   saturation, both against the direct calls);
3. ``gen``: ``bench/gpu_gen.py --batches 1,8`` (eager, heat maps on): the generator's
   targets, batch 1 <= 0.45 s an image and batch 8 >= 7 images/s;
4. ``gen_compile``: the same with ``--compile`` (``GENSEG_TORCH_COMPILE``: fused
   projections, the UNet compiled with the heat-map recorder inside), its warm-up
   seconds being the compile cost;
5. ``pipeline_compile``: ``bench/gpu_pipeline.py --compile`` with fewer requests.

Each step runs in a process group of its own (the benchmark, its broker and any
compile workers) and is ended (SIGTERM, then SIGKILL) when its cap or the budget runs
out; a step that could not have its minimum is skipped. Each step's output goes to
``<out>/<step>.log``; ``<out>/summary.json`` and the last printed line hold every
step's exit status, seconds and last-line JSON (null where it printed none).

``--wheels DIR`` (default ``.whl`` when it exists; ``--no-wheels``: none) installs
the packages the device's image lacks from wheels carried with the working tree
(``scripts/gpu_wheels.sh`` fetches them here) into a folder the steps put first on
their ``PYTHONPATH``. ``--cpu`` rehearses every step with tiny models on the CPU (what
the tests run).

    bash scripts/gpu_wheels.sh          # here: .whl/ for the device's Python 3.12
    # then, as one device call: carry [".whl"], timeout_s 600
    PYTHONUNBUFFERED=1 python3 bench/gpu_run.py --out $OUT
    python bench/gpu_run.py --cpu       # the rehearsal, about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# The make bench table's reader of a log's last-line JSON (standard library only, as
# this driver must be: it runs before the carried wheels are installed).
from bench_table import last_json  # noqa: E402

#: Seconds a step may take after SIGTERM before SIGKILL.
GRACE_S = 5.0
CHECK = """
import shutil, subprocess, torch
import bench.gpu_gen, bench.gpu_pipeline
from plumbing.broker import tansu_binary
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
print("tansu", tansu_binary())
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "-L"], check=False)
"""


@dataclass(frozen=True)
class Step:
    """One benchmark command: at least ``min_s`` of the budget to start, at most ``cap_s``."""

    name: str
    argv: list[str]
    min_s: float
    cap_s: float


def steps(cpu: bool) -> list[Step]:
    """The steps in the order they run (the most wanted figures first)."""
    py = sys.executable
    if cpu:
        pipeline = ["--device", "cpu", "--tiny", "--latency-requests", "2"]
        pipeline += ["--saturation-requests", "4", "--warmup", "1"]
        gen = ["--device", "cpu", "--profile", "tiny", "--size", "64", "--steps", "4"]
        gen += ["--batches", "1,2", "--repeats", "2"]
        fewer: list[str] = []
    else:
        pipeline, gen = [], ["--batches", "1,8", "--repeats", "5"]
        fewer = ["--latency-requests", "5", "--saturation-requests", "32"]
    return [
        Step("check", [py, "-c", CHECK], 5, 90),
        Step("pipeline", [py, "bench/gpu_pipeline.py", *pipeline], 60, 300),
        Step("gen", [py, "bench/gpu_gen.py", *gen], 30, 150),
        Step("gen_compile", [py, "bench/gpu_gen.py", *gen, "--compile"], 60, 240),
        Step(
            "pipeline_compile",
            [py, "bench/gpu_pipeline.py", *pipeline, *fewer, "--compile"],
            90,
            300,
        ),
    ]


def install_wheels(wheels: Path, target: Path, log: Path) -> int:
    """pip-install every wheel in ``wheels`` into ``target`` (no index, no dependencies:
    the set is complete as fetched); returns pip's exit status."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--upgrade", "--target", str(target)]
    command += sorted(str(w) for w in wheels.glob("*.whl"))
    with log.open("w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode


def run_step(step: Step, seconds: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``step`` for at most ``seconds``; its whole process group ends with it."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        timed_out = False
        try:
            rc = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = stop_group(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a broker the step left behind
    return {
        "rc": rc,
        "timed_out": timed_out,
        "s": round(time.monotonic() - started, 1),
        "result": last_json(log),
    }


def stop_group(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM the process group, SIGKILL it after :data:`GRACE_S`; the exit status."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="for all steps together")
    parser.add_argument("--out", default=os.environ.get("OUT") or "genseg-out/gpu")
    parser.add_argument("--wheels", default=None, help="wheels to install first (default .whl)")
    parser.add_argument("--no-wheels", action="store_true", help="install none, even from .whl")
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--only", default=None, help="comma-separated step names")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT)]
    wheels = Path(args.wheels) if args.wheels else ROOT / ".whl"
    summary: dict[str, Any] = {"bench": "gpu_run", "cpu": args.cpu, "budget_s": args.budget_s}
    if not args.no_wheels and (args.wheels or wheels.is_dir()):
        if not any(wheels.glob("*.whl")):
            raise SystemExit(f"no wheels in {wheels}: run scripts/gpu_wheels.sh")
        target = Path(os.environ.get("TMPDIR", "/tmp")) / "genseg-site"
        rc = install_wheels(wheels, target, out / "install.log")
        summary["wheels"] = {"dir": str(wheels), "rc": rc}
        if rc != 0:
            print(f"installing {wheels} failed: see {out / 'install.log'}", file=sys.stderr)
            print(json.dumps(summary))
            raise SystemExit(1)
        paths.insert(0, str(target))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    wanted = set(args.only.split(",")) if args.only else None
    results: dict[str, Any] = {}
    for step in steps(args.cpu):
        if wanted is not None and step.name not in wanted:
            continue
        left = deadline - time.monotonic()
        if left < step.min_s:
            results[step.name] = {"skipped": f"{left:.0f} s left, needs {step.min_s:.0f}"}
            continue
        print(f"{step.name}: up to {min(step.cap_s, left):.0f} s", flush=True)
        results[step.name] = run_step(step, min(step.cap_s, left), env, out / f"{step.name}.log")
        print(f"{step.name}: {json.dumps(results[step.name])[:2000]}", flush=True)
        if step.name == "check" and results[step.name]["rc"] != 0:
            print(f"the check failed: see {out / 'check.log'}", file=sys.stderr)
            break
    summary["steps"] = results
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
