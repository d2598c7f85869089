"""Helpers for the tests and benchmarks: small dataset files in the official formats, a synthetic
study folder, and running real studies through the command line."""
