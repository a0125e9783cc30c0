"""Model and tokenizer code: builders, heads, losses, generation. Imports neither Prefect nor MLflow."""
