"""carspotter: fine-grained car classification and retrieval on Stanford Cars."""

__version__ = "0.1.0"
