"""Item images -> feature vectors, read from a folder or a tar archive of `<item id>.<ext>` files.

Two encoders: `color_histogram` (a 512-bin HSV histogram, no weights) and `clip` (CLIP image
features through `transformers`). Both take a batch of PIL images and return float32 `[n, D]`
rows of unit L2 norm.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from recbole_ext.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ENCODERS = ("color_histogram", "clip")


# ---------------------------------------------------------------- reading images

class ImageSource:
    """The images of a folder or a tar archive, by item id (the file name without extension).

    Tar members are read straight from the archive, so a poster collection never has to be
    unpacked. Hidden files are ignored: archives made on macOS carry `._1.jpg` metadata files
    that are not images.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        # name -> what to open: the member itself, since looking one up by name scans the archive
        entries: dict[str, Path | tarfile.TarInfo]
        if self.path.is_dir():
            entries = {p.name: p for p in sorted(self.path.iterdir()) if p.is_file()}
        elif self.path.is_file() and tarfile.is_tarfile(self.path):
            self._tar = tarfile.open(self.path)
            entries = {m.name: m for m in self._tar.getmembers() if m.isfile()}
        else:
            raise UserError(
                f"Images {self.path} should be a folder or a .tar archive of <item id>.<ext> "
                f"image files; it is neither."
            )
        self._entries: dict[str, Path | tarfile.TarInfo] = {}
        for name, entry in entries.items():
            base = Path(name)
            if base.name.startswith(".") or base.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if base.stem in self._entries:
                raise UserError(
                    f"Images {self.path} hold two images for item {base.stem!r}: "
                    f"{self._entries[base.stem].name} and {name}. Keep one."
                )
            self._entries[base.stem] = entry

    def ids(self) -> list[str]:
        return list(self._entries)

    def load(self, item_id: str) -> Image.Image:
        """The image of `item_id` as RGB, fully decoded so a corrupt file fails here."""
        entry = self._entries[item_id]
        where = f"{self.path}:{entry.name}" if self._tar else str(entry)
        try:
            if self._tar:
                data = self._tar.extractfile(entry).read()
            else:
                data = entry.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            raise UserError(
                f"Image {where} could not be read ({type(e).__name__}: {e}). "
                f"Replace or remove the file."
            ) from e

    def close(self) -> None:
        if self._tar:
            self._tar.close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- encoders

def color_histogram(images: Sequence[Image.Image]) -> np.ndarray:
    """HSV histograms, 8 x 8 x 8 = 512 bins (index = 64 * hue + 8 * saturation + value bin).

    Each channel's 0..255 range is cut into 8 equal bins of 32 values; counts cover every pixel
    and are scaled to unit L2 norm so that image size does not matter.
    """
    out = np.empty((len(images), 512), dtype=np.float32)
    for row, image in enumerate(images):
        bins = np.asarray(image.convert("RGB").convert("HSV")).reshape(-1, 3) // 32
        index = (bins[:, 0].astype(np.intp) * 8 + bins[:, 1]) * 8 + bins[:, 2]
        counts = np.bincount(index, minlength=512).astype(np.float32)
        out[row] = counts / np.linalg.norm(counts)
    return out


class ClipEncoder:
    """CLIP image features (`get_image_features`, L2-normalised) on CPU.

    `local_files_only` unless downloads are allowed, because these machines have no network and
    transformers would otherwise stall on retries before failing.
    """

    def __init__(self, model: str, allow_download: bool = False):
        from transformers import CLIPModel
        try:  # the PIL processor needs no torchvision, which the default one now requires
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor

        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=not allow_download)
            self.processor = Processor.from_pretrained(model, local_files_only=not allow_download)
        except (OSError, ValueError) as e:
            hint = "" if allow_download else " (downloads are off; --allow-download fetches it)"
            raise UserError(
                f"CLIP model {model} could not be loaded{hint}: {type(e).__name__}: {e}"
            ) from e
        self.model.eval()
        self.dim = int(self.model.config.projection_dim)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels)
        # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.numpy()


def make_encoder(
    name: str, model: str | None = None, allow_download: bool = False
) -> tuple[Callable[[Sequence[Image.Image]], np.ndarray], int]:
    """The encoder called `name` and the width of the vectors it returns."""
    if name == "color_histogram":
        if model:
            raise UserError("--model is only used by --encoder clip, not color_histogram.")
        return color_histogram, 512
    if name == "clip":
        if not model:
            raise UserError(
                "--encoder clip needs --model: a local CLIP folder (e.g. a saved "
                "openai/clip-vit-base-patch32) or, with --allow-download, a hub name."
            )
        encoder = ClipEncoder(model, allow_download)
        return encoder, encoder.dim
    raise UserError(f"Unknown image encoder {name!r}; choose one of {', '.join(ENCODERS)}.")
