"""Demucs: music source separation (time-domain, hybrid and hybrid transformer models).

Importing the package has no side effect on the process: the C allocator is tuned (see
`demucs.allocator`) only when a separation or a training starts.
"""

__version__ = "4.1.0"
