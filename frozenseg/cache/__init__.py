"""The feature cache: the frozen detector run once over a dataset, stored for training.

``write_cache(detector, dataset, out_dir, ...)`` writes it (see
:mod:`frozenseg.cache.writer`); ``FeatureCache(out_dir)`` reads it (see
:mod:`frozenseg.cache.store` for the format); ``verify_cache(out_dir)`` names bad shards.
"""

from frozenseg.cache.store import CachedImage, CacheError, FeatureCache, verify_cache
from frozenseg.cache.writer import write_cache

__all__ = ["CacheError", "CachedImage", "FeatureCache", "verify_cache", "write_cache"]
