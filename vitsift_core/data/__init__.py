"""Data: decoding, image sources, SIFT keypoints per patch, batches."""
