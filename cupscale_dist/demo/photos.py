"""The photos the demo model learns from, with a hand-written caption and the licence of each.

Every photo ships inside a pip package (scikit-image's `skimage.data`, scikit-learn's `sklearn/datasets/images`), so
training needs no download. Licences are the packages' own statements (the `skimage.data` docstrings and
`sklearn/datasets/images/README.txt`), copied here so the record travels with the weights.

Held out: the bundled example (astronaut) and the coffee cup are never seen in training; `cupscale eval` measures
on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Photo:
    name: str  # skimage.data function, or "sklearn:<file>"
    caption: str
    licence: str


PHOTOS = (
    Photo("astronaut", "a portrait photo of a smiling woman astronaut in a white space suit in front of a flag",
          "public domain (NASA Great Images database)"),
    Photo("coffee", "a photo of a cup of coffee on a saucer on a red table, top view",
          "CC0 (photographer Rachel Michetti; courtesy of Pikolo Espresso Bar)"),
    Photo("chelsea", "a close up photo of a ginger tabby cat with green eyes and white whiskers",
          "CC0 (photographer Stefan van der Walt)"),
    Photo("rocket", "a photo of a white rocket on a launch pad with towers under a blue sky",
          "public domain (SpaceX)"),
    Photo("hubble_deep_field", "a photo of many small galaxies and stars in the black night sky, deep space",
          "public domain (NASA)"),
    Photo("immunohistochemistry", "a microscope photo of tissue cells stained brown and blue",
          "no known copyright restrictions (scikit-image)"),
    Photo("retina", "a medical photo of the orange retina of an eye with red blood vessels on a black background",
          "CC0 1.0 (Häggström, Wikiversity Journal of Medicine)"),
    Photo("sklearn:china.jpg", "a photo of an old chinese temple with a tiled roof among green trees under the sky",
          "CC BY 2.0 (danielbuechele on Flickr; scikit-learn sample image)"),
    Photo("sklearn:flower.jpg", "a close up photo of a pink flower with yellow center and green leaves",
          "CC BY 2.0 (vultilion on Flickr; scikit-learn sample image)"),
    Photo("camera", "a black and white photo of a man with a camera on a tripod in a field",
          "CC0 (photographer Lav Varshney)"),
    Photo("coins", "a black and white photo of old coins on a dark background",
          "no known copyright restrictions (scikit-image)"),
    Photo("brick", "a black and white photo of a brick wall", "CC0 (CC0Textures, Bricks25)"),
    Photo("grass", "a black and white photo of grass", "CC0 (CC0Textures)"),
    Photo("gravel", "a black and white photo of gravel stones", "CC0 (CC0Textures, Gravel04)"),
    Photo("cell", "a black and white microscope photo of a cell", "CC0 (scikit-image)"),
    Photo("text", "a black and white photo of printed text on a page",
          "public domain (scikit-image)"),
)

HELD_OUT = ("astronaut", "coffee")  # never seen in training: the bundled example and one more colour photo


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one photo from the pip packages (grey photos become three equal channels)."""
    if name.startswith("sklearn:"):
        from importlib.resources import files

        from PIL import Image

        with (files("sklearn.datasets") / "images" / name.split(":", 1)[1]).open("rb") as f:
            array = np.asarray(Image.open(f).convert("RGB"))
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def photo(name: str) -> Photo:
    """The record of one photo by name."""
    for entry in PHOTOS:
        if entry.name == name:
            return entry
    raise KeyError(f"no photo {name!r}; known: {', '.join(p.name for p in PHOTOS)}")


def training_photos() -> list[Photo]:
    """Every photo except the held-out ones."""
    return [p for p in PHOTOS if p.name not in HELD_OUT]


def held_out_round_trip_psnr(round_trip, quantise: bool = True) -> dict[str, float]:
    """PSNR (dB) of each held-out photo through ``round_trip`` ((1, 3, H, W) in [-1, 1] -> the same; sides cut to
    multiples of 8); ``quantise``: from the 8-bit photo to the output rounded to 8 bits, as a saved picture is judged
    (False: the float output, as the VAE experiments compare)."""
    import torch

    from ..quality.image_metrics import psnr

    out = {}
    with torch.no_grad():
        for name in HELD_OUT:
            array = load_photo(name)
            array = array[: array.shape[0] // 8 * 8, : array.shape[1] // 8 * 8]
            x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
            y = (round_trip(x).clamp(-1, 1)[0].permute(1, 2, 0) + 1) * 127.5
            out[name] = psnr(y.round().to(torch.uint8).numpy() if quantise else y.numpy(), array)
    return out
