"""The math of LoRDBA, independent of modules and files: sign packing (SPEC §6), the straight-through
estimators (SPEC §3), the scale codecs (storage formats of the three scale vectors) and the fused
autograd function of the branch (SPEC §1)."""
