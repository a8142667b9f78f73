"""scripts/bench_table.py: the table of `make bench` from each bench's last-line JSON, in
docs/bench-latest.md and between README.md's markers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_table  # noqa: E402

MACHINE = {
    "cpu": "AMD EPYC",
    "cores": 2,
    "python": "3.11.7",
    "torch": "2.14.1",
    "commit": "abc1234",
}


def spread(median: float, low: float, high: float) -> dict[str, float]:
    return {"median": median, "min": low, "max": high}


RESULTS = {
    "event_plane": {
        "bench": "event_plane", "events_per_s": 24000.0, "bare_events_per_s": 50000.0,
        "ratio_spread": spread(0.48, 0.3, 0.61), "ok": False, "repeats": 5,
        "records": 40000, "warmup_records": 10000,
        "stage_configs": {"stage": {"max_batch": 1, "max_in_flight": 8}},
        "variants": {"bare": {"other_load_cores": spread(0.02, 0.0, 0.1)}},
        "machine": {**MACHINE, "torch": None},
    },
    "gen": {
        "bench": "gen", "size": 64, "steps": 20, "requests": 32, "repeats": 5,
        "ratio_spread": spread(1.05, 1.01, 1.12), "cpu_ratio_spread": spread(1.04, 1.0, 1.09),
        "ok": True, "other_load_cores": spread(0.01, 0.0, 0.03), "machine": MACHINE,
        "direct_s_per_image": 0.12, "worker_s_per_image": 0.126,
    },
    "pipeline": {
        "bench": "pipeline",
        "overhead": {
            "size": 64, "steps": 20, "requests": 32, "repeats": 5, "ok": False,
            "ratio_spread": spread(1.1, 1.0, 1.2), "cpu_ratio_spread": spread(1.3, 1.2, 1.4),
        },
        "scale": {
            "requests": 24, "repeats": 4, "throughput_ratio": 1.8, "ok": True,
            "two_processes_req_per_s": 15.0, "one_process_req_per_s": 8.3,
        },
        "flow": {
            "size": 256, "repeats": 3, "ratio_spread": spread(1.04, 1.01, 1.06),
            "ceiling": spread(1.05, 1.04, 1.06), "ok": False,
        },
        "machine": MACHINE,
    },
    "quality": {"bench": "quality", "prompts": 300, "attention_mean_iou": 0.78,
                "oracle_mean_iou": 0.87},
}  # fmt: skip


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    folder = tmp_path / "logs"
    folder.mkdir()
    for name, result in RESULTS.items():
        (folder / f"{name}.log").write_text(f"machine: ...\nprogress\n{json.dumps(result)}\n")
    (folder / "seg.log").write_text("a run that died before its JSON\n")
    return folder


def test_one_row_per_figure_with_the_verdict(logs: Path) -> None:
    results = {n: bench_table.last_json(logs / f"{n}.log") for n in RESULTS}
    text = bench_table.table(results, date="2026-11-30 12:00", load="0.10 before")  # type: ignore[arg-type]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 1 + 1 + 3 + 1, text  # header, event plane, gen, (a)(b)(c), quality
    assert "0.480 (0.300-0.610)" in text and "**missed**" in rows[1]
    assert "after the first 10,000 of 40,000 records" in rows[1]
    assert "1.050 (1.010-1.120) / 1.040 (1.000-1.090)" in rows[2] and "**met**" in rows[2]
    assert "direct 0.120 s vs genseg 0.126 s an image" in rows[2]
    assert "direct 0." not in rows[3], "(a) without its absolute seconds: none shown"
    assert "at commit abc1234, on 2026-11-30 12:00" in text
    assert "event_plane 0.02" in text and "gen 0.01" in text and "load average 0.10" in text


def test_the_readme_gets_the_table_between_its_markers(logs: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_table.BEGIN}\nold table\n{bench_table.END}\nafter\n")
    out = tmp_path / "bench-latest.md"
    command = [sys.executable, "scripts/bench_table.py", str(logs), "--out", str(out),
               "--readme", str(readme)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| (a) pipeline vs the two-thread direct code" in text
    assert "seg.py" not in text, "a log without JSON gives no row"
    assert out.read_text().startswith("# Latest benchmark figures")
    with pytest.raises(SystemExit, match="markers"):
        bench_table.into_readme("no markers here", "table")


def test_genseg_faster_than_the_work_it_wraps_gets_no_verdict() -> None:
    disturbed = {**RESULTS["gen"], "ratio_spread": spread(0.15, 0.11, 0.62), "ok": True}
    [row] = bench_table.gen(disturbed)
    assert row.met is None and row.cells()[-1] == "no verdict (a disturbed run)"


def test_the_speed_probe_before_and_after_heads_the_table(logs: Path) -> None:
    assert bench_table.speed(logs) is None, "no probe files: no phrase"
    (logs / "speed-after.json").write_text('{"syscall_us": 0.3}\n')
    assert bench_table.speed(logs) == "speed probe (after): syscall 0.3 us"
    (logs / "speed-after.json").unlink()
    before = {"python_loop_ms": 45.6, "syscall_us": 0.32, "thread_handoff_us": 16.3}
    (logs / "speed-before.json").write_text(json.dumps(before) + "\n")
    assert bench_table.speed(logs) == (
        "speed probe (before): 10^6-step Python loop 45.6 ms, thread round trip 16.3 us, "
        "syscall 0.32 us"
    )
    after = {**before, "python_loop_ms": 90.1, "matmul_fp32_ms": 0.5, "matmul_bf16_ms": 25.2}
    (logs / "speed-after.json").write_text(json.dumps(after) + "\n")
    phrase = bench_table.speed(logs)
    assert phrase is not None and "(before / after)" in phrase and "45.6 / 90.1 ms" in phrase
    assert phrase.endswith("256^2 matmul fp32 0.5 ms, bf16 25.2 ms"), "only after's"
    text = bench_table.table({}, date="2026-12-01 14:00", speed=phrase)
    assert text.splitlines()[0].endswith(f"; {phrase}.")


def test_the_machine_line_names_the_cpu_generation() -> None:
    zen3 = {"cpu": "AMD EPYC", "cores": 2, "cpu_family": "25", "model": "1", "vector": ["avx2"],
            "python": "3.11.7"}  # fmt: skip
    line = bench_table._machine({"gen": {"machine": zen3}})
    assert line == "AMD EPYC (family 25 model 1, avx2), 2 cores, Python 3.11.7"
