"""Scale-out: archive batches on Ray Data (``ray_batch``), online serving through Triton."""
