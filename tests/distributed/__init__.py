"""Training on more than one process: DDP and FSDP2 through torchrun (and accelerate launch), gloo on CPU."""
