"""Core physics and maths: pure numpy/torch functions, no I/O, no pipeline."""
