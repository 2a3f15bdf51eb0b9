"""Round trips of `ti2i.client.video`: PNG frames exact, GIF and H.264 MP4 within small errors."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from ti2i.client.video import check_video_out, write_video

from ti2i.errors import InvalidInputError

FPS = 8.0


def moving_square(frames: int = 6, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth gradient with a red square moving right by 6 px per frame: uint8 [F, H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        video[i, ..., 0] = 40 + 120 * x / width
        video[i, ..., 1] = 60 + 120 * y / height
        video[i, ..., 2] = 200 - 4 * i
        video[i, 10:26, 4 + 6 * i:20 + 6 * i] = (230, 30, 30)
    return video


def read_mp4(path: Path) -> tuple[np.ndarray, dict]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames), meta


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_png_folder_round_trip_is_exact(tmp_path):
    video = moving_square()
    written = write_video(video, tmp_path / "nested" / "frames", FPS)
    assert [p.name for p in written] == [f"frame_{i:04d}.png" for i in range(6)]
    np.testing.assert_array_equal(np.stack([iio.imread(p) for p in written]), video)
    # an existing folder, and a trailing "/" on a path with a dot, are folders too
    assert len(write_video(video, tmp_path / "nested" / "frames", FPS)) == 6
    assert write_video(video, f"{tmp_path}/v1.0/", FPS)[0] == tmp_path / "v1.0" / "frame_0000.png"


def test_gif_round_trip(tmp_path):
    video = moving_square()
    out = write_video(video, tmp_path / "a" / "b.gif", FPS)
    assert out == tmp_path / "a" / "b.gif"
    back = iio.imread(out, index=None, mode="RGB")
    assert back.shape == video.shape
    assert mean_abs(back, video) < 3.0  # adaptive 256-colour palette per frame
    assert iio.immeta(out, index=0)["loop"] == 0  # forever
    delays = [iio.immeta(out, index=i)["duration"] for i in range(6)]  # 125 ms is 12.5 cs
    assert sum(delays) == 750 and set(delays) <= {120, 130}


def test_gif_delays_keep_the_total_duration(tmp_path):
    """30 fps is 33.3 ms per frame; GIF stores whole centiseconds, so delays alternate 30/40 ms."""
    out = write_video(moving_square(frames=6), tmp_path / "v.gif", 30.0)
    delays = [iio.immeta(out, index=i)["duration"] for i in range(6)]
    assert sum(delays) == 200 and set(delays) <= {30, 40}


def test_mp4_round_trip(tmp_path):
    video = moving_square()
    out = write_video(video, tmp_path / "a" / "b.mp4", FPS)
    back, meta = read_mp4(out)
    assert meta["codec"].startswith("h264") and "yuv420p" in meta["pix_fmt"]
    assert meta["fps"] == FPS
    assert back.shape == video.shape
    assert mean_abs(back, video) < 6.0


def test_mp4_writing_forks_nothing(tmp_path):
    """ffmpeg is spawned without fork(): a fork runs gRPC's fork handlers, which broke the pipe to ffmpeg in a
    process with a busy gRPC client (`make demo`, 1 write in 40). Python runs at-fork hooks on every fork."""
    import os

    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    write_video(moving_square(), tmp_path / "clip.mp4", FPS)
    assert (tmp_path / "clip.mp4").stat().st_size > 0
    assert forks == []


def test_mp4_odd_size_is_padded_not_resized(tmp_path):
    video = moving_square(frames=5, height=47, width=63)
    back, meta = read_mp4(write_video(video, tmp_path / "odd.mp4", 24))
    assert meta["fps"] == 24 and back.shape == (5, 48, 64, 3)
    assert mean_abs(back[:, :47, :63], video) < 6.0  # content kept in place, unscaled


def test_fractional_fps(tmp_path):
    _, meta = read_mp4(write_video(moving_square(), tmp_path / "ntsc.mp4", 30000 / 1001))
    assert meta["fps"] == pytest.approx(30000 / 1001, abs=1e-2)


@pytest.mark.parametrize("path", ["out.png", "out.avi", "notes.txt", "clip.mp4.bak", ""])
def test_bad_paths_are_refused_before_generation(tmp_path, path):
    with pytest.raises(InvalidInputError, match=r"\.mp4.*\.gif.*folder"):
        check_video_out(tmp_path / path if path else path)


def test_good_paths(tmp_path):
    assert check_video_out("x/clip.mp4") == Path("x/clip.mp4")
    assert check_video_out(tmp_path / "CLIP.GIF") == tmp_path / "CLIP.GIF"
    assert check_video_out("frames/") == Path("frames")
    assert check_video_out(tmp_path / "frames") == tmp_path / "frames"
    (tmp_path / "dir.png").mkdir()
    assert check_video_out(tmp_path / "dir.png") == tmp_path / "dir.png"


def test_existing_file_without_suffix_is_refused(tmp_path):
    (tmp_path / "frames").write_text("")
    with pytest.raises(InvalidInputError, match="not a folder"):
        check_video_out(tmp_path / "frames")


@pytest.mark.parametrize("frames, fps", [
    (moving_square().astype(np.float32), FPS),         # wrong dtype
    (moving_square()[0], FPS),                         # one image, not a video
    (moving_square()[..., :1], FPS),                   # one channel
    (np.concatenate([moving_square(), moving_square()[..., :1]], -1), FPS),  # RGBA-like
    (moving_square()[:0], FPS),                        # zero frames
    (moving_square(), 0),
    (moving_square(), -5.0),
    (moving_square(), float("nan")),
    ([[0]], FPS),                                      # not an array
])
@pytest.mark.parametrize("suffix", [".mp4", ".gif", ""])
def test_bad_arguments(tmp_path, frames, fps, suffix):
    with pytest.raises(InvalidInputError):
        write_video(frames, tmp_path / f"v{suffix}", fps)
    assert not (tmp_path / f"v{suffix}").exists()


def test_bad_path_writes_nothing(tmp_path):
    with pytest.raises(InvalidInputError, match="out.avi"):
        write_video(moving_square(), tmp_path / "sub" / "out.avi", FPS)
    assert not (tmp_path / "sub").exists()
