"""Shared code of the trainers and generators.

Importing the package first keeps bitsandbytes out of start-up. diffusers imports it whenever it is
installed, for quantized models this project does not load; it costs a second and, on CPUs, logs a
warning about a hub kernel it cannot fetch offline. This project imports bitsandbytes itself, only for
an 8-bit optimizer. PEFT (a test dependency) imports it too; its CPU-kernel notices are muted here,
before any import can emit them, because nothing here runs bitsandbytes' 4-bit CPU kernels.
"""

import logging

from diffusers.utils import import_utils as _diffusers_imports

_diffusers_imports._bitsandbytes_available = False
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)
