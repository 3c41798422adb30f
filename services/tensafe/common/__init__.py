"""Code shared by the services that run models (the trainer and the inference service).

Unlike :mod:`tensafe.runtime`, which every service imports and which never imports torch, this package
may import torch and transformers: only the ML services (and the ML image) load it. No service imports
another service's package; what two of them need lives here or in the runtime.

* :mod:`tensafe.common.models`: what a ``model_ref`` names, and loading a base model once, frozen.
* :mod:`tensafe.common.devices`: the device and dtype of base models (TENSAFE_DEVICE, TENSAFE_DTYPE).
"""
