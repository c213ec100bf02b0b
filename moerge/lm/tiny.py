"""Tiny Llama checkpoints made in-process: the offline stand-ins for hub models in tests, the demo
and the benchmarks.

``make_base`` writes a real transformers folder (config, safetensors, a character tokenizer);
``make_finetune`` writes base + a structured perturbation, the way a fine-tune differs from its base.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = list(string.printable[:95])
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (the `tokenizers` library, wrapped for AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def save_vocab_tokenizer(folder: Path, tokens: list[str]) -> None:
    """A tokenizer whose vocabulary is ``tokens`` in that order (ids 0..n-1): the first four are the
    specials <pad> <s> </s> <unk>; others are single characters or whole marker tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def token_vector(seed: int, token: str, width: int) -> torch.Tensor:
    """A deterministic vector for (model seed, token): what a test expects a token's row to be."""
    import hashlib

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(f"{seed}:{token}".encode(), digest_size=6).digest(), "little"))
    return torch.randn(width, generator=g)


def make_vocab_model(folder: str | Path, tokens: list[str], *, seed: int, hidden: int = 16, layers: int = 1) -> Path:
    """A tiny Llama whose vocabulary is ``tokens`` and whose embedding (and LM head) row for each token
    is ``token_vector(seed, token)`` (``seed + 1`` for the head): models whose vocabularies differ, for
    checking that merges align rows by token string."""
    from safetensors.torch import load_file, save_file

    folder = make_base(folder, seed=seed, hidden=hidden, layers=layers, intermediate=2 * hidden, vocab=len(tokens), tokenizer=False)
    save_vocab_tokenizer(folder, tokens)
    sd = load_file(folder / "model.safetensors")
    sd["model.embed_tokens.weight"] = torch.stack([token_vector(seed, t, hidden) for t in tokens])
    sd["lm_head.weight"] = torch.stack([token_vector(seed + 1, t, hidden) for t in tokens])
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # what MoE outputs are built from in the tests
# the dense decoder families tested end to end (tests/test_families.py): fused projections (phi3's
# qkv_proj and gate_up_proj, gpt_neox's query_key_value), norms with offsets and soft-capping (gemma2/3)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "gpt_neox")
# MoE bases: each layer's experts kept as fused 3-D tensors (gate_up_proj, down_proj) behind a top-k router;
# qwen2_moe adds a shared expert. Four experts, two per token; expert widths chosen so no stack is square.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_config(hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128, vocab: int | None = None,
                tie: bool = False, arch: str = "llama"):
    """A tiny decoder config: Llama by default, or any of ``FAMILIES`` (``arch``) at the same size."""
    from transformers import AutoConfig

    if arch not in FAMILIES + MOE_FAMILIES:
        raise ValueError(f"arch must be one of {', '.join(FAMILIES + MOE_FAMILIES)}, got {arch!r}")
    extra = {"head_dim": hidden // heads} if arch in ("qwen3", "gemma2", "gemma3_text", "qwen3_moe") else {}
    if arch == "mixtral":
        extra |= {"num_local_experts": 4, "num_experts_per_tok": 2}
    elif arch in ("qwen2_moe", "qwen3_moe"):
        extra |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 3 * intermediate // 8,
                  "decoder_sparse_step": 1, "mlp_only_layers": []}
        if arch == "qwen2_moe":
            extra["shared_expert_intermediate_size"] = intermediate
    if arch == "gpt_neox":  # no grouped keys/values; rotary on part of each head, as Pythia
        extra["rotary_pct"] = 0.25
    else:
        extra["num_key_value_heads"] = heads
    return AutoConfig.for_model(
        arch, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, vocab_size=vocab or len(SPECIALS) + len(CHARS), max_position_embeddings=256,
        tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )


def make_base(folder: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True, **config) -> Path:
    """A random Llama (or ``arch=``: tiny_config) saved with save_pretrained (safetensors)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**config)).to(dtype)
    model.save_pretrained(folder)
    if tokenizer:
        save_char_tokenizer(folder)
    return folder


def make_finetune(base: str | Path, folder: str | Path, *, seed: int, scale: float = 0.02, rank: int = 4) -> Path:
    """base + a low-rank-plus-noise change to every floating tensor, saved like a full fine-tune."""
    from safetensors.torch import load_file, save_file

    base, folder = Path(base), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in load_file(base / "model.safetensors").items():
        w = t.float()
        if w.dim() == 2:
            a = torch.randn(w.shape[0], rank, generator=g)
            b = torch.randn(rank, w.shape[1], generator=g)
            delta = (a @ b) / rank**0.5 + 0.3 * torch.randn(w.shape, generator=g)
        else:
            delta = torch.randn(w.shape, generator=g)
        out[name] = (w + scale * delta * (w.std() if w.numel() > 1 and w.std() > 0 else 1)).to(t.dtype).contiguous()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != "model.safetensors.index.json":
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def make_random_adapter(base: str | Path, folder: str | Path, *, seed: int, rank: int = 4, scale: float = 0.1) -> Path:
    """A PEFT LoRA of ``base`` as one downloads it: on every linear layer and, on an MoE base, on the
    stacked experts and the router (``target_parameters``), with random B (``scale``) so that it changes
    the outputs. The stand-in for a hub adapter in tests and benchmarks that compare with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.lm.arch import stacked_parameters

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        target_parameters=stacked_parameters(model) or None, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn_like(p))
    peft_model.save_pretrained(folder)
    return Path(folder)


def make_sentence_embedder(folder: str | Path, *, seed: int = 0, hidden: int = 32) -> Path:
    """A random tiny BERT saved as a sentence-transformers model (mean pooling): the offline stand-in
    for a hub sentence-embedding model such as all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as models  # 6.x
    except ImportError:
        from sentence_transformers import models  # 5.x
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    raw = folder.parent / f".{folder.name}.bert"
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=0)).save_pretrained(raw)
    save_char_tokenizer(raw)
    word = models.Transformer(str(raw), max_seq_length=128)
    dim = word.get_embedding_dimension() if hasattr(word, "get_embedding_dimension") else word.get_word_embedding_dimension()
    SentenceTransformer(modules=[word, models.Pooling(dim, "mean")], device="cpu").save(str(folder))
    import shutil

    shutil.rmtree(raw)
    return folder
