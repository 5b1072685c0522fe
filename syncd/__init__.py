"""syncd: a reverse-ETL daemon for WooCommerce stores."""

__version__ = "0.1.0"
