"""Multi-task MoE ranking models over TorchRec embeddings."""
