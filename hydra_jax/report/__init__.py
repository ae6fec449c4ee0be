"""The report of an analysis: report.md, summary.json (and its schema), figures.

document  the summary document, its schema and validation, the markdown text,
          the figures, and write_report (atomic, one directory)
claims    the paper's claims checked on an analysis, with their intervals
"""
