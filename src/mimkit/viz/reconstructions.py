"""Reconstruction pictures: original | masked input | prediction | prediction with visible patches pasted."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mimkit.models.vit import unpatchify


def denormalize(x: Tensor, mean, std) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def reconstruction_rows(images: Tensor, recon: dict[str, Tensor], patch_size: int, mean, std) -> Tensor:
    """Stack the four panels per image: -> (B * 4, C, H, W) in [0, 1] pixels."""
    C = images.shape[1]
    mask = recon["mask"].unsqueeze(-1)                             # (B, N, 1), 1 = removed
    pred = unpatchify(recon["pred"], patch_size, C)
    masked = unpatchify(recon["target"] * (1 - mask), patch_size, C)
    pasted = unpatchify(recon["target"] * (1 - mask) + recon["pred"] * mask, patch_size, C)
    grey = unpatchify(mask.expand_as(recon["target"]), patch_size, C)
    panels = [denormalize(images, mean, std), denormalize(masked, mean, std) * (1 - grey) + 0.5 * grey,
              denormalize(pred, mean, std), denormalize(pasted, mean, std)]
    return torch.stack(panels, dim=1).flatten(0, 1)


@torch.no_grad()
def save_reconstruction_grid(method, images: Tensor, path: Path, mean, std, *, seed: int = 0,
                             which: str = "student", upscale: int = 4) -> Path | None:
    """Save a PNG grid (one row per image, four columns); fixed ``seed`` -> the same masks every time.

    Returns None when the method does not predict pixels.
    """
    from torchvision.utils import make_grid

    g = torch.Generator().manual_seed(seed)
    device = next(method.parameters()).device
    images = images.to(device)
    noise = torch.rand(images.shape[0], method.num_patches, generator=g).to(device)
    was_training = method.training
    method.eval()
    recon = method.reconstruct(images, noise, which=which)
    method.train(was_training)
    if recon is None:
        return None
    rows = reconstruction_rows(images.float(), {k: v.float() for k, v in recon.items()}, method.patch_size, mean, std)
    if upscale > 1:
        rows = torch.nn.functional.interpolate(rows, scale_factor=upscale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(rows.cpu(), nrow=4, padding=2, pad_value=1.0)
    titled_image(grid, COLUMN_TITLES, 4).save(path)
    return path


#: the four panels of each row, left to right
COLUMN_TITLES = ("original", "masked input", "prediction", "pred.+visible")


def titled_image(grid: Tensor, titles, columns: int, header: int = 14):
    """A PIL image of ``grid`` ((C, H, W) in [0, 1]) with a white header row holding one title per column."""
    from PIL import Image, ImageDraw, ImageFont

    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
    body = Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    out = Image.new("RGB", (body.width, body.height + header), "white")
    out.paste(body, (0, header))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    width = body.width / columns
    for j, title in enumerate(titles):
        w = draw.textlength(title, font=font)
        draw.text((j * width + max(0.0, (width - w) / 2), 1), title, fill="black", font=font)
    return out
