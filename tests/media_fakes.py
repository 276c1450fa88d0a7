"""Tiny media files for the extraction tests, written with PyAV: a tone and moving frames."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

RATE = 16_000


def write_clip(path: Path, seconds: float = 1.0, fps: int = 10, audio: bool = True, video: bool = True,
               tone_hz: float = 220.0, amplitude: float = 0.3, size: tuple[int, int] = (64, 48)) -> Path:
    """An .mp4 (or .mkv) with a sine tone (16 kHz mono AAC; amplitude 0 = silence) and/or
    `seconds * fps` frames of a moving grey gradient (MPEG-4 part 2). No face in any frame."""
    import av

    with av.open(str(path), "w") as container:
        vstream = astream = None
        if video:
            vstream = container.add_stream("mpeg4", rate=fps)
            vstream.width, vstream.height = size
            vstream.pix_fmt = "yuv420p"
        if audio:
            astream = container.add_stream("aac", rate=RATE)
            astream.layout = "mono"
        if vstream is not None:
            for i in range(int(seconds * fps)):
                image = np.zeros((size[1], size[0], 3), np.uint8)
                image[:] = (np.arange(size[0]) * 4 + i * 8)[None, :, None] % 256
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                container.mux(vstream.encode(frame))
            container.mux(vstream.encode(None))
        if astream is not None:
            t = np.arange(int(seconds * RATE)) / RATE
            samples = (amplitude * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            block = 1024
            for start in range(0, len(samples), block):
                chunk = samples[start : start + block][None, :]
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate = RATE
                frame.pts = start
                frame.time_base = Fraction(1, RATE)
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))
    return path
