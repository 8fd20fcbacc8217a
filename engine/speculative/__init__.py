"""Speculative decoding: draft tokens proposed without a model (n-gram prompt lookup, ngram.py),
verified and accepted by one forward pass of the target model per step (decoder.py)."""
