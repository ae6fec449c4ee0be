"""The report of an analysis: report.md, summary.json (and its schema), figures.

document  write_report (one directory, atomic) and the summary document it holds
schema    summary.json's schema and validate_summary, effects.npz's arrays, the file names
text      numbers to three digits, the terminal table and report.md
figures   the PNG figures, drawn without pyplot
claims    the paper's claims checked on an analysis, with their intervals
"""
