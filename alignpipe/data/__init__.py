"""Data: manifests and media decoding, the Zarr latent store and what reads it for stage two
(`pairing`), importing latents made elsewhere, and builders for public dataset layouts."""
