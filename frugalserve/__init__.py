"""frugalserve: serve ML models at the lowest cost that meets a latency and an accuracy target."""

__version__ = "0.1.0"
