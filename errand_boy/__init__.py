"""errand-boy: a small daemon that runs commands for big processes.

Connect with :class:`errand_boy.transports.unixsocket.UNIXSocketTransport`;
start the server with ``python -m errand_boy.run``.
"""

__version__ = "1.0.0.dev0"

__all__ = ["__version__"]
