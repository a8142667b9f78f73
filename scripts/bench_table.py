"""One table of the CPU benchmarks' figures, from the logs that ``make bench`` writes.

Each ``bench/*.py`` prints, as its last line, one JSON object; ``make bench`` saves each
script's output as ``NAME.log`` in one folder. This script reads the last line of each,
makes one Markdown table (what, figure, target, met) headed by the commit, the date,
the machine and the machine's other load during the runs, writes it to ``--out``
(docs/bench-latest.md) and puts it into ``--readme`` between the markers
``<!-- bench-latest:begin -->`` and ``<!-- bench-latest:end -->``.

    python scripts/bench_table.py genseg-out/bench --out docs/bench-latest.md --readme README.md
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-latest:begin -->", "<!-- bench-latest:end -->"


@dataclass(frozen=True)
class Row:
    what: str
    command: str
    figure: str
    target: str
    met: bool | None  # None: no target

    def cells(self) -> list[str]:
        if self.met is None:
            met = "no verdict (a disturbed run)" if self.target else ""
        else:
            met = "**met**" if self.met else "**missed**"
        return [self.what, f"`{self.command}`", self.figure, self.target, met]


def last_json(path: Path) -> dict[str, Any] | None:
    """The last line of ``path`` that is a JSON object, or None."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _spread(s: dict[str, Any], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _plausible(wall: dict[str, Any], cpu: dict[str, Any], ok: bool | None) -> bool | None:
    """``ok``, or no verdict when genseg measured clearly faster than the same work done
    directly (median ratio under 0.95): the direct side was disturbed."""
    if ok is None or min(wall["median"], cpu["median"]) < 0.95:
        return None
    return bool(ok)


def event_plane(r: dict[str, Any]) -> list[Row]:
    config = r.get("stage_configs", {}).get("stage", {})
    window = ""
    if r.get("warmup_records"):
        window = f", after the first {r['warmup_records']:,} of {r['records']:,} records"
    return [
        Row(
            "stage runtime at `genseg worker`'s defaults (max_batch "
            f"{config.get('max_batch')}, max_in_flight {config.get('max_in_flight')}) vs the "
            f"best simple aiokafka loop, events/s{window}, median of {r['repeats']} rounds "
            "(spread)",
            "bench/event_plane.py",
            f"{_spread(r['ratio_spread'])}; {r['events_per_s']:,.0f} vs "
            f"{r['bare_events_per_s']:,.0f} events/s",
            ">= 0.5 and >= 1,000 events/s",
            bool(r["ok"]),
        )
    ]


def _seconds_beside(r: dict[str, Any], direct: str, ours: str, unit: str) -> str:
    """The absolute seconds beside a ratio: how fast the machine ran (its speed moves
    from day to day, and fixed-rate costs such as empty fetches weigh more when slow)."""
    if direct not in r or ours not in r:
        return ""
    return f"; direct {r[direct]:.3f} s vs genseg {r[ours]:.3f} s {unit}"


def gen(r: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"gen worker vs `Generator.generate`, {r['size']}², {r['steps']} steps, "
            f"{r['requests']} requests: wall / CPU, median of {r['repeats']} rounds (spread)",
            "bench/gen.py",
            f"{_spread(r['ratio_spread'])} / {_spread(r['cpu_ratio_spread'])}"
            + _seconds_beside(r, "direct_s_per_image", "worker_s_per_image", "an image"),
            "<= 1.10 both",
            _plausible(r["ratio_spread"], r["cpu_ratio_spread"], r["ok"]),
        )
    ]


def pipeline(r: dict[str, Any]) -> list[Row]:
    rows = []
    if a := r.get("overhead"):
        rows.append(
            Row(
                f"(a) pipeline vs the two-thread direct code, {a['size']}², {a['steps']} steps, "
                f"{a['requests']} requests: wall / CPU, median of {a['repeats']} rounds",
                "bench/pipeline.py",
                f"{_spread(a['ratio_spread'])} / {_spread(a['cpu_ratio_spread'])}"
                + _seconds_beside(a, "direct_s_per_request", "pipeline_s_per_request", "a request"),
                "<= 1.15 / <= 1.25",
                _plausible(a["ratio_spread"], a["cpu_ratio_spread"], a["ok"]),
            )
        )
    if b := r.get("scale"):
        rows.append(
            Row(
                f"(b) 2 vs 1 generator processes, {b['requests']} requests, median of "
                f"{b['repeats']} rounds each",
                "bench/pipeline.py",
                f"{b['throughput_ratio']:.2f} ({b['two_processes_req_per_s']:.2f} vs "
                f"{b['one_process_req_per_s']:.2f} req/s)",
                ">= 1.7",
                bool(b["ok"]),
            )
        )
    if c := r.get("flow"):
        rows.append(
            Row(
                f"(c) streaming pipeline vs a step-by-step loop, {c['size']}², throughput, "
                f"median of {c['repeats']} rounds (ceiling of the overlap)",
                "bench/pipeline.py",
                f"{_spread(c['ratio_spread'])} (ceiling {c['ceiling']['median']:.2f})",
                ">= 1.4",
                bool(c["ok"]),
            )
        )
    return rows


