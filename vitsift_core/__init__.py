"""vitsift_core: SIFT keypoints x ViT self-attention, the tested engine behind the study."""
__version__ = "0.1.0"
