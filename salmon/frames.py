"""Frames for vision-language models: from a video file (uniform segment midpoints), an image, or a folder of images.

A video of duration D split into ``count`` equal segments gives the frames shown at the segments'
midpoints, (i + 0.5) · D / count: every part of the clip is represented and no frame is the fade-in or
the last one. "Shown at t" is the last frame whose timestamp is at most t. Decoding uses PyAV (``av``,
the optional ``video`` extra: ``pip install 'salmon[video]'``); it is imported only when a video is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from salmon.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")


def segment_midpoints(duration: float, count: int) -> list[float]:
    """The midpoints of ``count`` equal segments of [0, duration)."""
    if count < 1:
        raise UserError(f"frame count {count}: give at least 1")
    return [(i + 0.5) * duration / count for i in range(count)]


def pick_indices(n: int, count: int) -> list[int]:
    """Segment-midpoint indices into ``n`` evenly spaced items (a folder of images, frames without timestamps)."""
    return [min(n - 1, int(t)) for t in segment_midpoints(n, count)]


def video_frames(path: str | Path, count: int) -> list[Any]:
    """``count`` RGB PIL images at the segment midpoints of the video at ``path``."""
    try:
        import av
    except ImportError:
        raise UserError("reading video needs PyAV: pip install 'salmon[video]' (or pip install av)") from None
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"{path}: cannot open as a video ({e}); give an mp4/mkv/webm/... file") from None
    with container:
        if not container.streams.video:
            raise UserError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        frames = [(f.time, f) for f in container.decode(stream)]
    if not frames:
        raise UserError(f"{path}: the video stream has no frames")
    if any(t is None for t, _ in frames):  # no timestamps: frames are evenly spaced by construction
        return [frames[i][1].to_image() for i in pick_indices(len(frames), count)]
    frames.sort(key=lambda tf: tf[0])
    t0 = frames[0][0]
    # The clip's duration: the last frame's time plus one frame's length (the mean spacing).
    step = (frames[-1][0] - t0) / (len(frames) - 1) if len(frames) > 1 else 1.0
    duration = frames[-1][0] - t0 + step
    out = []
    for target in segment_midpoints(duration, count):
        shown = max((i for i, (t, _) in enumerate(frames) if t - t0 <= target + 1e-9), default=0)
        out.append(frames[shown][1].to_image())
    return out


def load_frames(path: str | Path, count: int) -> list[Any]:
    """Frames from a video file (``count`` of them), one image (itself), or a folder of images (``count``
    of them, in name order, at segment midpoints)."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"{path}: a folder of frames needs image files ({', '.join(IMAGE_SUFFIXES)})")
        return [Image.open(images[i]).convert("RGB") for i in pick_indices(len(images), count)]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [Image.open(path).convert("RGB")]
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return video_frames(path, count)
    raise UserError(f"{path}: unknown media type {path.suffix!r}; give a video ({', '.join(VIDEO_SUFFIXES)}), "
                    f"an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of images")
