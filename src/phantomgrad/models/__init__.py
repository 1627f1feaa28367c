"""Implicit models built on :class:`phantomgrad.DEQ`: MDEQ (images), the DEQ transformer
(language) and IGNN (graphs), and the small contractive map of the synthetic study."""

from .ignn import IGNN, IGNNConfig
from .mdeq import MDEQ, MDEQBlock, MDEQConfig
from .toy import TanhMap
from .transformer import DEQTransformer, TransformerConfig

__all__ = ["MDEQ", "MDEQBlock", "MDEQConfig", "DEQTransformer", "TransformerConfig", "IGNN", "IGNNConfig", "TanhMap"]
