"""A local stand-in for the Microsoft identity platform (Entra ID v2 endpoints)."""
