"""Decoding many images into one set of uint8 arrays (:class:`_Decoded`, what the decode cache holds):
the one-by-one decoder that keeps or skips unreadable files, stacking to ``(N, C, H, W)`` and the
conversion to :class:`InMemoryData`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mimkit.data.sources.common import (
    ImageSplit,
    InMemoryData,
    decode_image_mode,
    describe_failure,
    no_images_error,
    unreadable_error,
)
from mimkit.errors import MimkitError


@dataclass
class _Decoded:
    """Decoded arrays of an image tree (what the cache holds)."""

    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray | None  # int64 (N,)
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    classes: list[str] | None
    skipped: list[tuple[str, str]]
    converted: dict[str, int] = field(default_factory=dict)  # original PIL mode -> images converted from it



class _Decoder:
    """Decodes images one by one, keeping (sort key, name, array, label) and the unreadable ones.

    In strict mode the first unreadable image raises MimkitError naming it.
    """

    def __init__(self, mode: str, strict: bool, size: int | None = None) -> None:
        self.mode = mode
        self.strict = strict
        self.size = size
        self.items: list[tuple[object, str, np.ndarray, object]] = []
        self.skipped: list[tuple[str, str]] = []
        self.converted: Counter[str] = Counter()

    def add(self, name: str, source: bytes | str, label: object = None, sort_key: object = None) -> None:
        try:
            arr, original = decode_image_mode(source, self.mode, self.size)
        except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError...)
            if self.strict:
                raise unreadable_error(name, describe_failure(e)) from None
            self.skipped.append((name, describe_failure(e)))
            return
        if original != self.mode:
            self.converted[original] += 1
        self.items.append((len(self.items) if sort_key is None else sort_key, name, arr, label))


def stack_same_size(arrays: list[np.ndarray], names: list[str], where: object, hint: str) -> np.ndarray:
    """Stack ``(H, W, C)`` arrays into uint8 ``(N, C, H, W)``; MimkitError naming two files when sizes differ."""
    first = arrays[0].shape
    for arr, name in zip(arrays, names):
        if arr.shape != first:
            raise MimkitError(
                f"images under {where} differ in size ({names[0]} is {first[1]}x{first[0]}x{first[2]}, {name} is "
                f"{arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]}); an in-memory set needs one size: {hint}"
            )
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def _assemble(train: _Decoder, test: _Decoder | None, classes: list[str] | None, where: object, hint: str) -> _Decoded:
    """Sort the decoded items, check that all share one size and stack them.

    Labels are taken from the items (ints, or class names mapped through ``classes``); a split
    with any missing label is unlabelled.
    """
    skipped = train.skipped + (test.skipped if test is not None else [])
    train_items = sorted(train.items, key=lambda t: t[0])
    test_items = sorted(test.items, key=lambda t: t[0]) if test is not None else []
    if not train_items:
        if skipped:
            name, reason = skipped[0]
            raise MimkitError(f"none of the {len(skipped)} images under {where} could be read (e.g. {name}: {reason})")
        raise no_images_error(Path(str(where)))
    index = {c: i for i, c in enumerate(classes)} if classes is not None else {}

    def labels(items: list[tuple[object, str, np.ndarray, object]]) -> np.ndarray | None:
        if classes is None or any(t[3] is None for t in items):
            return None
        return np.asarray([index[t[3]] if isinstance(t[3], str) else t[3] for t in items], dtype=np.int64)

    everything = train_items + test_items
    stacked = stack_same_size([t[2] for t in everything], [t[1] for t in everything], where, hint)
    n = len(train_items)
    converted = train.converted + (test.converted if test is not None else Counter())
    return _Decoded(
        train_images=stacked[:n],
        train_labels=labels(train_items),
        test_images=stacked[n:] if test_items else None,
        test_labels=labels(test_items) if test_items else None,
        classes=classes,
        skipped=skipped,
        converted=dict(converted),
    )


def _to_in_memory(d: _Decoded, mean: tuple[float, ...], std: tuple[float, ...]) -> InMemoryData:
    def split(images: np.ndarray | None, labels: np.ndarray | None) -> ImageSplit | None:
        if images is None:
            return None
        return ImageSplit(torch.from_numpy(images), None if labels is None else torch.from_numpy(labels))

    train = split(d.train_images, d.train_labels)
    assert train is not None
    return InMemoryData(train, split(d.test_images, d.test_labels), d.classes, mean, std)
