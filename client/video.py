"""Writing generated videos: H.264 MP4, animated GIF, or a folder of PNG frames.

- ``.mp4``: H.264 (libx264, yuv420p, CRF 18, ``+faststart``) through imageio-ffmpeg, whose wheel
  carries the ffmpeg binary. yuv420p needs even sizes; an odd height/width is padded by repeating
  the last row/column (one extra pixel, bottom/right), never rescaled, so the content stays
  pixel-aligned in the top-left H×W of the video. (H.264 crops 4:2:0 frames in 2-pixel units,
  so the odd size itself cannot be signalled.)
- ``.gif``: animated GIF through Pillow, looping forever; each frame gets its own adaptive
  256-colour palette. GIF delays are whole centiseconds, so they are rounded such that the
  running total stays within 5 ms of i/fps (for fps ≤ 100; many viewers slow delays under
  20 ms, i.e. fps > 50, down to 100 ms). Pillow merges a frame identical to the one before
  into it (adding the delays), so the frame count can then be lower.
- anything else (an existing folder, or a path ending in "/" or without a suffix): lossless
  ``frame_0000.png``, ``frame_0001.png``, … in that folder.

Use :func:`check_video_out` on the user's path before a generation starts, so a bad path fails
at once rather than after minutes of sampling.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ti2i.errors import InvalidInputError

VIDEO_SUFFIXES = (".mp4", ".gif")
MP4_CRF = 18  # x264 constant rate factor: 0 lossless … 51 worst; 18 is "visually lossless"
_FORMS = "a .mp4 file, a .gif file, or a folder for PNG frames (an existing folder, or a path ending in '/' or without a suffix)"


def _form(path: str | Path) -> tuple[Path, str]:
    """The output path and its form: ".mp4", ".gif" or "dir"."""
    text = os.fspath(path)
    out = Path(text)
    if not text:
        raise InvalidInputError(f"empty video output path; give {_FORMS}")
    if out.is_dir() or text.endswith(("/", os.sep)):
        return out, "dir"
    if out.suffix.lower() in VIDEO_SUFFIXES:
        return out, out.suffix.lower()
    if not out.suffix:
        if out.exists():
            raise InvalidInputError(f"video output {text!r} exists and is not a folder; give {_FORMS}")
        return out, "dir"
    raise InvalidInputError(f"video output {text!r} has an unsupported suffix {out.suffix!r}; give {_FORMS}")


def check_video_out(path: str | Path) -> Path:
    """The output path as a Path, or InvalidInputError if it names no form `write_video` writes."""
    return _form(path)[0]


def _check_frames(frames: np.ndarray, fps: float) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise InvalidInputError(f"video frames must be a uint8 numpy array, got "
                                f"{getattr(frames, 'dtype', type(frames).__name__)}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InvalidInputError(f"video frames must have shape [F, H, W, 3], got {list(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise InvalidInputError(f"video has no frames or no pixels: shape {list(frames.shape)}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not np.isfinite(fps) or fps <= 0:
        raise InvalidInputError(f"fps must be a positive number, got {fps!r}")
    return np.ascontiguousarray(frames)


# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp unless this is set: a real fork() that runs gRPC's
# fork handlers in a process with live gRPC channels, which broke the pipe to ffmpeg (1 write in 40 while a
# client was busy over gRPC; `make demo` failed so). Set, Python spawns ffmpeg without fork handlers.
SPAWN_WITHOUT_FORK_ENV = "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    os.environ.setdefault(SPAWN_WITHOUT_FORK_ENV, "1")  # read by write_frames when it starts ffmpeg

    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(
        str(path), (frames.shape[2], frames.shape[1]), fps=float(fps), codec="libx264",
        pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
        output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart"])
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    ends = np.round(np.arange(1, len(frames) + 1) * 100.0 / fps)  # frame end times, centiseconds
    delays_ms = (np.diff(ends, prepend=0.0) * 10).astype(int).clip(min=10).tolist()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=delays_ms, loop=0)


def write_video(frames: np.ndarray, path: str | Path, fps: float) -> list[Path] | Path:
    """Write uint8 frames [F, H, W, 3] at `fps`; the file written, or the PNG frames in order.

    The form follows `path` (see the module doc and `check_video_out`); parent folders are created.
    """
    out, form = _form(path)
    frames = _check_frames(frames, fps)
    if form != "dir":
        out.parent.mkdir(parents=True, exist_ok=True)
        (_write_mp4 if form == ".mp4" else _write_gif)(frames, out, fps)
        return out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, frame in enumerate(frames):
        written.append(out / f"frame_{i:04d}.png")
        Image.fromarray(frame).save(written[-1])
    return written
