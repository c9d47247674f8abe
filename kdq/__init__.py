"""kdq: distill a big image classifier into a small int8 model and certify its exports."""

from kdq.cpu import apply_identity

__version__ = "0.1.0"
apply_identity()  # KDQ_CPU=avx2: fbgemm must be forced before the first int8 op of this process
