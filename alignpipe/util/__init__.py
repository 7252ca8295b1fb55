"""Plumbing every layer shares: errors, names and constants, atomic writes and locks, device
resolution, the plug-in registry, safe YAML and the progress bar. Imports nothing above it."""
