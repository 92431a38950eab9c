"""fedsim: single-process simulation of private federated LoRA fine-tuning.

Every virtual client is a replica in stacked tensors (replica dimension first); one batched
forward/backward pass trains all of them. See README.md for the layout map.
"""
