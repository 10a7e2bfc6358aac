"""The PyTorch modules: the adapter in its two forms, the layer that wraps a frozen base
(:mod:`.layer`), target selection (:mod:`.targets`) and the model wrapper (:mod:`.model`)."""
