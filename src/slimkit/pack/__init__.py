"""Packed storage (the native format) and the runtime Linear that computes from it."""
from .bitpack import pack_bits, unpack_bits
from .native import is_native, read_native, write_native
from .runtime import PackedLinear, load
from .source import LayerRecord, PackError, SlimkitFolder

__all__ = ["pack_bits", "unpack_bits", "write_native", "read_native", "is_native", "PackedLinear", "load",
           "LayerRecord", "PackError", "SlimkitFolder"]
