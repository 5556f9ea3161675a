"""Production: what happens around the served models.

- ``http.py``: the error and request types and the key checks that the gateway
  (tuneforge.deploy) and the routers below share.
- ``api/``: HTTP APIs beyond chat, mounted by the server: files and fine-tuning jobs (with
  the job queue's worker), feedback, the review queue.
- ``request_log.py``: the server's request hook -> the request log table.
- ``loop/``: the offline loop over the logged requests: monitor (drift, quality, alerts),
  review-queue filling and decisions, improve (retrain from reviewed feedback), reports.
- ``cli.py``: `tuneforge review | improve | monitor`.

The tables all of these read and write are in tuneforge/registry/tables.py.
"""
