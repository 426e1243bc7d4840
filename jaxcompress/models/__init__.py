"""Models a compressed checkpoint runs in: Flax BERT / MiniLM and a Llama-style decoder, and the
Hugging Face name mapping that loads their checkpoints (float or compressed) into them.

>>> from jaxcompress.models import load_hf, BertConfig
>>> BertConfig().hidden_size
384
"""

from jaxcompress.models.bert import BertConfig, BertModel, embed, mean_pool
from jaxcompress.models.hf import detect_arch, flax_to_hf, hf_to_flax, load_hf, model_for
from jaxcompress.models.layout import transpose_leaf
from jaxcompress.models.llama import Llama, LlamaConfig

__all__ = ["BertConfig", "BertModel", "Llama", "LlamaConfig", "embed", "mean_pool", "load_hf", "hf_to_flax", "flax_to_hf", "detect_arch", "model_for", "transpose_leaf"]
