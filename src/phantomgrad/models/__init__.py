"""Implicit models built on :class:`phantomgrad.DEQ`: MDEQ and monDEQ (images), the DEQ transformer
(language) and IGNN (graphs), and the small contractive map of the synthetic study."""

from .ignn import IGNN, IGNNConfig
from .mdeq import MDEQ, MDEQBlock, MDEQConfig
from .mondeq import MonDEQ, MonDEQClassifier
from .toy import TanhMap
from .transformer import DEQTransformer, TransformerConfig

__all__ = [
    "MDEQ",
    "MDEQBlock",
    "MDEQConfig",
    "MonDEQ",
    "MonDEQClassifier",
    "DEQTransformer",
    "TransformerConfig",
    "IGNN",
    "IGNNConfig",
    "TanhMap",
]
