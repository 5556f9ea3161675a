"""Production loop: request logs, feedback, monitoring and drift, human review, improve, jobs API."""
