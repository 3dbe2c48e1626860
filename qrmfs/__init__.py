"""qrmfs: build diskless NFS-root images, the successor of openQRM 3.1's qrm-filesystem-image."""

__version__ = "0.1.0"
