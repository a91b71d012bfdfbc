"""Blueberry as a `transformers` model: `BlueberryConfig` and `BlueberryForCausalLM`.

export_hf.py ships this file (as modeling_blueberry.py) with model.py and config.py, unchanged, in every
exported folder whose switches plain Llama cannot express, so that

    AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)

runs Blueberry's own forward pass. Nothing here computes the network: this is the glue between
transformers' conventions and model.py's (labels shifted inside, the cache generate() owns, left padding
from the attention mask, weights built on the meta device). It imports from this repository when run
here, and from the package transformers makes of the folder when loaded there.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # in an exported folder: transformers' package of remote code
    from .config import ModelConfig, saved_model_config
    from .model import Blueberry, check_length, rope_tables
except ImportError:  # in the repository
    from config import ModelConfig, saved_model_config
    from model import Blueberry, check_length, rope_tables

# transformers 5 returns the cache as `cache`; earlier versions as `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class BlueberryConfig(PretrainedConfig):
    """`blueberry` holds the ModelConfig fields; the usual transformers names (hidden_size, num_hidden_layers,
    max_position_embeddings, ...) are derived from them for the tools that read those (caches, lm-eval)."""
    model_type = "blueberry"

    def __init__(self, blueberry: dict | None = None, use_cache: bool = True, **kwargs):
        cfg = saved_model_config(blueberry) if blueberry else ModelConfig()
        self.blueberry = {name: getattr(cfg, name) for name in ModelConfig.__dataclass_fields__}
        kwargs.update(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                      max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings)
        super().__init__(**kwargs)
        self.use_cache = use_cache  # after: transformers 5 drops generation settings from a config's kwargs

    def model_config(self) -> ModelConfig:
        return saved_model_config(self.blueberry)


def new_cache(config):
    """The cache transformers' own decoders start with: a DynamicCache, told the layer layout where it can be."""
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers before 4.56 builds its layers as they come
        return DynamicCache()


class CacheView:
    """model.KVCache's interface over a transformers Cache (DynamicCache by default), so that model.py's forward
    pass runs unchanged on the cache that generate() owns, grows, reorders (beam search) and crops. Every row
    holds as many slots as the others (transformers pads on the left: `pad`), so new tokens go at the end.
    `previous_token` (B,): the token before the new ones, which a model with bigram_buckets reads (generate() passes
    it, see BlueberryForCausalLM.prepare_inputs_for_generation); the cache holds keys and values, not tokens."""

    def __init__(self, cache, pad, max_len: int, input_ids, previous_token=None):
        self.cache, self.pad, self.max_len, self.input_ids = cache, pad, max_len, input_ids
        self.previous_token = previous_token

    def append(self, T: int) -> tuple:
        past = self.past = self.cache.get_seq_length()  # an int: previous_tokens reads it with no device sync
        check_length(past + T, self.max_len)
        slots = torch.arange(past, past + T, device=self.input_ids.device)
        return slots.expand(self.input_ids.size(0), T), past + T

    def update(self, layer: int, k, v):
        return self.cache.update(k, v, layer)

    def previous_tokens(self, idx, slots):
        """model.KVCache.previous_tokens: the token before each new one, -1 before a row's first real token."""
        past = self.past
        if past and self.previous_token is None:
            raise ValueError("this model (bigram_buckets) continues a cache only with previous_token=, the token "
                             "before the new input_ids (generate() passes it)")
        first = self.previous_token[:, None] if past else torch.full_like(idx[:, :1], -1)
        before = torch.cat([first.to(idx), idx[:, :-1]], dim=1)
        real = slots if self.pad is None else slots - self.pad[:, None]
        return before.masked_fill(real <= 0, -1)


def left_padding(attention_mask, past: int):
    """Slots of left padding per row (a LongTensor), from a 2-D attention mask over past + new tokens; None when
    there is none. Right padding is fine without a past (a causal model never looks ahead); holes are not."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    width = mask.size(1)
    pad = (~mask).long().cumprod(-1).sum(-1)  # leading zeros of each row
    filled = torch.arange(width, device=mask.device) >= pad[:, None]
    if not torch.equal(mask, filled):
        real = mask.long().sum(-1)
        right = torch.arange(width, device=mask.device) < real[:, None]
        if past or not torch.equal(mask, right):
            raise ValueError("Blueberry takes left padding only (tokenizer.padding_side = 'left'): every row of the "
                             "attention mask must be zeros, then ones")
        return None
    return pad if pad.any() else None


class BlueberryForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BlueberryConfig
    base_model_prefix = "model"
    _supports_cache_class = True  # transformers 4.x: generate() may hand it a DynamicCache

    def __init__(self, config: BlueberryConfig):
        super().__init__(config)
        self.model = Blueberry(config.model_config())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Every weight comes from model.safetensors (or Blueberry's own init, for a model built from a config).
        transformers builds the model on the meta device and gives non-persistent buffers back uninitialized:
        recompute the RoPE tables, in the weights' dtype as inference.py's `model.to(dtype)` would."""
        if isinstance(module, Blueberry):
            cfg, weight = module.cfg, module.embed.weight
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            module.rope_cos = cos.to(weight.device, weight.dtype)
            module.rope_sin = sin.to(weight.device, weight.dtype)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head  # None when tied: the head is the embedding

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """transformers' inputs for the next forward pass, plus the token before its new ones where the model
        reads it (bigram_buckets): only generate() holds the whole sequence."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        new = inputs["input_ids"].size(1) if inputs.get("input_ids") is not None else 0
        if self.model.bigram_embed is not None and 0 < new < input_ids.size(1):
            inputs["previous_token"] = input_ids[:, -new - 1]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, inputs_embeds=None, return_dict=None, previous_token=None,
                **kwargs):
        """transformers' causal-LM forward: `labels` unshifted (-100 ignored), the cache as `cache` (transformers
        5) or `past_key_values` (4.x), left padding read from `attention_mask`; `previous_token`: see CacheView."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("BlueberryForCausalLM takes input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = new_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        pad = left_padding(attention_mask, past)
        view = (CacheView(cache, pad, self.model.cfg.max_seq_len, input_ids, previous_token) if cache is not None
                else None)
        if view is None and pad is not None:  # left padding without a cache: a throwaway one carries it
            view = self.model.make_cache(input_ids.size(0), input_ids.size(1), pad)
        loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # Blueberry's targets are the next tokens
            logits, loss = self.model(input_ids, targets, cache=view)
        else:
            keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
            logits = self.model(input_ids, cache=view, logits_to_keep=keep)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        return out.to_tuple() if return_dict is False else out
