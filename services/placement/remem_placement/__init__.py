"""remem placement: the control plane (registration, slab placement, repair); never page data."""
