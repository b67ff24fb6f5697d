"""Analyses over a loaded `Gemma3nProbe`; each stands alone (none imports another).

- `decompose` (+ `decompose_view`, its table and plot): which component wrote a logit, exactly, through AltUp
  (`g3n.decompose`).
- `patching` (+ `patching_plan`, the checked arguments and columns; `prefix_reuse`, the target's own forward
  reused across a sweep's chunks): activation patching sweeps (`g3n.patching.sweep`).
- `matformer`: MatFormer sub-models, the smaller Gemma 3n nested in a larger one (`g3n.matformer`).
- `audit`: where stock transformers and Google's reference compute differently (`g3n.audit`).
"""
