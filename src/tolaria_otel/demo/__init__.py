"""The demo run (``tolaria-otel demo``) and its small seeded network, which the tests and benchmarks train too."""
