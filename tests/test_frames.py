"""Frames at uniform segment midpoints from real video files (PyAV), images and folders of images."""

from __future__ import annotations

import pytest

from salmon.errors import UserError
from salmon.frames import load_frames, segment_midpoints

av = pytest.importorskip("av")

from tests.media_fixtures import write_video  # noqa: E402  (needs av)

LEVELS = [10 * i for i in range(20)]  # 20 frames at 10 fps: 2 s, frame i has grey level 10 i


def level(img) -> float:
    import numpy as np

    return float(np.asarray(img, dtype=float).mean())


def test_segment_midpoints():
    assert segment_midpoints(2.0, 4) == [0.25, 0.75, 1.25, 1.75]
    with pytest.raises(UserError, match="at least 1"):
        segment_midpoints(2.0, 0)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_video_frames_are_the_segment_midpoints(tmp_path, codec):
    path = write_video(tmp_path / f"clip-{codec}.mp4", LEVELS, fps=10, codec=codec)
    frames = load_frames(path, 4)
    # midpoints 0.25, 0.75, 1.25, 1.75 s -> the frames shown then: 2, 7, 12, 17
    assert [img.size for img in frames] == [(32, 32)] * 4
    assert [level(img) for img in frames] == pytest.approx([20, 70, 120, 170], abs=4)
    one = load_frames(path, 1)
    assert level(one[0]) == pytest.approx(100, abs=4)  # the middle of the clip: frame 10


def test_more_frames_than_the_video_has_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", [0, 120, 240], fps=10)
    assert [level(f) for f in load_frames(path, 6)] == pytest.approx([0, 0, 120, 120, 240, 240], abs=4)


def test_images_and_folders_are_frames(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (20 * i,) * 3).save(folder / f"f{i:02d}.png")
    assert [level(f) for f in load_frames(folder, 2)] == [40, 120]  # indices 2 and 6 of 8
    assert [level(f) for f in load_frames(folder / "f03.png", 5)] == [60]


def test_bad_media_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_frames(tmp_path / "none.mp4", 2)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(UserError, match="cannot open as a video"):
        load_frames(bad, 2)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="unknown media type"):
        load_frames(tmp_path / "notes.txt", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="needs image files"):
        load_frames(tmp_path / "empty", 2)
