"""Analysis: page comparison (compare; remote_compare across hosts), dirtyram's page headers
(pageheader), what each difference means (diagnosis), known upstream findings (findings) and
expected results (expect)."""
