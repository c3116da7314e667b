"""Video files through PyAV (FFmpeg): frame rate of an input, writing annotated frames."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

from PIL import Image

__all__ = ["VideoWriter", "frame_rate"]

DEFAULT_RATE = Fraction(25)


def frame_rate(path: str | os.PathLike) -> Fraction:
    """The average frame rate of a video's first video stream (25 when the file gives none)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else DEFAULT_RATE


class VideoWriter:
    """Encodes RGB PIL frames into a video file (H.264 when FFmpeg has it, else MPEG-4 part 2).

    The frame size is fixed by the first frame; yuv420p needs even sides, so an odd side is
    padded by one black pixel.
    """

    def __init__(self, path: str | os.PathLike, rate: Fraction = DEFAULT_RATE):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.pix_fmt = "yuv420p"
        self._size: tuple[int, int] | None = None

    def write(self, image: Image.Image) -> None:
        import av

        if self._size is None:
            self._size = (image.width + image.width % 2, image.height + image.height % 2)
            self._stream.width, self._stream.height = self._size
        if image.size != self._size:
            canvas = Image.new("RGB", self._size)
            canvas.paste(image.convert("RGB"), (0, 0))
            image = canvas
        frame = av.VideoFrame.from_image(image.convert("RGB"))
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode(None):  # flush the encoder
            self._container.mux(packet)
        self._container.close()
