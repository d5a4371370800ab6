"""Convolutional VAE, its ELBO and training loop in pure PyTorch (Ray only in ``distributed``)."""
