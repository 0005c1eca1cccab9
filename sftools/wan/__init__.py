"""Facts about Wan weights: names, layouts, configs, shapes, detection, fp8, opening any source, tiny models."""
