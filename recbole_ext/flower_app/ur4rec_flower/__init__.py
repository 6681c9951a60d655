"""A ur4rec-moe stage as a Flower App: the ServerApp runs the stage, the ClientApp a node's share of
each round (the `flower` backend: recbole_ext/federated/flower, docs/DEPLOY.md)."""
