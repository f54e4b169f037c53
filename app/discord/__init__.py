"""Discord over HTTP interactions: verify, route and answer slash commands; relay training progress."""
