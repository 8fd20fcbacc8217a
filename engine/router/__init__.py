"""Routing requests over several workers: load-balancing policies (shared by ``--dp`` and the
standalone router), the approximate radix trees of cache-aware routing, and ``anyserve router``."""
