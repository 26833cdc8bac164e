"""What is trained: the plain dense and MoE transformer (no torch.distributed in here)."""
