"""The OpenAI Batch API's back end: batch records in Redis (store.py), input-line validation (lines.py),
the runner that feeds a batch's lines to the fleet and writes its output files (runner.py), and the Celery
app whose workers run it (worker.py)."""
