"""LoRA extraction, merge, resize and key forms. Knows nothing of pickles: it reads through sftools.io."""
