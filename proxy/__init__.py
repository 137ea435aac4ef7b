"""edge-proxy: answers flag definitions from the backend's Redis entries and forwards everything else."""

__version__ = "0.1.0"
