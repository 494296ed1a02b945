"""Checkpoints in and out: ours, the field's formats (timm, Hugging Face, the official MAE / RC-MAE / SdAE code).

* :mod:`mimkit.interop.loading` — :func:`~mimkit.interop.loading.open_checkpoint`, the one reader of every
  checkpoint (pre-training, imported, fine-tuned, export folders) into a typed object.
* :mod:`mimkit.interop.keys` — pure renaming functions between our state dicts and the others'.
* :mod:`mimkit.interop.foreign` — :func:`import_checkpoint`: a foreign file or folder -> our encoder
  (and decoder) weights with the shapes inferred from them, loaded without executing pickled code.
* :mod:`mimkit.interop.export` — folders timm and transformers load without mimkit;
  :mod:`mimkit.interop.modelcard` — their Hub model cards.

It sits above the methods and the training engine (whose checkpoints it reads) and below the evaluations, the
analyses and the commands.
"""

from mimkit.interop.foreign import (
    ImportedWeights,
    apply_import,
    import_checkpoint,
    imported_checkpoint,
    read_foreign_file,
)

__all__ = ["ImportedWeights", "apply_import", "import_checkpoint", "imported_checkpoint", "read_foreign_file"]
