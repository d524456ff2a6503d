"""Session-affine routing: placement (pure) and the Ray Serve request router that applies it."""
