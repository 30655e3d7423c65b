"""Continual pre-training, torchtitan style: one concern per module.

pack (tokenize + best-fit-decreasing packing on Ray Data) -> dataloader (deterministic, sharded, resumable)
-> parallelize (FSDP2 / HSDP) -> lr_scheduler -> loss (packed, per-document) -> checkpoint (DCP as Ray Train
checkpoints) -> metrics (tokens/s, MFU) -> export (HF safetensors) ; cpt = the short train loop + TorchTrainer.
"""
