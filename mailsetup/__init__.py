"""mailsetup: provision a working, secure OpenSMTPD from one validated model."""

__version__ = "0.1.0"
