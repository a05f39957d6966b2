"""``python -m cuda_ext``: build (or find cached) the native kernels now, and say which are in use."""

from cuda_ext import loader

if __name__ == "__main__":
    print(loader.describe())
