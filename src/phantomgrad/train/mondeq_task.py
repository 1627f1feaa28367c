"""The image task's models: the MDEQ presets and the monDEQ family (``model=mondeq``, ``model=mondeq-conv``).

A monDEQ run is the image task (data, loss, metrics, step) with the model swapped for a
:class:`~phantomgrad.models.mondeq.MonDEQClassifier`: :func:`build_image_task` builds the image
task as usual and, for a monDEQ preset, puts the classifier in the MDEQ's place. ``arch`` takes the
classifier's keywords (``hidden``, ``m``, ``splitting``, ``alpha``, ``kernel_size``, ``pool``); the
config's ``solver*`` keys iterate the splitting map (``solver=fixed_point`` runs the splitting method
itself) and ``backward`` differentiates it.
"""

from __future__ import annotations

import dataclasses
from typing import cast

from phantomgrad.models import mdeq, mondeq

from . import builders, image_task
from .config import ConfigError, TrainConfig
from .tasks import Task

IMAGE_MODELS = (*mdeq.PRESETS, *mondeq.PRESETS)


def build_image_task(cfg: TrainConfig) -> Task:
    """The image task of ``cfg``, with a monDEQ classifier where ``cfg.model`` names one."""
    if cfg.model not in mondeq.PRESETS:
        return image_task.build_image_task(cfg)
    if cfg.dropout:
        raise ConfigError(f"dropout={cfg.dropout} is not supported by {cfg.model}; leave dropout at 0")
    base = image_task.build_image_task(dataclasses.replace(cfg, model="mdeq-tiny", arch={}))
    shape = cast(mdeq.MDEQ, base.model).config  # the data's channels, size and classes, as the image task read them
    try:
        model = mondeq.build_classifier(
            str(cfg.model),
            shape.in_channels,
            shape.image_size,
            shape.num_classes,
            dict(cfg.arch),
            solver=builders.build_solver(cfg),
            backward=builders.build_backward(cfg),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad arch options for {cfg.model}: {err}") from None
    return dataclasses.replace(base, model=model)


__all__ = ["IMAGE_MODELS", "build_image_task"]
