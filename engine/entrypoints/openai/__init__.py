"""OpenAI-compatible HTTP API: request/response models, serving of chat and completions."""
