"""conntrack-agent: keeps the kernel's conntrack table from filling."""

__version__ = "0.1.0"
