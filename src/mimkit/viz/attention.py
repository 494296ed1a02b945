"""Attention maps of the last encoder layer, and the pictures drawn from them.

timm's ``Attention`` runs fused ``scaled_dot_product_attention`` and never materialises the attention
matrix, so it is recomputed here from the last block's own weights on the tokens entering it:
``softmax(q k^T * scale)`` with ``q, k`` from ``attn.qkv(norm1(x))`` (a forward hook on ``norm1`` catches
its output during one ordinary forward of the whole, unmasked image).

Two picture styles:

* ``rcmae`` (rc-mae.txt Fig. 4): for one query patch, its attention over the patches in the last layer,
  averaged over heads, and the smallest set of patches holding 10% of that attention mass
  (:func:`mass_threshold`), overlaid on the image; the query patch is outlined in red.
* ``sdae`` (sdae.txt Fig. S-3): the cls token's attention over the patches, per head of the last layer
  and averaged over heads.

Figures use matplotlib's object API (no pyplot state), fixed panel sizes (so the PNG's size in pixels
is :func:`figure_size_px`), titles on the first row, no axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mimkit.errors import MimkitError

STYLES = ("rcmae", "sdae")
PANEL_IN = 1.6      # panel side, inches
HEADER_IN = 0.62    # room for the figure title and the column titles, inches
DPI = 100
#: query patch outline, heat-map colours, dimming of the patches outside the kept mass
QUERY_COLOR = "red"
CMAP = "inferno"
DIM = 0.18


# --------------------------------------------------------------------------------------------- maths
def block_attention(block: nn.Module, normed: Tensor) -> Tensor:
    """Attention probabilities of a timm ``Block``: ``normed`` (B, T, D) = ``block.norm1(x)``
    -> (B, heads, T, T), each row summing to 1 (no dropout)."""
    attn = block.attn
    B, T, _ = normed.shape
    qkv = attn.qkv(normed).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def last_layer_attention(encoder: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, heads, 1 + N, 1 + N) attention of the encoder's last block on the whole image
    (token 0 is the cls token, then the patches in row-major order)."""
    if len(encoder.blocks) == 0:
        raise MimkitError("the encoder has no transformer blocks (model.depth=0): no attention to draw")
    block = encoder.blocks[-1]
    caught: list[Tensor] = []
    handle = block.norm1.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        encoder.forward_features(images)
    finally:
        handle.remove()
    return block_attention(block, caught[-1]).float()


def query_attention(attn: Tensor, query: int) -> Tensor:
    """Head-averaged attention of patch ``query`` over the patches: (B, H, 1+N, 1+N) -> (B, N), rows
    renormalised to sum to 1 over the patches (the cls column is left out)."""
    n = attn.shape[-1] - 1
    if not 0 <= query < n:
        raise MimkitError(f"query patch {query} is out of range; accepted: 0 .. {n - 1} (row-major patch index)")
    a = attn[:, :, 1 + query, 1:].mean(dim=1)
    return a / a.sum(dim=-1, keepdim=True)


def cls_attention(attn: Tensor) -> Tensor:
    """The cls token's attention over the patches per head: (B, H, 1+N, 1+N) -> (B, H, N)."""
    return attn[:, :, 0, 1:]


