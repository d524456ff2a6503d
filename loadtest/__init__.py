"""Locust gRPC load test for endless chats: locustfile, local-stack runner, report."""
