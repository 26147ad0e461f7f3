"""Names the inference API and the command line share, without loading torch (``--help`` stays fast)."""

from __future__ import annotations

__all__ = ["DEFAULT_MODEL", "PRECISIONS", "PRECISION_HELP"]

#: the shipped default model
DEFAULT_MODEL = "cdinn-32"

#: inference precisions (:func:`~cdinn_stream.nn.reconstruct.load_model`'s ``precision``)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")

PRECISION_HELP = ("inference precision (default auto: int8 for an int8 model, else bf16 where the hardware has it "
                  "natively, else fp32); int8 loads the model's int8 sibling (cdinn-32 -> cdinn-32-int8), CPU only")
