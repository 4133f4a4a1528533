"""Short video files the tests write themselves: frame i is a flat grey of level ``levels[i]``, so a test can
tell from a decoded frame's mean which frame it is."""

from __future__ import annotations

from pathlib import Path


def write_video(path: Path, levels: list[int], fps: int = 10, size: int = 32, codec: str = "mpeg4") -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "1"}  # near-lossless: the grey levels survive the round trip
        for level in levels:
            img = np.full((size, size, 3), level, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
