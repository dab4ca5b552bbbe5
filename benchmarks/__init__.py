"""Overhead benchmarks of tolaria_otel: ``python -m benchmarks.overhead`` (CPU), ``python -m benchmarks.gpu``."""
