"""Router (gate) rows for an MoE built from dense models, one row per expert and layer.

The prompt modes follow mergekit-moe's arithmetic exactly:

- prompts are tokenized as the base's BOS token text + prompt, without added special tokens, padded
  on the left with the BOS id (the base's tokenizer, ``padding_side='left'``);
- ``cheap_embed``: the base's token embeddings of every non-padding token of every prompt, summed and
  L2-normalised; the same row for every layer;
- ``hidden`` / ``hidden_last``: the hidden state *entering* each layer (the embeddings for layer 0,
  the previous layer's output after that) at the last token of each prompt, averaged over the prompts;
  ``hidden_avg`` averages over every position of the padded batch instead of taking the last;
- an expert's vector is f(positive prompts), minus f(negative prompts) if it has any, L2-normalised
  (clamped at 1e-8);
- ``library`` (moerge's own; build.py): each expert's library-card task centroid, every layer;
- ``random``: standard normal rows; ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)) rows, as
  torch.nn.Linear initialises them (both from a generator seeded by the config's ``seed``).

mergekit runs the ``hidden`` forward pass in bfloat16 always; moerge runs it in bfloat16 for a base
stored in half precision (identical rows) and in float32 for a float32 base (rows agree to bf16
rounding); bench/moe_parity.py measures both.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from moerge.errors import MoergeError


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{folder}: cannot load the base model's tokenizer ({first}); the prompt gate modes need it "
                          "(or use gate_mode: random)") from None
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tokenizer, prompts: list[str]):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def cheap_embedding(embed: torch.Tensor, batch, num_layers: int) -> torch.Tensor:
    """(num_layers, hidden): the normalised sum of the prompts' token embeddings, repeated per layer."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if int(ids.max()) >= embed.shape[0]:
        raise MoergeError(f"a prompt token id {int(ids.max())} is outside the base's embedding ({embed.shape[0]} rows); "
                          "the base's tokenizer and weights do not match")
    h = embed.float()[ids] * mask.unsqueeze(-1).float()  # (batch, seq, hidden)
    v = h.sum(dim=1).sum(dim=0, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return v.repeat(num_layers, 1)


def hidden_states(model, batch, average: bool) -> torch.Tensor:
    """(num_layers, hidden): hidden states entering each layer, at the last token (or averaged over
    positions), averaged over the prompts."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    return_dict=True)
    hs = torch.stack(out.hidden_states[:-1])  # (layers, batch, seq, hidden)
    hs = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
    return hs.sum(dim=1) / hs.shape[1]


def gate_vectors(experts, embed_fn: Callable, tokenizer) -> torch.Tensor:
    """(layers, experts, hidden) from each expert's positive and negative prompts."""
    vecs = []
    for e in experts:
        v = embed_fn(tokenize(tokenizer, e.positive_prompts))
        if e.negative_prompts:
            v = v - embed_fn(tokenize(tokenizer, e.negative_prompts))
        vecs.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vecs).permute(1, 0, 2).contiguous()


def random_gates(mode: str, layers: int, experts: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((layers, experts, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=g) * 2 * scale - scale


