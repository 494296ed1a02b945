"""Method registry: ``method.name`` -> a :class:`Method` built from the config."""

from __future__ import annotations

from mimkit.errors import MimkitError
from mimkit.methods.base import Method, Progress, StepOutput
from mimkit.models.vit import resolve_model_spec

METHODS = ("mae", "rc-mae", "sdae", "rc-mae-free")


def build_method(cfg, in_chans: int) -> Method:
    """Instantiate the configured method for images with ``in_chans`` channels."""
    spec = resolve_model_spec(cfg.model, in_chans)
    m = cfg.method
    if m.name == "mae":
        from mimkit.methods.mae import MAE

        return MAE(spec, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss)
    if m.name == "rc-mae":
        from mimkit.methods.rc_mae import RCMAE
        from mimkit.teacher import momentum_schedule_from

        schedule = momentum_schedule_from(m)
        return RCMAE(spec, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, mask_mode=m.mask_mode,
                     gamma=m.gamma, momentum=schedule, grad_align_every=m.grad_align_every)
    if m.name == "rc-mae-free":
        from mimkit.methods.rc_mae_free import RCMAEFree
        from mimkit.teacher import momentum_schedule_from

        return RCMAEFree(spec, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, gamma=m.gamma,
                         momentum=momentum_schedule_from(m), correction_tokens=m.correction_tokens,
                         correction_scope=m.correction_scope, output_factor=m.output_factor)
    if m.name == "sdae":
        from mimkit.methods.sdae import build_sdae

        return build_sdae(cfg, spec)
    raise MimkitError(f"unknown method {m.name!r}; accepted: {', '.join(METHODS)}")


__all__ = ["METHODS", "Method", "Progress", "StepOutput", "build_method"]