def _fetch_wait(worker: dict[str, Any]) -> str:
    """The row's note of the fetch wait the worker ran with, when the JSON names it."""
    wait = worker.get("runtime_fetch_max_wait_ms")
    return f", its fetch wait {wait} ms" if wait is not None else ""


def seg(r: dict[str, Any]) -> list[Row]:
    rows = []
    if w := r.get("worker"):
        rows.append(
            Row(
                f"latency the seg worker adds ({w['image_px']}, {w['targets_per_image']} "
                f"targets, {w['images']} images{_fetch_wait(w)}), p50 (p95)",
                "bench/seg.py",
                f"{w['added_ms']['p50']} ms ({w['added_ms']['p95']} ms)",
                f"p50 <= {w.get('target_added_p50_ms', 25)} ms",
                w["added_ms"]["p50"] <= w.get("target_added_p50_ms", 25),
            )
        )
    if c := r.get("cache"):
        rows.append(
            Row(
                f"SAM embedding cache: first target vs second ({c['model']})",
                "bench/seg.py",
                f"{c['speedup']}×",
                f">= {c.get('target_speedup', 50)}×",
                c["speedup"] >= c.get("target_speedup", 50),
            )
        )
    return rows


def quality(r: dict[str, Any]) -> list[Row]:
    """The toy world's figures (issue 16's targets); older results without the
    all-targets figure keep their one row."""
    attention, oracle = r.get("attention_mean_iou"), r.get("oracle_mean_iou")
    if attention is None:
        return []
    prompts = r.get("prompts")
    if "attention_all_miou" not in r:
        return [
            Row(
                f"toy profile: heat map → SAM mask mIoU, {prompts} prompts (oracle box {oracle})",
                "bench/quality.py",
                f"{attention:.3f}",
                ">= 0.75",
                attention >= 0.75,
            )
        ]
    accuracy, drawn = r["generation_accuracy"], r["attention_drawn_n"]
    everyone = r["attention_all_miou"]
    return [
        Row(
            f"toy generator draws the asked object, {prompts} prompts",
            "bench/quality.py",
            f"{accuracy:.3f}",
            ">= 0.80",
            accuracy >= 0.80,
        ),
        Row(
            f"toy attention mIoU over all {r['attention_all_n']} targets / the {drawn} drawn "
            f"(± 95 % CI; oracle box {r['oracle_drawn_miou']})",
            "bench/quality.py",
            f"{everyone:.3f} ± {r['attention_all_ci95']:.3f} / "
            f"{attention:.3f} ± {r['attention_drawn_ci95']:.3f}",
            ">= 0.70 / >= 0.85",
            everyone >= 0.70 and attention >= 0.85,
        ),
        Row(
            "duplicate objects (mask IoU > 0.5) in one result, all modes",
            "bench/quality.py",
            str(r["duplicate_pairs"]),
            "0",
            r["duplicate_pairs"] == 0,
        ),
    ]


def scenes(r: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"scene view (depth + .glb) vs a plain seg view, {size['size']}², tiny, "
            f"{size['images']} views each: wall / CPU",
            "bench/scenes.py",
            f"{size['wall_ratio']}× / {size['cpu_ratio']}× (+{size['added_wall_ms_p50']} ms)",
            "",
            None,
        )
        for size in r.get("results", [])
    ]


#: Log file stem -> the rows it gives, in the table's order.
BENCHES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "event_plane": event_plane,
    "gen": gen,
    "pipeline": pipeline,
    "seg": seg,
    "scenes": scenes,
    "quality": quality,
}


def _other_load(results: dict[str, dict[str, Any]]) -> str:
    """The other load the benches recorded: medians of other processes' busy cores."""
    parts = []
    for name, r in results.items():
        found = [
            s["median"]
            for s in _find(r, "other_load_cores")
            if isinstance(s, dict) and "median" in s
        ]
        if found:
            parts.append(f"{name} {max(found):.2f}")
    return ", ".join(parts) or "not recorded"


