"""Quantised weight formats (fp8, NVFP4): storage codecs and the compute paths each format offers."""
