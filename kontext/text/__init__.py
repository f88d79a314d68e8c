"""Text side of FLUX.1 Kontext: the CLIP-L and T5-XXL encoders (`clip`, `t5`) and their tokenizers (`tokenizers`).

Submodules are imported on use, not here, so that `import kontext` stays cheap.
"""
