"""The adapter directory on disk (SPEC §6): reading and validating untrusted files, deterministic
serialisation, crash-safe writes (:mod:`.atomic`) and commits (:mod:`.commit`), the safetensors byte
layout (:mod:`.tensorfile`) and sizes (:mod:`.sizes`)."""
