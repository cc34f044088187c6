"""Apache Airflow provider for Microsoft 365 (Exchange Online) mail over SMTP and IMAP with OAuth2."""

__version__ = "0.1.0"
