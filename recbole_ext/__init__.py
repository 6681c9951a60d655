"""UR4Rec-MoE: a RecBole extension for federated, multimodal sequential recommendation."""
