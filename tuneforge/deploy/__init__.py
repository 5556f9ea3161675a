"""Deployment: export (merged, GGUF, int8) and the OpenAI-compatible server.

server.py (the app; its docstring traces one chat request) = gateway.py (authenticate,
route, generate, log) + routers: chat.py (/v1/chat/completions, /v1/completions,
/v1/models), ops.py (health, readiness, metrics), admin.py (/admin), and production's
routers (tuneforge.production.api). Under the gateway: routing.py (A/B arms, fallback
chains, rate limits), engines.py (in-process, or vLLM by URL / vllm_launch.py).
"""
