"""The Run: everything a run reads and writes, from open to close."""
