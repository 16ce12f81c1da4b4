"""Networks: the native UNet (and, later, adapters for other architectures)."""
