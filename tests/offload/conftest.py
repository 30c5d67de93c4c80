import torch

# Tiny models on a shared 2-core machine: intra-op threads only oversubscribe the CPU (10-50x slower).
torch.set_num_threads(1)