def mass_threshold(weights: Tensor, mass: float = 0.1) -> Tensor:
    """Boolean mask (same shape) of the smallest set of largest entries along the last dimension whose
    sum reaches ``mass`` of the total (DINO-style; at least one entry is always kept)."""
    if not 0.0 < mass <= 1.0:
        raise MimkitError(f"attention mass to keep must be in (0, 1], got {mass}")
    values, order = weights.sort(dim=-1, descending=True)
    total = values.sum(dim=-1, keepdim=True)
    before = values.cumsum(dim=-1) - values           # mass of the strictly larger entries
    keep_sorted = before < mass * total
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def default_query(grid: int) -> int:
    """The patch at the centre of a ``grid x grid`` image (row-major index)."""
    return (grid // 2) * grid + grid // 2


# ------------------------------------------------------------------------------------------- figures
def figure_size_px(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture with ``rows x cols`` panels."""
    return round(cols * PANEL_IN * DPI), round((rows * PANEL_IN + HEADER_IN) * DPI)


def panel_figure(rows: int, cols: int, title: str, column_titles: list[str]):
    """A figure of ``rows x cols`` square image panels with a title and column titles; -> (fig, axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = cols * PANEL_IN, rows * PANEL_IN + HEADER_IN
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - HEADER_IN / height, wspace=0.04, hspace=0.04)
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, name in zip(axes[0], column_titles, strict=True):
        ax.set_title(name, fontsize=8, pad=3)
    return fig, axes


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def to_display(image: Tensor, mean, std) -> np.ndarray:
    """A normalised (C, H, W) image -> (H, W) or (H, W, 3) array in [0, 1] for ``imshow``."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    x = (image.detach().float().cpu() * s + m).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _show(ax, img: np.ndarray) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")


def _upsample(grid_values: Tensor, size: int) -> np.ndarray:
    """(g, g) patch values -> (size, size) array, each patch a constant block."""
    g = grid_values.shape[-1]
    return grid_values.float().cpu().repeat_interleave(size // g, 0).repeat_interleave(size // g, 1).numpy()


def _overlay(ax, img: np.ndarray, heat: Tensor) -> None:
    """Image in grey under a semi-transparent heat map of patch values (stretched to their min..max)."""
    grey = img if img.ndim == 2 else img.mean(axis=-1)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    lo, hi = heat.min(), heat.max()
    h = _upsample((heat - lo) / (hi - lo).clamp_min(1e-12), img.shape[0])
    ax.imshow(h, cmap=CMAP, vmin=0, vmax=1, alpha=0.7, interpolation="nearest")


def _kept(ax, img: np.ndarray, keep: Tensor) -> None:
    """Image with the patches outside ``keep`` dimmed."""
    k = _upsample(keep.float(), img.shape[0])
    shade = DIM + (1 - DIM) * k
    _show(ax, img * (shade if img.ndim == 2 else shade[..., None]))


def _mark(ax, query: int, grid: int, patch: int) -> None:
    from matplotlib.patches import Rectangle

    r, c = divmod(query, grid)
    ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, edgecolor=QUERY_COLOR,
                           linewidth=1.5))


@torch.no_grad()
def save_attention_figure(encoders: dict[str, nn.Module], images: Tensor, path: str | Path, mean, std, *,
                          style: str = "rcmae", query: int | None = None, mass: float = 0.1,
                          title: str = "") -> Path:
    """Draw attention maps of one or more encoders (``{"teacher": enc, ...}``) on ``images`` (B, C, H, W,
    normalised) and save a PNG; see the module docstring for the two styles."""
    if style not in STYLES:
        raise MimkitError(f"unknown attention picture style {style!r}; accepted: {', '.join(STYLES)}")
    if images.shape[0] == 0:
        raise MimkitError("no images to draw: the data set returned none (check --num-images and the test split)")
    first = next(iter(encoders.values()))
    device = next(first.parameters()).device
    images = images.to(device)
    grid, patch = first.grid_size, first.spec.patch_size
    attns = {name: last_layer_attention(enc.eval(), images).cpu() for name, enc in encoders.items()}
    heads = next(iter(attns.values())).shape[1]
    B = images.shape[0]
    if style == "rcmae":
        query = default_query(grid) if query is None else query
        cols = ["image, query patch"]
        for name in attns:
            cols += [f"{name}: attention", f"{name}: top {mass:.0%} mass"]
        title = title or f"last-layer attention of the query patch (#{query}), mean over {heads} heads"
    else:
        cols = ["image"]
        for name in attns:
            cols += [f"{name}: head {h + 1}" for h in range(heads)] + [f"{name}: mean"]
        title = title or f"last-layer [cls] attention per head and mean ({heads} heads)"
    fig, axes = panel_figure(B, len(cols), title, cols)
    for b in range(B):
        img = to_display(images[b], mean, std)
        _show(axes[b, 0], img)
        if style == "rcmae":
            _mark(axes[b, 0], query, grid, patch)
        col = 1
        for attn in attns.values():
            if style == "rcmae":
                a = query_attention(attn[b : b + 1], query)[0]
                _overlay(axes[b, col], img, a.view(grid, grid))
                _kept(axes[b, col + 1], img, mass_threshold(a, mass).view(grid, grid))
                for ax in axes[b, col : col + 2]:
                    _mark(ax, query, grid, patch)
                col += 2
            else:
                maps = cls_attention(attn[b : b + 1])[0]              # (H, N)
                for h in range(heads):
                    _overlay(axes[b, col + h], img, maps[h].view(grid, grid))
                _overlay(axes[b, col + heads], img, maps.mean(0).view(grid, grid))
                col += heads + 1
    return save_figure(fig, path)


@torch.no_grad()
def save_teacher_student_reconstructions(method, images: Tensor, path: str | Path, mean, std, *,
                                         seed: int = 0) -> Path:
    """original | masked | student prediction | student + visible | teacher prediction | teacher + visible,
    on the same masks (the same ``seed`` draws the same masks as ``mimkit visualize reconstruction``)."""
    from mimkit.viz.reconstructions import reconstruction_rows

    device = next(method.parameters()).device
    images = images.to(device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(images.shape[0], method.num_patches, generator=g).to(device)
    was_training = method.training
    method.eval()
    try:
        recon = {w: method.reconstruct(images, noise, which=w) for w in ("student", "teacher")}
    finally:
        method.train(was_training)
    if any(r is None for r in recon.values()):
        raise MimkitError(f"method {method.name} does not predict pixels; no reconstruction to draw")
    B, C, H, W = images.shape
    rows = {w: reconstruction_rows(images.float(), {k: v.float() for k, v in r.items()}, method.patch_size,
                                   mean, std).view(B, 4, C, H, W) for w, r in recon.items()}
    panels = torch.cat([rows["student"], rows["teacher"][:, 2:]], dim=1).cpu()  # [0, 1] pixels
    ratio = recon["student"]["mask"][0].mean().item()
    cols = ["original", f"masked ({ratio:.0%})", "student", "student + visible", "teacher", "teacher + visible"]
    fig, axes = panel_figure(B, len(cols), "RC-MAE reconstructions on the same masks (norm_pix undone)", cols)
    for b in range(B):
        for j in range(len(cols)):
            x = panels[b, j]
            _show(axes[b, j], x[0].numpy() if C == 1 else x.permute(1, 2, 0).numpy())
    return save_figure(fig, path)
