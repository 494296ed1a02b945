"""The 15 common corruptions of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich, 2019), for small images, in torch.

Written here rather than taken from the ``imagecorruptions`` package: its last release (1.1.2) calls
scikit-image with ``multichannel=`` (removed in scikit-image 0.19), imports ``scipy.ndimage.interpolation``
and ``pkg_resources``, needs OpenCV, draws from NumPy's global RNG, and carries ImageNet (224 px) parameters.

Every function maps a float batch ``(B, C, H, W)`` in [0, 1] (C = 1 or 3) and a severity 1..5 to a corrupted
batch, drawing all randomness from the ``torch.Generator`` it is given (CPU), so the same generator seed gives
the same images for any model. Outputs are clipped to [0, 1] and quantised to 8 bits (as the saved CIFAR-10-C
images are). Parameters are those of CIFAR-10-C (32 px) where our operation matches theirs; spatial sizes are
given for 32 px and scaled by ``min(H, W) / 32``. The operations that depart from CIFAR-10-C:

- glass blur: each pass moves every pixel to a random neighbour within ``max_delta`` (a vectorised gather),
  not the sequential pixel swaps of the reference;
- motion blur (and the snow streaks): a one-sided line kernel with Gaussian weights along a random angle,
  our stand-in for ImageMagick's MotionBlur;
- fog: fractal noise by spectral synthesis (amplitude ~ f^-log2(decay)), the spectrum of the reference's
  diamond-square plasma with the same decay;
- frost: a procedural texture (fractal haze + needle-like crystals along six directions) instead of the
  reference's photographs of frost, blended with the same weights;
- elastic: a smooth random displacement field (Gaussian-filtered noise, RMS ``alpha`` px) plus a small random
  affine jitter, our own parameters.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mimkit.errors import MimkitError

SEVERITIES = (1, 2, 3, 4, 5)

# ------------------------------------------------------------------------------------------------ helpers


def _scale(x: Tensor) -> float:
    """Spatial parameters are for 32 px images."""
    return min(x.shape[-2:]) / 32.0


def _pad(x: Tensor, p: int) -> Tensor:
    mode = "reflect" if p < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (p, p, p, p), mode=mode) if p > 0 else x


def _gauss1d(sigma: float) -> Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t**2 / (2 * max(sigma, 1e-6) ** 2))
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)``, reflected borders."""
    if sigma <= 0:
        return x
    k = _gauss1d(sigma).to(x)
    r = k.numel() // 2
    b, c, h, w = x.shape
    y = _pad(x.reshape(b * c, 1, h, w), r)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def _filter(x: Tensor, kernels: Tensor) -> Tensor:
    """Correlate each image with its own kernel: x (B, C, H, W), kernels (B, K, K) or (K, K)."""
    b, c, h, w = x.shape
    if kernels.ndim == 2:
        kernels = kernels.expand(b, -1, -1)
    k = kernels.shape[-1]
    weight = kernels.to(x).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, K, K)
    y = F.conv2d(_pad(x.reshape(1, b * c, h, w), k // 2), weight, groups=b * c)
    return y.reshape(b, c, h, w)


def _line_kernels(length: float, sigma: float, angles: Tensor, two_sided: bool = False) -> Tensor:
    """(B, K, K) kernels along ``angles`` (radians): Gaussian weights exp(-t^2 / 2 sigma^2) at distance t = 0..length
    from the centre (both directions when ``two_sided``), bilinearly splatted, normalised to sum 1."""
    r = max(1, math.ceil(length))
    size = 2 * r + 1
    t = torch.arange(0, r + 1, dtype=torch.float32)
    if two_sided:
        t = torch.cat([-t.flip(0)[:-1], t])
    w = torch.exp(-t**2 / (2 * max(sigma, 1e-6) ** 2))
    b = angles.shape[0]
    px = r + t[None] * torch.cos(angles)[:, None]          # (B, T) column
    py = r - t[None] * torch.sin(angles)[:, None]          # (B, T) row (image y points down)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    out = torch.zeros(b, size * size)
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = (x0 + dx).clamp(0, size - 1).long(), (y0 + dy).clamp(0, size - 1).long()
        out.scatter_add_(1, yi * size + xi, wt * w[None])
    out = out.view(b, size, size)
    return out / out.sum(dim=(1, 2), keepdim=True)


def _zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom into the centre by ``factor`` >= 1 (bilinear), same output size."""
    b = x.shape[0]
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=x.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fractal_noise(b: int, h: int, w: int, beta: float, g: torch.Generator) -> Tensor:
    """(B, 1, H, W) fractal noise in [0, 1] (per-image min-max): Gaussian Fourier coefficients, amplitude ~ f^-beta.

    Diamond-square plasma whose perturbations shrink by ``decay`` per octave has per-octave variance
    ~ decay^(-2k); the matching spectral slope is ``beta = 1 + log2(decay)``.
    """
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    f = torch.sqrt(fx**2 + fy**2)
    amp = torch.where(f > 0, f.clamp_min(1e-6) ** -beta, torch.zeros(()))
    spec = torch.complex(torch.randn(b, h, w // 2 + 1, generator=g), torch.randn(b, h, w // 2 + 1, generator=g)) * amp
    n = torch.fft.irfft2(spec, s=(h, w))
    lo = n.amin(dim=(1, 2), keepdim=True)
    hi = n.amax(dim=(1, 2), keepdim=True)
    return ((n - lo) / (hi - lo).clamp_min(1e-12)).unsqueeze(1)


def _grey(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _uniform(shape, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


# ------------------------------------------------------------------------------------------------ noise
def gaussian_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
    return x + sigma * torch.randn(x.shape, generator=g)


def shot_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    lam = (500, 250, 100, 75, 50)[s - 1]
    return torch.poisson(x * lam, generator=g) / lam


def impulse_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[s - 1]
    u = torch.rand(x.shape, generator=g)
    x = torch.where(u < amount / 2, torch.zeros(()), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones(()), x)


# ------------------------------------------------------------------------------------------------ blur
def defocus_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[s - 1]
    radius, alias = radius * _scale(x), alias * _scale(x)
    r = max(1, math.ceil(radius)) + math.ceil(3 * alias)
    sub = (torch.arange(8, dtype=torch.float32) + 0.5) / 8 - 0.5           # 8 x 8 samples per pixel
    t = (torch.arange(-r, r + 1, dtype=torch.float32)[:, None] + sub[None]).flatten()
    inside = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).float()  # (K*8, K*8)
    disk = F.avg_pool2d(inside[None, None], 8)[0, 0]                      # area of each pixel inside the disk
    disk = gaussian_blur((disk / disk.sum())[None, None], alias)[0, 0]  # the aliasing blur of the disk
    return _filter(x, disk / disk.sum())


def glass_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    sigma, delta, passes = ((0.5, 1, 1), (0.6, 1, 2), (0.7, 1, 3), (0.8, 1, 4), (0.9, 1, 5))[s - 1]
    sigma, delta = sigma * _scale(x), max(1, round(delta * _scale(x)))
    b, c, h, w = x.shape
    x = gaussian_blur(x, sigma)
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    for _ in range(passes):
        dy = torch.randint(-delta, delta + 1, (b, h, w), generator=g)
        dx = torch.randint(-delta, delta + 1, (b, h, w), generator=g)
        src = ((rows + dy).clamp(0, h - 1) * w + (cols + dx).clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
        x = x.reshape(b, c, h * w).gather(2, src).view(b, c, h, w)
    return gaussian_blur(x, sigma)


def motion_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    radius, sigma = ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0))[s - 1]
    angles = torch.deg2rad(_uniform((x.shape[0],), -45, 45, g))
    length = min(radius, 3 * sigma) * _scale(x)
    return _filter(x, _line_kernels(length, sigma * _scale(x), angles))


def zoom_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    top = (1.06, 1.11, 1.16, 1.21, 1.26)[s - 1]
    factors = torch.arange(1.0, top - 1e-9, 0.01)[1:].tolist()
    out = x.clone()
    for z in factors:
        out += _zoom(x, z)
    return out / (len(factors) + 1)


# ------------------------------------------------------------------------------------------------ weather
def snow(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    loc, scale, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95), (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))[s - 1]
    b, _, h, w = x.shape
    layer = loc + scale * torch.randn((b, 1, h, w), generator=g)
    if zoom != 1:
        layer = _zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros(()), layer)
    angles = torch.deg2rad(_uniform((b,), -135, -45, g))
    layer = _filter(layer, _line_kernels(min(radius, 3 * sigma) * _scale(x), sigma * _scale(x), angles)).clamp(0, 1)
    x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def frost_texture(b: int, c: int, h: int, w: int, g: torch.Generator) -> Tensor:
    """Procedural frost, (B, C, H, W) in [0, 1]: fractal haze + needle crystals grown from sparse seeds along six
    directions (one random rotation per image), bluish white. Stands in for the frost photographs of ImageNet-C."""
    sc = min(h, w) / 32.0
    haze = fractal_noise(b, h, w, 2.0, g)
    rotation = _uniform((b,), 0, math.pi / 3, g)
    needles = torch.zeros(b, 1, h, w)
    for k in range(6):
        seeds = (torch.rand((b, 1, h, w), generator=g) < 0.012).float() * _uniform((b, 1, h, w), 0.5, 1.0, g)
        kernels = _line_kernels(6 * sc, 3 * sc, rotation + k * math.pi / 6, two_sided=True)
        needles += _filter(seeds, kernels * (kernels > 0).sum(dim=(1, 2), keepdim=True) / 4)
    texture = (0.35 * haze + 0.7 * needles).clamp(0, 1)
    tint = torch.tensor([0.88, 0.94, 1.0])[:c] if c == 3 else torch.tensor([0.94])
    return texture * tint.view(1, c, 1, 1)


def frost(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    a, bw = ((1.0, 0.25), (0.95, 0.35), (0.9, 0.45), (0.85, 0.55), (0.8, 0.65))[s - 1]
    return a * x + bw * frost_texture(x.shape[0], x.shape[1], x.shape[2], x.shape[3], g)


def fog(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    a, decay = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[s - 1]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + a * fractal_noise(x.shape[0], x.shape[2], x.shape[3], 1 + math.log2(decay), g)
    return x * peak / (peak + a)


# ------------------------------------------------------------------------------------------------ digital
def brightness(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """+c on the HSV value channel (hue and saturation kept): every channel scales by (V + c) / V."""
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1]
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


def contrast(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def elastic_transform(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Smooth random displacement (RMS ``alpha`` px, correlation ``sigma`` px) + random affine jitter of up to
    ``affine`` px at the corners; parameters for 32 px: ours (see the module docstring)."""
    alpha, sigma, affine = ((0.5, 3.0, 0.5), (0.8, 3.0, 0.8), (1.1, 2.5, 1.1), (1.4, 2.5, 1.4), (1.7, 2.0, 1.7))[s - 1]
    b, _, h, w = x.shape
    sc = _scale(x)
    field = gaussian_blur(torch.randn((b, 2, h, w), generator=g), sigma * sc)
    field = field / field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12) * alpha * sc
    jitter = _uniform((b, 2, 3), -1.0, 1.0, g) * torch.tensor([[1 / w, 1 / w, 1.0], [1 / h, 1 / h, 1.0]])
    jitter[:, :, 2] *= torch.tensor([1 / w, 1 / h])
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]) + 2 * affine * sc * jitter  # (B, 2, 3), pixels -> [-1, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    grid = grid + torch.stack([field[:, 0] * 2 / w, field[:, 1] * 2 / h], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pixelate(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = (0.8, 0.65, 0.55, 0.45, 0.35)[s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * c)), max(1, round(w * c))), mode="area")  # box filter
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg_compression(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    quality = (80, 65, 58, 50, 40)[s - 1]
    u8 = _to_uint8(x)
    out = torch.empty_like(u8)
    for i in range(u8.shape[0]):
        arr = u8[i, 0].numpy() if u8.shape[1] == 1 else u8[i].permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            dec = torch.from_numpy(np.asarray(im).copy())
        out[i] = dec.unsqueeze(0) if dec.ndim == 2 else dec.permute(2, 0, 1)
    return out.float() / 255


# ------------------------------------------------------------------------------------------------ registry
CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog,
    "brightness": brightness, "contrast": contrast, "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}  # fmt: skip
#: the ImageNet-C grouping (for reports)
GROUPS = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
          "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
          "weather": ("snow", "frost", "fog"),
          "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")}


def _to_uint8(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def check_names(names) -> list[str]:
    names = list(names)
    for n in names:
        if n not in CORRUPTIONS:
            raise MimkitError(f"unknown corruption {n!r}; accepted: {', '.join(CORRUPTIONS)}")
    return names


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """Corrupt a float batch ``(B, C, H, W)`` in [0, 1] (CPU) -> the same shape, clipped and 8-bit quantised."""
    check_names([name])
    if severity not in SEVERITIES:
        raise MimkitError(f"severity must be one of 1..5, got {severity!r}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise MimkitError(f"corruptions take (B, C, H, W) batches with 1 or 3 channels, got {tuple(x.shape)}")
    out = CORRUPTIONS[name](x.detach().float().cpu(), severity, generator)
    return _to_uint8(out).float().div_(255)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image peak signal-to-noise ratio (dB) of [0, 1] batches."""
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)
