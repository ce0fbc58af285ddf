"""Data sources, the compact in-memory store, and patient-level splits."""
