"""The analysis commands: read run folders (report, results, compare, curves), rebuild a trained run to
probe it (ablate, item_vectors, attack), or train stock RecBole baselines on our split (baseline,
popularity). Nothing in the pipeline imports them."""
