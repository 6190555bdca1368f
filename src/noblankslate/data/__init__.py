"""Data: the Coconut JSON format, converters and generators, curriculum and collation."""
