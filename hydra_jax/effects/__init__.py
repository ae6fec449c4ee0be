"""Effects: what an ablation changes, for every ablation, measured component and prompt.

results   Component, EffectMatrix, Labels, direct effects, the exact decomposition
matrix    EffectSpec (the settings, validated once), effect_matrix and
          compile_effect_matrix (the host-built plan, one compiled call), and
          naive_effect_matrix (the reference: one run per ablation)
engine    effect_core: the compiled body (clean pass, ablation values, the suffix
          of every row through the model's block, every measurement)
sharding  the layout of prompts and ablations over a device mesh
summary   hydra_summary: per-ablation Hydra statistics with bootstrap intervals
paper     paper_statistics: the paper's quantities (Δ_unembed, Δ_ablate, CE, Figs. 2, 7, 8)
"""
