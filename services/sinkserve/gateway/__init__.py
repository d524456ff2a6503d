"""gateway: the gRPC front end (no torch). server (handlers, health, the Gateway), interceptors (auth, error
mapping), convert (pb <-> protocol), limits (the gateway's own bounds), backend (the Ray Serve handle), main."""
