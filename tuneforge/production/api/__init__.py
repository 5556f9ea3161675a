"""HTTP APIs beyond chat, mounted on the gateway by tuneforge.deploy.server: /v1/files,
/v1/fine_tuning/jobs, /v1/feedback, /v1/review."""
