from .engine import BlockReport, CompressionResult, LayerReport, compress_model

__all__ = ["BlockReport", "CompressionResult", "LayerReport", "compress_model"]
