"""On-disk contracts shared by producers and consumers (sample records, teacher cache)."""
