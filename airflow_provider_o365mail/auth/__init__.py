"""Token lifecycle: connection settings to access tokens, with an encrypted shared store."""
