"""replica: the Ray Serve deployment that hosts one engine (see server.py; app.py builds the Serve app).

Importing this package loads neither torch nor Ray: the gateway imports the names below.
"""

DEPLOYMENT_NAME = "SinkServeReplica"
