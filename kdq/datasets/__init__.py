"""Datasets shipped inside kdq, so that `make demo` runs offline anywhere (see `fashion_mnist_small`)."""
