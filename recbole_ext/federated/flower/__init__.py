"""The `flower` backend: a stage run over Flower's deployment engine (flwr 1.42, docs/DEPLOY.md).

* `deploy.py`: the command's side. It starts a SuperLink and the SuperNodes on the loopback address
  (or joins a SuperLink that runs elsewhere), submits the stage as a Flower run, follows it and stops
  what it started.
* `backend.py`: the backend the ServerApp's trainer uses: it sends each node its share of the round's
  clients and merges the sums that come back.
* `records.py`: what travels in a message (parameters, client lists, a round's sums).

The Flower App that `flwr run` submits sits above the stage assembly it runs, in
recbole_ext/flower_app/: a ServerApp that runs the stage itself (the same trainer, server strategy,
evaluation and run folder as every backend) and a ClientApp that trains the users the server sends
its node with the project's own local step. Only these two packages import flwr (an optional
install: requirements-flower.txt).
"""
