"""``python -m dler_kernels.info``: versions and the backends usable on this machine."""

import platform

import torch

from . import __version__
from .dispatch import available_backends


def main() -> None:
    print(f"dler_kernels {__version__} | torch {torch.__version__} | python {platform.python_version()}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    for name, state in available_backends().items():
        print(f"  {name:10s} {state}")


if __name__ == "__main__":
    main()
