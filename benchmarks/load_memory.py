"""Peak memory of loading a MOSEI-sized MMSA pickle through msakit's loader.

The file has CMU-MOSEI's shape in thuiar/MMSA's `aligned_50.pkl`: 16,326 / 1,871 / 4,659 samples
(train / valid / test), 50 steps, text 768-d, audio 74-d, vision 35-d float32 (4.01 GB of
features), ids, raw texts and regression labels; each sample's real length is drawn in [10, 50]
and the rest zero-padded at the end. Two variants: "clean" and "-inf" (0.5% of the real audio
values set to -inf, as COVAREP writes them; msakit replaces them by 0).

The file is written by streaming (protocol 4, each array's payload outside any frame, as the
pickle module writes large arrays) so that writing it does not need the features in memory.
Loading runs in a fresh child process: `load_dataset(DataConfig(name="mmsa", data_path=...))`
(restricted unpickler, layout checks, length inference, validation, non-finite cleaning);
the reported number is the child's peak RSS (ru_maxrss) minus its RSS after the imports,
divided by the feature size. The target is <= 1.3.

    nice -n 10 python benchmarks/load_memory.py [--scale 1.0] [--dir /tmp] [--out DIR | --publish]

--scale shrinks the sample counts (a quick check; the committed result uses 1.0). Needs about
4 GB of disk in --dir and ~5 GB of free memory. Takes ~3 minutes on an idle machine (writing
the file dominates; ~20 minutes on a loaded one). Writes load_memory.json into --out (default
runs/benchmarks/load_memory/); --publish writes benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_store import add_output_args, results_dir, update_json

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 16_326, "valid": 1_871, "test": 4_659}
STEPS = 50
DIMS = {"text": 768, "audio": 74, "vision": 35}
CHUNK = 512  # samples generated at a time
_MARK = b"MSAKIT-PAYLOAD-%06d-"


class _Placeholder:
    """Pickles like a numpy array of `shape` float32 whose payload is a unique 128 KB marker;
    the marker is replaced by the streamed data."""

    def __init__(self, index: int, shape: tuple[int, ...]):
        self.index, self.shape = index, shape

    def marker(self) -> bytes:
        head = _MARK % self.index
        return head + b"." * (2**17 - len(head))

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
        return (reconstruct, (np.ndarray, (0,), b"b"),
                (1, self.shape, np.dtype("float32"), False, self.marker()))


def _lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(10, STEPS + 1, size=n)


def write_file(path: Path, scale: float, with_inf: bool, seed: int = 0) -> int:
    """Stream a MOSEI-shaped MMSA pickle to `path`; return the feature bytes."""
    rng = np.random.default_rng(seed)
    sizes = {split: max(2, int(n * scale)) for split, n in SIZES.items()}
    lengths = {split: _lengths(rng, n) for split, n in sizes.items()}
    placeholders: list[tuple[_Placeholder, str, str]] = []
    tree: dict = {}
    for split, n in sizes.items():
        tree[split] = {
            "id": np.array([f"video{i // 8}$_${i % 8}" for i in range(n)], dtype=object),
            "raw_text": np.array([f"utterance {i} of {split}" for i in range(n)], dtype=object),
            "regression_labels": rng.uniform(-3, 3, size=n).astype(np.float32),
        }
        for m, dim in DIMS.items():
            holder = _Placeholder(len(placeholders), (n, STEPS, dim))
            placeholders.append((holder, split, m))
            tree[split][m] = holder
    head = pickle.dumps(tree, protocol=4)
    feature_bytes = 0
    with path.open("wb") as f:
        position = 0
        for holder, split, m in placeholders:
            marker = holder.marker()
            opcode = pickle.BINBYTES + struct.pack("<I", len(marker)) + marker
            at = head.index(opcode, position)
            f.write(head[position:at])
            n, dim = sizes[split], DIMS[m]
            f.write(pickle.BINBYTES8 + struct.pack("<Q", n * STEPS * dim * 4))
            for start in range(0, n, CHUNK):
                block = rng.standard_normal((min(CHUNK, n - start), STEPS, dim), dtype=np.float32)
                real = np.arange(STEPS)[None, :] < lengths[split][start : start + len(block), None]
                block[~real] = 0.0
                if with_inf and m == "audio":
                    block[real & (rng.random(real.shape) < 0.005)] = -np.inf
                f.write(block.tobytes())
            feature_bytes += n * STEPS * dim * 4
            position = at + len(opcode)
        f.write(head[position:])
    return feature_bytes


_CHILD = r"""
import json, resource, sys, time
from msakit.config import DataConfig
from msakit.data import load_dataset

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
started = time.perf_counter()
data = load_dataset(DataConfig(name="mmsa", data_path=sys.argv[1]))
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(a.nbytes for s in data.splits.values() for a in s.features.values())
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "after_rss": rss(), "seconds": seconds,
                  "features_held": held}))
"""


def measure(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp")
    add_output_args(parser, "load_memory")
    args = parser.parse_args()
    if args.publish and args.scale != 1.0:
        raise SystemExit("--publish refused: only the full-size run (--scale 1) is published")
    rows = {}
    for variant, with_inf in (("clean", False), ("-inf", True)):
        path = Path(args.dir) / f"msakit-mosei-shaped-{variant.strip('-')}.pkl"
        started = time.perf_counter()
        features = write_file(path, args.scale, with_inf)
        written = time.perf_counter() - started
        try:
            result = measure(path)
        finally:
            size = path.stat().st_size
            path.unlink()
        ratio = (result["peak_rss"] - result["baseline_rss"]) / features
        rows[variant] = {**result, "feature_bytes": features, "file_bytes": size,
                         "peak_over_features": round(ratio, 3), "write_seconds": round(written, 1)}
        print(f"{variant:6s} features {features / 2**30:.2f} GiB, file {size / 2**30:.2f} GiB: "
              f"peak RSS - baseline = {(result['peak_rss'] - result['baseline_rss']) / 2**30:.2f} GiB "
              f"= {ratio:.3f}x the features (load {result['seconds']:.1f} s)", flush=True)
    entry = {"scale": args.scale, "sizes": SIZES, "steps": STEPS, "dims": DIMS, "variants": rows,
             "target": "peak RSS - baseline <= 1.3x the feature size", "python": sys.version.split()[0],
             "numpy": np.__version__}
    target = results_dir(args) / "load_memory.json"
    update_json(target, lambda current: {**current, f"scale_{args.scale:g}": entry})
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
