"""LoRA / QLoRA: low-rank adapters trained over a frozen (quantized) base, for unmodified functions.

* `lora_init(key, params, rules, rank=, alpha=)`: the adapters tree (`LoraAdapter` per kernel a
  `LoraRule` matches; ``A`` small random, ``B`` zero);
* `lora_apply(fn)`: ``g(base, adapters, *args)`` runs ``fn`` with each adapted kernel ``W`` as
  ``W + (alpha / rank) A @ B``, computed as the base's dot (a `QArray` base stays quantized: its
  codes are converted inside the op) plus ``(x @ A) @ B``; a rule set on the program layer, so
  linen / nnx / plain functions work unmodified, under ``jit`` / ``grad`` / ``vmap`` / ``scan``;
* `lora_train_step(loss_fn, optimizer)`: an optax step that differentiates the adapters only;
* `merge_lora(base, adapters)`: the merged float tree, to quantize again for deployment;
* `save_adapters` / `load_adapters`: adapter-only checkpoints (safetensors or Orbax).
"""

from jaxcompress.lora.adapters import LoraAdapter, LoraRule, LoraTargetError, lora_init, merge_lora
from jaxcompress.lora.execution import lora_apply
from jaxcompress.lora.storage import load_adapters, save_adapters
from jaxcompress.lora.training import lora_train_step

__all__ = [
    "LoraAdapter",
    "LoraRule",
    "LoraTargetError",
    "lora_apply",
    "lora_init",
    "lora_train_step",
    "load_adapters",
    "merge_lora",
    "save_adapters",
]
