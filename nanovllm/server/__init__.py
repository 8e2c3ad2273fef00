"""The OpenAI-compatible HTTP server (`nanovllm serve`); see docs/serving.md."""
