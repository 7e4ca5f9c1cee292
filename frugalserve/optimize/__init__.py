"""The optimizer: cheaper variants of one trained model, and what each one measures.

- `quantize`: int8 (dynamic, and static with calibration data) and fp16 conversions.
- `prune`: unstructured magnitude pruning, and structured pruning of MLP hidden units.
- `distill`: a smaller student trained on a teacher's answers to unlabelled inputs.
- `profile`: accuracy, latency/throughput per batch size, size and memory of a variant.
- `variants`: all of the above for one model, written beside each other with their profiles.

Cascades and plan search come later (issue 4, items 3-4).
"""
