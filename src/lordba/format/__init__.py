"""The adapter directory on disk (SPEC §6): reading and validating untrusted files, deterministic
serialisation, crash-safe commits (:mod:`.atomic`), the safetensors byte layout (:mod:`.tensorfile`)
and sizes (:mod:`.sizes`)."""
