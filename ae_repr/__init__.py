"""ae-repr: pretrain autoencoder variants on unlabeled data, extract features, measure them."""

__version__ = "0.1.0"
