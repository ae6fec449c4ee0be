"""The report of an analysis: report.md, summary.json (and its schema), figures.

document  write_report (one directory, atomic) and the summary document it holds
schema    summary.json's schema and validate_summary, effects.npz's arrays, the file names
text      numbers to three digits, the terminal table and report.md
figures   the figures: one by name as a matplotlib Figure (figure), or all as PNGs (write); no pyplot
html      the summary as a self-contained HTML fragment, for a notebook's display
claims    the paper's claims, each by the paper's quantity with a verdict rule
measures  hydra_jax's own repair measures (own change, norm term, shares, coupling)
"""
