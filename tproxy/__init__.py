"""tproxy: a transparent intercepting proxy for Linux gateway routers."""

__version__ = "0.1.0"
