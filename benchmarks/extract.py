"""Cost of `msakit extract` per stage and of `msakit predict` from a cold start.

    python benchmarks/extract.py --data-root ../shared/data [--copies 4] [--workers 2]
        [--checkpoint runs/mosei_text_head/seed_1/best.pt]

Media: --copies copies of the real MOSI clip ../shared/data/media/Oz06ZWiO20M_6.mp4 (7.47 s, 30 fps,
a face in every frame). Full default stack: PyAV decode, librosa audio (50 Hz), MediaPipe face
landmarks + blendshapes at 10 fps, fer expressions, faster-whisper tiny.en, MiniLM token states.
Reported: CPU seconds per second of video for each stage (process CPU time measured inside the
extraction of each clip, so model loading is excluded and listed apart), with 1 worker (one
thread) and with N worker processes (wall-clock seconds per video-second; the per-stage CPU is the
same work); and `msakit predict` wall time for one clip in a fresh process (cold: imports, model
loading, extraction, 8 forward passes), plus the bare `import msakit.cli` time.
Writes benchmarks/results/extract.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = "media/Oz06ZWiO20M_6.mp4"


def run_extract(folder: Path, workers: int) -> dict:
    from msakit.media import MediaConfig, extract_dataset

    out = folder.parent / f"out_{workers}" / "clips.pkl"
    wall, cpu = time.perf_counter(), time.process_time()
    summary = extract_dataset(folder, out, MediaConfig(), workers=workers, progress=False)
    summary["wall_s"], summary["main_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    return summary


def timed(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{command} failed: {done.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "mosei_text_head" / "seed_1" / "best.pt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    source = Path(args.data_root) / CLIP
    if not source.is_file():
        sys.exit(f"{source} not found: pass --data-root to the shared data folder")
    work = Path(tempfile.mkdtemp(prefix="msakit_extract_"))
    folder = work / "clips"
    folder.mkdir()
    for i in range(args.copies):
        shutil.copy(source, folder / f"clip{i}.mp4")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "clips": args.copies, "runs": {}}
    for workers in sorted({1, args.workers}):
        summary = run_extract(folder, workers)
        video = summary["video_s"]
        report["runs"][str(workers)] = {
            "workers": workers, "video_s": video, "wall_s": summary["wall_s"],
            "wall_per_video_s": summary["wall_s"] / video,
            "cpu_per_video_s": {k: v / video for k, v in summary["cpu_s"].items()},
            "cpu_total_per_video_s": sum(summary["cpu_s"].values()) / video,
        }
        print(json.dumps(report["runs"][str(workers)], indent=1), flush=True)
    python = sys.executable
    report["import_cli_s"] = timed([python, "-c", "import msakit.cli"])
    if Path(args.checkpoint).is_file():
        report["predict_cold_s"] = timed([python, "-m", "msakit.cli", "predict", "--checkpoint",
                                          args.checkpoint, str(source)])
        report["predict_checkpoint"] = args.checkpoint
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    (out / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# msakit extract / predict cost", "",
             f"`python benchmarks/extract.py` on {report['machine']}, {args.copies} copies of the real "
             "7.47-s MOSI clip, full default stack. The machine was shared with other jobs (load ~10 on "
             "2 cores), so wall times are inflated; CPU times much less so.", "",
             "| workers | wall s per video-s | CPU s per video-s (sum of stages) | " + " | ".join(
                 report["runs"]["1"]["cpu_per_video_s"]) + " |",
             "|---:|---:|---:|" + "---:|" * len(report["runs"]["1"]["cpu_per_video_s"])]
    for run in report["runs"].values():
        lines.append(f"| {run['workers']} | {run['wall_per_video_s']:.3f} | {run['cpu_total_per_video_s']:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in run["cpu_per_video_s"].values()) + " |")
    lines += ["", f"- `import msakit.cli` in a fresh process: {report['import_cli_s']:.1f} s wall"]
    if "predict_cold_s" in report:
        lines.append(f"- `msakit predict` on the clip from a cold start ({Path(args.checkpoint).name} of the "
                     f"mosei-text head: ASR + MiniLM only): {report['predict_cold_s']:.1f} s wall")
    (out / "extract.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
