"""The optimizer: cheaper variants of one trained model, what each measures, and the cheapest
serving plan that meets an accuracy and a p99 target.

- `quantize`: int8 (dynamic, and static with calibration data) and fp16 conversions.
- `prune`: unstructured magnitude pruning, and structured pruning of MLP hidden units.
- `distill`: a smaller student trained on a teacher's answers to unlabelled inputs.
- `profile`: accuracy, confidence, latency/throughput per batch size, size and memory of any
  variant folder, loaded through the runtime the server would use.
- `variants`: all of the above for one repository model, stored in the repository
  (`<version>/variants/<variant>/`, the reference's profile in `<version>/profile.json`).
- `cascade`: confidence thresholds of a 2-3 stage chain at the lowest expected cost.
- `plan_search`: single variants, cascades and batch settings; the Pareto frontier; the chosen
  plan, its tiers, the levers of the saving; plan.yaml.
- `plan_report`: the frontier, tiers and levers as tables, cost vs accuracy as a chart.
- `optimizer`: `frugalserve optimize` end to end (data passed in as arrays).
"""
