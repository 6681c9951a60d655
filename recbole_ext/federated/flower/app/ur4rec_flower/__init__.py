"""A ur4rec-moe stage as a Flower App (see recbole_ext/federated/flower)."""
