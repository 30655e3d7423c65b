"""Pruning and knowledge distillation: `prune` makes a smaller student from the teacher (depth: drop the blocks
of lowest block importance; width: drop the MLP channels of lowest activation importance, measured on calibration
documents from the training side), `distill` trains it on Ray Train against the frozen teacher with
(1 - alpha) * CE + alpha * T^2 * KL, beside a CE-only control on the same tokens.

importance (calibration statistics) -> surgery (the pruned HF model) -> prune (stage) ; teacher (placement, frozen
loading) -> stage (the distill stage on definemed/train's loop) ; plots.
"""
