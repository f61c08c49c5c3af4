"""Op implementations: ``torch/`` holds the PyTorch references, ``triton/`` the Triton kernels.

``registry.py`` decides which one serves each device (``TRITONBITS_BACKEND``).
"""
