"""The language model underneath everything: finding and loading a model folder or base (``base``),
what it computes in (``precision``), its tokenizer and chat template (``chat``), batching and
generation (``batching``, ``generate``), the real bases moerge knows (``zoo``) and the built-in tiny
base's config (``tiny``). Nothing here knows about experts, merges or routing."""
