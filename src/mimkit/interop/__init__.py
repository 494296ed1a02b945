"""Interoperability with the field's formats: key-name maps (timm, Hugging Face, the official MAE /
RC-MAE / SdAE code) and safe reading of foreign checkpoints.

* :mod:`mimkit.interop.keys` — pure renaming functions between our state dicts and the others'.
* :mod:`mimkit.interop.foreign` — :func:`import_checkpoint`: a foreign file or folder -> our encoder
  (and decoder) weights with the shapes inferred from them, loaded without executing pickled code.

Exports (timm and Hugging Face folders) live in :mod:`mimkit.export`.
"""

from mimkit.interop.foreign import (
    ImportedWeights,
    apply_import,
    import_checkpoint,
    imported_checkpoint,
    read_foreign_file,
)

__all__ = ["ImportedWeights", "apply_import", "import_checkpoint", "imported_checkpoint", "read_foreign_file"]
