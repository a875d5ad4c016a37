"""Fashion-MNIST: finding or fetching it (fetch), reading and checking its IDX files and splitting
them (dataset), and the tensor cache that makes the next read fast (cache)."""
