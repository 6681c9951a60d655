# Flower checks for an assignment to `app` here, without importing the module.
from recbole_ext.federated.flower import node

app = node.app
