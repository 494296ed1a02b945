"""Analyses of what the EMA teacher does (rc-mae.txt Sec. 4, Fig. 2 and Fig. 3b).

* :mod:`mimkit.analysis.linear_model` — the linear MAE + teacher experiment of App. E.1 / Fig. 2 (top row):
  ``mimkit analyze linear-model``.
* :mod:`mimkit.analysis.vit_alignment` — the same three-sequence protocol on a trained RC-MAE ViT
  (Fig. 2, bottom row): ``mimkit analyze grad-alignment``.
* :mod:`mimkit.analysis.grad_hist` — side-by-side histograms of the gradient-alignment monitor of several
  training runs (Fig. 3b): ``mimkit analyze grad-hist``.
* :mod:`mimkit.analysis.trends` — the paper's stated trends, turned into computed verdicts.

See ``docs/analysis.md`` for the figures and how they compare with the paper.
"""

from mimkit.analysis.trends import SEQUENCE_TYPES, trend_verdicts

__all__ = ["SEQUENCE_TYPES", "trend_verdicts"]
