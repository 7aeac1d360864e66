"""The router in front of several replicas: one conversation, one replica (rendezvous hashing with bounded loads)."""