def _find(value: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in ``value`` (nested dicts and lists)."""
    out: list[Any] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == key:
                out.append(v)
            out += _find(v, key)
    elif isinstance(value, list):
        for v in value:
            out += _find(v, key)
    return out


def _commits(results: dict[str, dict[str, Any]]) -> str:
    """The commit each bench ran at (``+dirty``: the working tree had changes)."""
    found = {name: next(iter(_find(r, "commit")), None) for name, r in results.items()}
    if len({c for c in found.values() if c}) == 1:
        return next(c for c in found.values() if c)
    if any(found.values()):
        return ", ".join(f"{name} {commit}" for name, commit in found.items() if commit)
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def _machine(results: dict[str, dict[str, Any]]) -> str:
    for r in results.values():
        m = r.get("machine")
        if isinstance(m, dict) and m.get("cpu"):
            torch = (
                f", torch {m['torch']} ({m.get('torch_threads')} threads)" if m.get("torch") else ""
            )
            generation = (
                f" (family {m['cpu_family']} model {m.get('model')}, "
                f"{' '.join(m.get('vector') or ['no AVX2'])})"
                if m.get("cpu_family")
                else ""
            )
            return (
                f"{m['cpu']}{generation}, {m.get('cores')} cores, Python {m.get('python')}{torch}"
            )
    return "unknown"


PROBES = {
    "python_loop_ms": ("10^6-step Python loop", "ms"),
    "thread_handoff_us": ("thread round trip", "us"),
    "syscall_us": ("syscall", "us"),
    "matmul_fp32_ms": ("256^2 matmul fp32", "ms"),
    "matmul_bf16_ms": ("bf16", "ms"),
}


def speed(logs: Path) -> str | None:
    """``speed-before.json`` and ``speed-after.json`` (``python -m bench.machine --probe``,
    written by ``make bench``) as one phrase, each probe's before / after; None if absent."""
    found = {
        when: probe
        for when in ("before", "after")
        if (path := logs / f"speed-{when}.json").exists() and (probe := last_json(path))
    }
    if not found:
        return None
    probes = list(found.values())
    parts = [
        f"{label} {' / '.join(str(p[key]) for p in probes if key in p)} {unit}"
        for key, (label, unit) in PROBES.items()
        if any(key in p for p in probes)
    ]
    return f"speed probe ({' / '.join(found)}): " + ", ".join(parts)


def table(
    results: dict[str, dict[str, Any]],
    *,
    date: str,
    load: str | None = None,
    speed: str | None = None,
) -> str:
    """The Markdown block: a header of facts, then one row per figure."""
    rows = [
        row
        for name, rows_of in BENCHES.items()
        if name in results
        for row in rows_of(results[name])
    ]
    lines = [
        f"Measured by `make bench` at commit {_commits(results)}, on {date} (UTC); machine: "
        f"{_machine(results)}; other load (cores busy with other processes, median of the "
        f"rounds, the worst bench's): {_other_load(results)}"
        + (f"; load average {load}" if load else "")
        + (f"; {speed}" if speed else "")
        + ".",
        "",
        "| what | command | figure | target | |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def into_readme(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no {BEGIN} ... {END} markers")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}{END}", readme, count=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", type=Path, help="folder of NAME.log files")
    parser.add_argument("--out", type=Path, help="write the table here (docs/bench-latest.md)")
    parser.add_argument("--readme", type=Path, help="put the table into this README")
    parser.add_argument("--load", help="load averages to state (e.g. before and after)")
    args = parser.parse_args()
    results = {
        name: found
        for name in BENCHES
        if (path := args.logs / f"{name}.log").exists() and (found := last_json(path))
    }
    if not results:
        raise SystemExit(f"no bench results in {args.logs}")
    # When the last benchmark finished (its log's mtime), not now: a table rewritten
    # later from the same logs keeps the time they were measured.
    finished = max((args.logs / f"{name}.log").stat().st_mtime for name in results)
    date = datetime.fromtimestamp(finished, UTC).strftime("%Y-%m-%d %H:%M")
    block = table(results, date=date, load=args.load, speed=speed(args.logs))
    print(block)
    if args.out:
        args.out.write_text(
            "# Latest benchmark figures\n\n"
            "Written by `make bench` (scripts/bench_table.py) from the last line of each CPU "
            "benchmark; what each figure means, and the history, are in "
            "[benchmarks.md](benchmarks.md).\n\n" + block
        )
    if args.readme:
        args.readme.write_text(into_readme(args.readme.read_text(), block))


if __name__ == "__main__":
    main()
