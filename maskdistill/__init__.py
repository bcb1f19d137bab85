"""MaskDistill: unsupervised semantic segmentation distilled from self-supervised ViTs."""

__version__ = "0.1.0"
