"""fedsea on Flower: Flower is the control plane, fedsea's trunk gRPC service the data plane.

A Flower ``ServerApp`` (``fedsea.flower.server_app:app``) runs the rounds: it samples the
SuperNodes, sends each its head and tail slice of the global LoRA adapter, stages the trunk's
slice on the trunk server, and aggregates with a Flower strategy. A ``ClientApp``
(``fedsea.flower.client_app:app``) on each data owner's SuperNode trains its split against the
trunk server over fedsea's authenticated gRPC service (hidden states and gradients never pass
through the SuperLink) and returns its head and tail adapters as an ``ArrayRecord``; its trunk
adapter stays on the trunk server, which hands it to the ServerApp (an operator) directly.
"""
