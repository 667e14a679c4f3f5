"""Methods: named presets of *sequences × teacher signal × objective*.

The registry (:mod:`potstill.methods.registry`) names every method without importing it; the
contract between a method and the one training loop is :class:`potstill.methods.base.Method`;
each method's whole story is one file here (``token_level.py``, ``on_policy.py``, …).
"""

from potstill.methods.registry import METHODS, MethodInfo, build_method, method_class, method_info

__all__ = ["METHODS", "MethodInfo", "build_method", "method_class", "method_info"]
