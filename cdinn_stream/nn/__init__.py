"""The network and its inference forms (float, folded, int8), weights and the public inference API."""
