"""Configuration, torch-free."""
