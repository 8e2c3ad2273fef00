"""Structured outputs: constrain generation to a regex, a list of choices or a JSON schema."""
