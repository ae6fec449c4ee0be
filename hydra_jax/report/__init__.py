"""The report of an analysis: report.md, summary.json (and its schema), figures.

document  write_report (one directory, atomic) and the summary document it holds
schema    summary.json's schema and validate_summary, effects.npz's arrays, the file names
text      numbers to three digits, the terminal table and report.md
figures   the PNG figures, drawn without pyplot
claims    the paper's claims, each by the paper's quantity with a verdict rule
measures  hydra_jax's own repair measures (own change, norm term, shares, coupling)
"""
