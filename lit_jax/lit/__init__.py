"""Latent Interpretation Tuning: extraction, projection, the decoder loss, training, reading."""
