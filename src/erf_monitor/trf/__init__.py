"""Stage 2, theoretical receptive fields: the torch.fx index-box walk, the numeric fallback and
the ``TRF`` value type."""
