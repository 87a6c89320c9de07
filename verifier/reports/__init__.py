"""Reports: the run's report and its text and JSON (report), JUnit XML (junit), HTML (html), and
merging matrix shards (merge)."""
