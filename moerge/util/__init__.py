"""Small helpers every floor above may use, one module each: output files written whole (``files``),
progress and consoles (``progress``), the torch thread count (``threads``), figures (``figures``), and
independent jobs here or on Ray (``scale``). Nothing here imports torch at module level."""
