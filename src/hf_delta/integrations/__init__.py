"""Bridges to other libraries' formats (PEFT)."""
