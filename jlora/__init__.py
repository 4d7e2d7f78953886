from jlora.errors import JloraError  # noqa: F401 (placeholder until the core lands)
