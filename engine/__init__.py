"""The loops and the glue above data/ and models/: precision, stop requests, the training step and
epoch, evaluation, and filling the latent cache with a model's VAE."""
